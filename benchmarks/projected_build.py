"""Building a projected-gradient index, in training epochs: python -m benchmarks.projected_build.

Issue 21's build benchmark: the time to build ``Projected``'s index, per training
example, as a fraction of one training epoch of the same model (goal: the whole
index in at most 2 epochs), on models whose epoch means something:

* ``--model resnet9``: kronfluence's CIFAR-10 ResNet-9 of ``benchmarks.common.resnet9``
  (2.28M parameters; 1,000 training examples by default, batch 64);
* ``--model cnn``: the residual CNN of ``benchmarks.common.cnn`` (1.60M parameters, the
  scenario of issue 18; 1,500 training examples by default, batch 32).

The model is trained for ``--epochs`` epochs; a training epoch is timed before the
cases and again after them (the machine is shared: times are divided by the mean of
the two). Each case runs in a child process (``benchmarks.common.child``):

* ``projected``: ``Projected(dim=--dim, projection="kronecker")`` with
  ``damping="auto"``, the index in memory; ``projected_store``: the same with
  ``store=`` (float16 rows on disk). ``fit`` is divided into the index pass (every
  call of the per-example projection, its first call, which traces and checks the
  factored gradients, apart), the Gram ``Phi^T Phi`` (``n * dim^2``, added block by
  block; a separate read of the stored rows with ``store=``), the Cholesky factor of
  ``F`` (``dim^3 / 3``, constant in n) and the rest (the checks of the
  model, loss and data on one batch, the operator, fingerprints);
* ``ekfac``: ``EKFAC()`` with ``damping="auto"`` for comparison, its eigendecompositions
  (constant in n) timed apart.

Each Projected case runs ``--repeats`` times (2), interleaved, so that the spread a
shared machine's load gives shows in the table; EK-FAC runs once, last.

Then each case explains ``--tests`` test points (the first answer), ``--more-tests``
others, and (Projected) the top-10 of ``--more-tests`` others again (fresh test
points: query coordinates are cached per batch); the peak resident memory of the
process; the bytes of the index (the rows; with ``store=`` the files on disk) and of
the curvature (``F``'s Gram and Cholesky factor; EK-FAC's factors). The last column of the
build table scales ``fit`` to 50,000 training examples: what grows with n costs the
same number of epochs at any n, what does not (the first call's traces, the Cholesky
factor, the eigendecompositions) is divided by the longer epoch.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.projected_build --quick          # a smoke run
    .venv/bin/python -m benchmarks.projected_build --model resnet9  # about 10 minutes
    .venv/bin/python -m benchmarks.projected_build --model cnn      # about 20 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import traceback

import numpy as np

from benchmarks.common import cnn, resnet9
from benchmarks.common.child import run_in_child
from benchmarks.common.report import machine, now
from benchmarks.common.timing import fit_epochs, log, peak_rss_mb

CASES = ("projected", "projected_store", "ekfac")
SCALED_TRAIN = 50_000  # CIFAR-10's training set, for the last column
PYTHON = ".venv/bin/python"
# name: (what, default training examples, batch size of training and fit).
MODELS = {
    "resnet9": ("kronfluence's ResNet-9 (benchmarks.common.resnet9)", 1000, 64),
    "cnn": ("the residual CNN of issue 18 (benchmarks.common.cnn)", cnn.NUM_TRAIN, 32),
}


def load_data(name, num_train, num_tests):
    """``(x_train, y_train, x_test, y_test)`` of a model's data, ``num_tests`` test points."""
    if name == "resnet9":
        return resnet9.load_data(num_train, num_tests)
    x, y, x_test, y_test = cnn.load_data(num_train)
    if len(x_test) < num_tests:
        raise SystemExit(
            f"--model cnn has {len(x_test)} test points for {num_train} training examples; "
            f"the cases need {num_tests}. Pass fewer --tests / --more-tests."
        )
    return x, y, x_test, y_test


def build_model(name):
    return resnet9.build_model("kronfluence") if name == "resnet9" else cnn.build_model()


