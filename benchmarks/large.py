"""K-FAC and EK-FAC on a ResNet-9 of up to ~10M parameters: python -m benchmarks.large.

The model is a ResNet-9 of ``benchmarks.common.resnet9`` (``--arch kronfluence``:
the 2.3M-parameter model of kronfluence's CIFAR-10 example; ``--arch dawnbench``:
Page's 6.6M-parameter DAWNBench model; ``--width`` multiplies the channels, 1.25
gives the dawnbench model 10.3M) on 32x32x3 images drawn from scikit-learn's
digits (nothing is downloaded), trained for ``--epochs`` epochs. The same run
times a training epoch (the median of the epochs after the first, which traces,
and again after the cases: times are divided by the mean of the two), and for
each case (``ekfac``, ``kfac``; ``damping="auto"``), in a child process:

* ``fit`` on the ``--num-train`` training examples (the checks on one batch, the
  factors, their eigendecomposition, and for EK-FAC the eigenvalue correction);
  the eigendecompositions (``tf.linalg.eigh`` in float64, one per factor) are
  also timed on their own, a cost that does not grow with the training set;
* ``explain`` of ``--tests`` test points (the time to the first answer), then of
  ``--more-tests`` other test points with the same factors; then the solve alone
  (test gradients and preconditioning) of 10 other test points, the part of a
  query that does not grow with the training set either;
* the peak resident memory of the process and the bytes of the fitted factors
  (eigenbases, eigenvalues and diagonals, float64).

On kronfluence's model (``--arch kronfluence --width 1``) the run ends with a
comparison with kronfluence's published figures for it (50,000 training examples,
2,000 queries, one A100), both in training epochs of the model on the hardware
that ran it; see ``docs/performance.md``.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.large --quick            # 128 examples, a smoke run
    .venv/bin/python -m benchmarks.large --arch kronfluence --num-train 1000
    .venv/bin/python -m benchmarks.large --arch dawnbench --width 1.25 --num-train 256
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import traceback

import numpy as np

from benchmarks.common import resnet9
from benchmarks.common.child import run_in_child
from benchmarks.common.report import machine, now
from benchmarks.common.timing import log, peak_rss_mb

CASES = ("ekfac", "kfac")
SOLVE_TESTS = 10  # test points whose solve alone is timed
PYTHON = ".venv/bin/python"

# kronfluence's CIFAR-10 ResNet-9 example (examples/cifar/README.md of
# github.com/pomonam/kronfluence, commit 884255f): `analyze.py --factor_strategy ekfac
# --query_batch_size 1000`, 2,000 queries over the 50,000 training examples, float32,
# on one A100 (80GB), seconds.
KRONFLUENCE = {
    "covariances": 22.538,
    "eigendecomposition": 0.91424,
    "eigenvalue correction": 34.885,
    "scoring": 46.745,
    "total": 106.38,  # with saving and loading the factors and scores (1.3 s)
}
KRONFLUENCE_TRAIN, KRONFLUENCE_QUERIES = 50_000, 2_000
# The same ResNet-9 trained with FFCV on one A100: 24 epochs in 36 s (docs.ffcv.io,
# "Training CIFAR-10 in 36 seconds on a single A100"; examples/cifar of
# github.com/libffcv/ffcv, mixed precision, channels last). kronfluence publishes no
# training time.
A100_EPOCH_SECONDS = 36.0 / 24


def _run_case(case, weights, args, queue):
    """In the child: build the model, load ``weights``, fit and explain; report to ``queue``."""
    import warnings

    import tf_influence as tfi

    x_train, y_train, x_test, y_test = resnet9.load_data(args.num_train, args.num_tests)
    model = resnet9.build_model(args.arch, args.width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the optimizer's state is not loaded
        model.load_weights(weights)
    solver = tfi.solvers.EKFAC() if case == "ekfac" else tfi.solvers.KFAC()
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping="auto")
    queue.put(("ready", time.time()))
    row = {}
    try:
        start = time.perf_counter()
        with timed_eigh([]) as spent:
            im.fit(x_train, y_train, batch_size=args.batch_size, verbose=0)
        row["fit_seconds"] = time.perf_counter() - start
        row["eigh_seconds"] = sum(seconds for _, seconds in spent)
        row["eigh_sizes"] = sorted({size for size, _ in spent})
        arrays = im.solver.get_state(im.operator)
        row["factor_mib"] = sum(a.nbytes for a in arrays.values()) / 2**20
        row["damping"] = float(im.damping)
        first = slice(0, args.tests)
        start = time.perf_counter()
        scores = im.explain(x_test[first], y_test[first], verbose=0)
        row["first_seconds"] = time.perf_counter() - start
        more = slice(args.tests, args.tests + args.more_tests)
        start = time.perf_counter()
        more_scores = im.explain(x_test[more], y_test[more], verbose=0)
        row["more_seconds"] = time.perf_counter() - start
        row["finite"] = bool(np.isfinite(scores).all() and np.isfinite(more_scores).all())
        # The part of a query that does not grow with the training set: its gradient
        # and its preconditioning, timed alone on SOLVE_TESTS other test points.
        other = slice(args.tests + args.more_tests, args.num_tests)
        start = time.perf_counter()
        im.state.inverse_hvp_tests(x_test[other], y_test[other]).numpy()
        row["solve_seconds"] = (time.perf_counter() - start) / SOLVE_TESTS
        row["status"] = "finished"
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
        row.update(
            status="error",
            error=f"{type(error).__name__}: {error}"[:400],
            traceback=traceback.format_exc()[-2000:],
        )
    row["peak_mib"] = peak_rss_mb()
    queue.put(("done", row))


def run_case(case, weights, args, epoch_seconds):
    """One case in a child process, stopped after ``args.budget_epochs`` or above the memory.

    ``epoch_seconds`` (the epoch timed before the cases) sets the time limit.
    """
    return run_in_child(
        _run_case,
        (case, weights, args),
        args.budget_epochs * epoch_seconds,
        args.max_memory_mib,
        f"{args.budget_epochs:g} epochs",
    )


@contextlib.contextmanager
def timed_eigh(spent):
    """Appends ``(size, seconds)`` of every eager ``tf.linalg.eigh`` call to ``spent``.

    ``fit`` decomposes the factors eagerly, one ``tf.linalg.eigh`` per factor; the
    calls inside compiled functions (the output draws) are not timed.
    """
    import tensorflow as tf

    eigh = tf.linalg.eigh

    def timed(matrix, *args, **kwargs):
        if not tf.executing_eagerly():
            return eigh(matrix, *args, **kwargs)
        start = time.perf_counter()
        result = eigh(matrix, *args, **kwargs)
        result[0].numpy()
        spent.append((int(matrix.shape[-1]), time.perf_counter() - start))
        return result

    tf.linalg.eigh = timed
    try:
        yield spent
    finally:
        tf.linalg.eigh = eigh


def _command(args):
    parts = [f"{PYTHON} -m benchmarks.large"]
    if args.quick:
        return " ".join([*parts, "--quick"])
    parts += [f"--arch {args.arch}", f"--width {args.width:g}", f"--num-train {args.num_train}"]
    if args.epochs != 2:
        parts.append(f"--epochs {args.epochs}")
    if (args.tests, args.more_tests) != (10, 100):
        parts.append(f"--tests {args.tests} --more-tests {args.more_tests}")
    if args.batch_size != 64:
        parts.append(f"--batch-size {args.batch_size}")
    if args.cases != ",".join(CASES):
        parts.append(f"--cases {args.cases}")
    if args.budget_epochs != 60:
        parts.append(f"--budget-epochs {args.budget_epochs:g}")
    return " ".join(parts)


def comparison(row, epoch_seconds, args):
    """Markdown lines: kronfluence's published run against ours, in training epochs.

    Ours is scaled to kronfluence's problem (50,000 training examples, 2,000 queries).
    What grows with the training set costs the same number of epochs at any size:
    ``fit`` without its eigendecompositions (the factor passes, and the checks on one
    batch, counted here too), and the scoring pass of ``explain``. What does not grow
    is scaled by the longer epoch: the eigendecompositions, and each query's gradient
    and preconditioning (``solve_seconds``). 2,000 queries are 20 calls of
    ``explain`` on 100 (what fits in memory here).
    """
    n = args.num_train
    epoch_50k = epoch_seconds * KRONFLUENCE_TRAIN / n
    eigh = row["eigh_seconds"]
    passes = max(row["fit_seconds"] - eigh, 0.0) / epoch_seconds
    fit = passes + eigh / epoch_50k
    calls = KRONFLUENCE_QUERIES / args.more_tests
    solve = row["solve_seconds"] * args.more_tests
    scoring_pass = max(row["more_seconds"] - solve, 0.0) / epoch_seconds
    queries = row["solve_seconds"] * KRONFLUENCE_QUERIES / epoch_50k
    scoring = calls * scoring_pass + queries
    theirs = {k: v / A100_EPOCH_SECONDS for k, v in KRONFLUENCE.items()}
    theirs_fit = sum(theirs[k] for k in ("covariances", "eigendecomposition"))
    theirs_fit += theirs["eigenvalue correction"]
    return [
        "| | kronfluence (published) | tf-influence (this run, scaled) |",
        "| --- | --- | --- |",
        f"| hardware | one A100 80GB | {machine()} |",
        f"| one training epoch of 50,000 examples | {A100_EPOCH_SECONDS:.2f} s (FFCV) | "
        f"{epoch_50k:,.0f} s ({epoch_seconds:.1f} s for {n:,}) |",
        f"| fit: factors, eigendecomposition, correction | "
        f"{theirs_fit:.1f} epochs ({theirs_fit * A100_EPOCH_SECONDS:.1f} s) | "
        f"{fit:.1f} epochs (passes and checks {passes:.2f}; eigendecomposition "
        f"{eigh:.0f} s = {eigh / epoch_50k:.3f}) |",
        f"| scoring 2,000 queries | {theirs['scoring']:.1f} epochs | {scoring:.1f} epochs "
        f"({calls:g} scoring passes of {scoring_pass:.2f}; queries' gradients and "
        f"preconditioning {row['solve_seconds']:.2f} s each, {queries:.2f} in all) |",
        f"| total | {theirs['total']:.1f} epochs ({KRONFLUENCE['total']:.0f} s) | "
        f"{fit + scoring:.1f} epochs |",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 128 examples, 4 + 8 test points"
    )
    parser.add_argument("--arch", default="kronfluence", choices=resnet9.ARCHITECTURES)
    parser.add_argument("--width", type=float, default=1.0, help="channels multiplier")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before the cases")
    parser.add_argument("--tests", type=int, default=10, help="test points of the first answer")
    parser.add_argument("--more-tests", type=int, default=100, help="then other test points")
    parser.add_argument("--batch-size", type=int, default=64, help="training and fit batches")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {CASES}")
    parser.add_argument(
        "--budget-epochs", type=float, default=60, help="a case's time limit, in training epochs"
    )
    parser.add_argument(
        "--max-memory-mib", type=float, default=20000, help="stop a case above this memory"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.tests, args.more_tests, args.budget_epochs = 128, 4, 8, 1000
    args.num_tests = args.tests + args.more_tests + SOLVE_TESTS
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")

    data = resnet9.load_data(args.num_train, args.num_tests)
    log(f"training ResNet-9 ({args.arch}, width {args.width:g}) on {args.num_train} examples")
    model, accuracy, before, epochs = resnet9.train_model(
        data, args.arch, args.width, args.epochs, args.batch_size
    )
    trained = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
    started = now()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "model.weights.h5")
        model.save_weights(weights)
        for case in cases:
            log(f"case {case}")
            rows[case] = run_case(case, weights, args, before)
            if rows[case]["status"] == "error":
                log(rows[case].get("traceback", ""))
    # The machine's load may change during the cases: an epoch is timed again after
    # them, and the times are divided by the mean of the epochs before and after.
    start = time.perf_counter()
    model.fit(data[0], data[1], batch_size=args.batch_size, epochs=1, verbose=0)
    after = time.perf_counter() - start
    epoch_seconds = (before + after) / 2
    print(f"`{_command(args)}`, {started}, {machine()}\n")
    print(
        f"ResNet-9 ({args.arch}, width {args.width:g}): {model.count_params():,} parameters "
        f"({trained:,} trained), {args.num_train:,} training examples, {args.epochs} epochs "
        f"(test accuracy {accuracy:.3f}); one training epoch: {epoch_seconds:.1f} s, the mean "
        f"of {before:.1f} s before the cases and {after:.1f} s after them (the epochs of "
        f"training: {', '.join(f'{s:.1f}' for s in epochs)} s)\n",
        flush=True,
    )

    print(
        f"| case | damping | fit | of which eigendecomposition | explain {args.tests} "
        f"| explain {args.more_tests} more | one query's solve | peak RSS | factors |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, row in rows.items():
        if row["status"] != "finished":
            print(f"| {case} | | {row['status']}: {row.get('error', '')} | | | | | | |")
            continue

        def cell(seconds):
            return f"{seconds:.0f} s = **{seconds / epoch_seconds:.2f}** epochs"

        print(
            f"| {case} | {row['damping']:.3g} | {cell(row['fit_seconds'])} | "
            f"{cell(row['eigh_seconds'])} | {cell(row['first_seconds'])} | "
            f"{cell(row['more_seconds'])} | {row['solve_seconds']:.2f} s | "
            f"{row['peak_mib']:,.0f} MiB | {row['factor_mib']:,.0f} MiB |"
        )
    finished = [row for row in rows.values() if row["status"] == "finished"]
    if finished:
        print(
            f"\nfactor sizes decomposed (float64): {finished[0]['eigh_sizes']}; "
            "the eigendecomposition does not grow with the training set"
        )
    same_model = args.arch == "kronfluence" and args.width == 1
    if same_model and "ekfac" in rows and rows["ekfac"]["status"] == "finished":
        print("\nAgainst kronfluence's published ResNet-9 run, EK-FAC, in training epochs:\n")
        print("\n".join(comparison(rows["ekfac"], epoch_seconds, args)))


if __name__ == "__main__":
    main()