@contextlib.contextmanager
def timed_calls(owner, name, spent, eager_only=False):
    """Appends the seconds of every call of ``owner.name`` to ``spent`` while inside.

    ``eager_only``: calls made while tracing a ``tf.function`` are not timed.
    """
    import tensorflow as tf

    original = getattr(owner, name)

    def timed(*args, **kwargs):
        if eager_only and not tf.executing_eagerly():
            return original(*args, **kwargs)
        start = time.perf_counter()
        result = original(*args, **kwargs)
        for leaf in tf.nest.flatten(result):
            if hasattr(leaf, "numpy"):
                leaf.numpy()
        spent.append(time.perf_counter() - start)
        return result

    setattr(owner, name, timed)
    try:
        yield spent
    finally:
        setattr(owner, name, original)


def _fit_projected(im, x, y, batch_size):
    """``fit``, its seconds and their parts (see the module docstring)."""
    import tensorflow as tf

    from tf_influence.engine import index, projection, state

    examples, gram, factor, store = [], [], [], []
    with contextlib.ExitStack() as stack:
        stack.enter_context(timed_calls(projection.GradientProjection, "examples", examples))
        # The Gram's products (a private class: timed here, not changed).
        stack.enter_context(timed_calls(index._GramSum, "add", gram))
        stack.enter_context(timed_calls(tf.linalg, "cholesky", factor, eager_only=True))
        stack.enter_context(timed_calls(state, "build_store", store))
        start = time.perf_counter()
        im.fit(x, y, batch_size=batch_size, verbose=0)
        fit = time.perf_counter() - start
    projector = im.state.index_inverse.projection
    first_rows = min(len(x), max(batch_size, projector.rows_per_pass or 0))
    per_example = sum(examples[1:]) / max(len(x) - first_rows, 1)
    pass_and_gram = store[0] if store else sum(examples) + sum(gram)
    # What grows with n: the pass at its rate after the first call, and the Gram (with
    # the store's writes and its read). The rest does not: the first call's traces and
    # factored check, the Cholesky factor, the checks and set-up on one batch.
    growing = per_example * len(x) + pass_and_gram - sum(examples)
    return {
        "fit_seconds": fit,
        "pass_seconds": sum(examples),
        "first_seconds": examples[0],
        "per_example_seconds": per_example,
        "gram_seconds": sum(gram),
        "store_seconds": sum(store),
        "cholesky_seconds": sum(factor),
        "other_seconds": fit - pass_and_gram - sum(factor),
        "growing_seconds": growing,
        "dim": projector.dim,
        "traces": im.solver.projector(im.operator).tracing_count(),
    }


def _run_case(case, name, weights, folder, args, queue):
    """In the child: build the model, load ``weights``, fit and query; report to ``queue``.

    ``folder``: where a store goes (a new folder for every run).
    """
    import warnings

    import tf_influence as tfi
    from benchmarks.large import timed_eigh

    x, y, x_test, y_test = load_data(name, args.num_train, args.num_tests)
    model = build_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the optimizer's state is not loaded
        model.load_weights(weights)
    store = None
    if case == "projected_store":  # a folder of its own: the store's files go beside it
        os.makedirs(folder)
        store = os.path.join(folder, "index.npy")
    if case == "ekfac":
        solver = tfi.solvers.EKFAC()
    else:
        solver = tfi.solvers.Projected(dim=args.dim, projection="kronecker", store=store)
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping="auto")
    queue.put(("ready", time.time()))
    row = {}
    try:
        if case == "ekfac":
            start = time.perf_counter()
            with timed_eigh([]) as spent:
                im.fit(x, y, batch_size=args.batch_size, verbose=0)
            row["fit_seconds"] = time.perf_counter() - start
            row["eigh_seconds"] = sum(seconds for _, seconds in spent)
            row["growing_seconds"] = row["fit_seconds"] - row["eigh_seconds"]
            arrays = im.solver.get_state(im.operator)
            row["curvature_bytes"] = sum(a.nbytes for a in arrays.values())
        else:
            row.update(_fit_projected(im, x, y, args.batch_size))
            row["curvature_bytes"] = 2 * row["dim"] ** 2 * 8  # F's Gram and factor, float64
            if store is None:
                row["index_bytes"] = int(np.prod(im.state.index.shape)) * 4
            else:
                where = os.path.dirname(store)
                files = {f: os.path.getsize(os.path.join(where, f)) for f in os.listdir(where)}
                row["store_files"] = files
                # The rows and their float16 scales; the Gram is kept beside them.
                row["index_bytes"] = sum(v for f, v in files.items() if ".extra." not in f)
                row["gram_file_bytes"] = sum(v for f, v in files.items() if ".extra." in f)
        row["damping"] = float(im.damping)
        first = slice(0, args.tests)
        more = slice(args.tests, args.tests + args.more_tests)
        top = slice(args.tests + args.more_tests, args.num_tests)
        start = time.perf_counter()
        scores = im.explain(x_test[first], y_test[first], verbose=0)
        row["explain_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        more_scores = im.explain(x_test[more], y_test[more], verbose=0)
        row["more_seconds"] = time.perf_counter() - start
        row["finite"] = bool(np.isfinite(scores).all() and np.isfinite(more_scores).all())
        if case != "ekfac":
            start = time.perf_counter()
            im.top_k(x_test[top], y_test[top], k=10, verbose=0)
            row["top_k_seconds"] = time.perf_counter() - start
        row["status"] = "finished"
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
        row.update(
            status="error",
            error=f"{type(error).__name__}: {error}"[:400],
            traceback=traceback.format_exc()[-2000:],
        )
    row["peak_mib"] = peak_rss_mb()
    queue.put(("done", row))


def _command(args):
    if args.quick:
        return f"{PYTHON} -m benchmarks.projected_build --model {args.model} --quick"
    parts = [f"{PYTHON} -m benchmarks.projected_build --model {args.model}"]
    defaults = {"num_train": MODELS[args.model][1], "dim": 4096, "epochs": 2, "tests": 10}
    defaults.update(more_tests=100, cases=",".join(CASES), repeats=2, budget_epochs=60)
    for key, default in defaults.items():
        if getattr(args, key) != default:
            parts.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    return " ".join(parts)


def _epochs(seconds, epoch):
    return f"{seconds:.1f} s = **{seconds / epoch:.2f}**"


def _tables(rows, epoch, args):
    """The two markdown tables: the build, then the queries and memory."""
    n, scaled_epoch = args.num_train, epoch * SCALED_TRAIN / args.num_train
    lines = [
        "| case | fit | index pass | of which its first call (traces, check) | per example "
        "after it | Gram `Phi^T Phi` | Cholesky factor | checks and set-up | fit at "
        f"{SCALED_TRAIN:,} examples |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    finished = {label: row for label, row in rows.items() if row["status"] == "finished"}
    for label, row in rows.items():
        if label not in finished:
            lines.append(f"| {label} | {row['status']}: {row.get('error', '')} |||||||")
    for label, row in finished.items():
        case = row["case"]
        fit, growing = row["fit_seconds"], row["growing_seconds"]
        scaled = growing / epoch + (fit - growing) / scaled_epoch
        if case == "ekfac":
            eigh = _epochs(row["eigh_seconds"], epoch)
            cells = ["", "", "", "", f"eigendecomposition: {eigh}", ""]
        else:
            per_example = row["per_example_seconds"]
            gram = _epochs(row["gram_seconds"], epoch)
            if case == "projected_store":
                gram += " (writing and reading back the store, with the pass: "
                gram += f"{_epochs(row['store_seconds'], epoch)})"
            cells = [
                _epochs(row["pass_seconds"], epoch),
                _epochs(row["first_seconds"], epoch),
                f"{per_example * 1e3:.1f} ms; {n:,} of them: **{per_example * n / epoch:.2f}**",
                gram,
                _epochs(row["cholesky_seconds"], epoch),
                _epochs(row["other_seconds"], epoch),
            ]
        cells = [_epochs(fit, epoch), *cells, f"**{scaled:.2f}**"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| case | damping | index dim | explain {args.tests} | explain {args.more_tests} more "
        f"| top-10 of {args.more_tests} others | peak RSS | index | curvature |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in finished.items():
        top = row.get("top_k_seconds")
        index = row.get("index_bytes")
        curvature = f"{row['curvature_bytes'] / 2**20:,.0f} MiB"
        if row.get("gram_file_bytes"):
            curvature += f" (the Gram on disk: {row['gram_file_bytes'] / 2**20:,.0f} MiB)"
        lines.append(
            f"| {label} | {row['damping']:.3g} | {row.get('dim', '')} | "
            f"{_epochs(row['explain_seconds'], epoch)} | {_epochs(row['more_seconds'], epoch)} | "
            f"{'' if top is None else _epochs(top, epoch)} | {row['peak_mib']:,.0f} MiB | "
            f"{'' if index is None else f'{index / 2**20:,.1f} MiB'} | {curvature} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet9", choices=sorted(MODELS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 128 examples, dim 256")
    parser.add_argument("--num-train", type=int, default=None, help="training examples")
    parser.add_argument("--dim", type=int, default=4096, help="Projected's dim")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before the cases")
    parser.add_argument("--tests", type=int, default=10, help="test points of the first answer")
    parser.add_argument("--more-tests", type=int, default=100, help="then other test points")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {CASES}")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each Projected case, interleaved"
    )
    parser.add_argument(
        "--budget-epochs", type=float, default=60, help="a case's time limit, in training epochs"
    )
    parser.add_argument(
        "--max-memory-mib", type=float, default=20000, help="stop a case above this memory"
    )
    args = parser.parse_args(argv)
    what, default_train, args.batch_size = MODELS[args.model]
    args.num_train = args.num_train or default_train
    if args.quick:
        args.num_train, args.dim, args.tests, args.more_tests = 128, 256, 4, 8
        args.budget_epochs, args.repeats = 1000, 1
    args.num_tests = args.tests + 2 * args.more_tests
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")

    x, y, x_test, y_test = load_data(args.model, args.num_train, args.num_tests)
    log(f"training {what} on {args.num_train} examples for {args.epochs} epochs")
    model = build_model(args.model)
    epochs = fit_epochs(model, x, y, args.epochs, args.batch_size)
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    before = float(np.median(epochs[1:] or epochs))
    started = now()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "model.weights.h5")
        model.save_weights(weights)
        # The Projected cases `--repeats` times, interleaved (the load of a shared
        # machine changes from one case to the next); EK-FAC once, last.
        runs = [c for _ in range(args.repeats) for c in cases if c != "ekfac"]
        runs += [c for c in cases if c == "ekfac"]
        for number, case in enumerate(runs):
            label = case
            if case != "ekfac" and args.repeats > 1:
                label = f"{case} #{runs[: number + 1].count(case)}"
            log(f"case {label}")
            row = run_in_child(
                _run_case,
                (case, args.model, weights, os.path.join(folder, str(number)), args),
                args.budget_epochs * before,
                args.max_memory_mib,
                f"{args.budget_epochs:g} epochs",
            )
            rows[label] = dict(row, case=case)
            log(f"{label}: {row}")
    # The machine's load may change during the cases: an epoch is timed again after
    # them, and the times are divided by the mean of the epochs before and after.
    after = fit_epochs(model, x, y, 1, args.batch_size)[0]
    epoch = (before + after) / 2
    trained = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
    print(f"`{_command(args)}`, {started}, {machine()}\n")
    print(
        f"{what}: {model.count_params():,} parameters ({trained:,} trained), "
        f"{args.num_train:,} training examples, batch {args.batch_size}, {args.epochs} epochs "
        f"(test accuracy {accuracy:.3f}); one training epoch: {epoch:.1f} s, the mean of "
        f"{before:.1f} s before the cases and {after:.1f} s after them (the epochs of "
        f"training: {', '.join(f'{s:.1f}' for s in epochs)} s). Times in seconds = **training "
        "epochs**.\n",
        flush=True,
    )
    print("\n".join(_tables(rows, epoch, args)))
    for case, row in rows.items():
        if "traces" in row:
            log(f"{case}: the index pass traced its function {row['traces']} time(s)")
        if row.get("status") == "error":
            log(f"{case}: {row.get('traceback', '')}")
        if "store_files" in row:
            log(f"{case} files: {row['store_files']}")


if __name__ == "__main__":
    main()
