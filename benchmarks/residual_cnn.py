"""Influence on a residual CNN in the middle of training: python -m benchmarks.residual_cnn.

The scenario of issue 18: the residual CNN of ``benchmarks.common.cnn`` (about 1.6M
parameters, Conv2D / BatchNormalization / ReLU blocks with residual adds) on 32x32x3
images made from scikit-learn's digits, 1,500 training examples, trained for
``--epochs`` epochs (2: in the middle of training). The same run times one training
epoch (the last one, traced already), then runs each case: ``fit`` an
``InfluenceModel`` on the training set and ``explain`` ``--tests`` test points, and
reports the seconds, the same time in training epochs, and whether it finished:

* ``cg_gn``: CG on the Gauss-Newton curvature with ``damping="auto"`` (the defaults
  of ``compile()``), with its iterations and the damping chosen;
* ``cg_hessian``: CG on the Hessian with damping 0.01, refused as not positive
  definite (the smallest curvature CG met is reported);
* ``lissa``: LiSSA (depth 100, batch 64) on the Hessian with damping 0.01, as in the
  issue, and ``lissa_gn`` the same on Gauss-Newton with ``damping="auto"``;
* ``arnoldi``: ``Arnoldi(rank=20)`` on Gauss-Newton with ``damping="auto"``;
* ``ekfac`` and ``kfac``: ``EKFAC()`` / ``KFAC()`` with ``damping="auto"`` (from the
  factors' trace); after the first answer the same model also explains
  ``--more-tests`` other test points, timed on their own. ``ekfac_<m>`` /
  ``kfac_<m>``: the same with ``max_examples=m`` (the factor passes read a seeded
  subset of m training examples; every example is still scored). The first
  answers of every factored case are compared with those of ``ekfac`` when both
  ran: Pearson over the score matrix, and the overlap of each test point's 10
  most influential training examples (by absolute score).

Each case runs in a child process (``benchmarks.common.child``) that is stopped
when it exceeds ``--budget-epochs`` training epochs (from the moment its model is
built), and reported as "stopped after N epochs". ``--quick`` is a smoke run: 300
training examples, a budget of 30 epochs. For CG on Gauss-Newton it also times one
product over the training set (one vector), so that the time divides into
iterations and cost per product; and every case reports its peak memory.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
import traceback

import numpy as np

from benchmarks.common import cnn
from benchmarks.common.child import run_in_child
from benchmarks.common.report import markdown_table
from benchmarks.common.timing import log, peak_rss_mb

CASES = ("cg_gn", "cg_hessian", "lissa", "lissa_gn", "arnoldi", "ekfac", "kfac")
# A factored case on a subset of the training data: ekfac_300, kfac_500, ...
SUBSET = re.compile(r"(ekfac|kfac)_([0-9]+)")
CG_TOL = 1e-5  # relative residual float32 reaches (benchmarks.common.digits)
CG_MAX_ITER = 1000
HESSIAN_DAMPING = 0.01


def _settings(case):
    """``(solver, damping, curvature)`` of a case."""
    import tf_influence as tfi

    subset = SUBSET.fullmatch(case)
    if subset is not None:
        kind, count = subset.groups()
        solver = {"ekfac": tfi.solvers.EKFAC, "kfac": tfi.solvers.KFAC}[kind]
        return solver(max_examples=int(count)), "auto", "gauss_newton"
    cg = tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER)
    lissa = tfi.solvers.LiSSA(recursion_depth=100, batch_size=64)
    return {
        "cg_gn": (cg, "auto", "gauss_newton"),
        "cg_hessian": (cg, HESSIAN_DAMPING, "hessian"),
        "lissa": (lissa, HESSIAN_DAMPING, "hessian"),
        "lissa_gn": (lissa, "auto", "gauss_newton"),
        "arnoldi": (tfi.solvers.Arnoldi(rank=20), "auto", "gauss_newton"),
        "ekfac": (tfi.solvers.EKFAC(), "auto", "gauss_newton"),
        "kfac": (tfi.solvers.KFAC(), "auto", "gauss_newton"),
    }[case]


def _factored(case):
    return case in ("ekfac", "kfac") or SUBSET.fullmatch(case) is not None


def _run_case(case, weights, num_train, num_tests, batch_size, more_tests, folder, queue):
    """In the child: build the model, load ``weights``, fit and explain; report to ``queue``.

    A factored case keeps its first answer's scores in ``folder`` (``<case>.npy``).
    """
    import warnings

    import tf_influence as tfi

    data = cnn.load_data(num_train)
    model = cnn.build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the optimizer's state is not loaded
        model.load_weights(weights)
    solver, damping, curvature = _settings(case)
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping, curvature=curvature)
    x_train, y_train, x_test, y_test = data
    queue.put(("ready", time.time()))
    row = {}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            im.fit(x_train, y_train, batch_size=batch_size, verbose=0)
            row["fit_seconds"] = time.perf_counter() - start
            scores = im.explain(x_test[:num_tests], y_test[:num_tests], verbose=0)
        row["seconds"] = time.perf_counter() - start
        if _factored(case):
            np.save(os.path.join(folder, f"{case}.npy"), scores)
        diagnostics = im.diagnostics
        row.update(
            status="finished",
            damping=float(im.damping),
            iterations=diagnostics.iterations,
            converged=bool(diagnostics.all_converged),
            residual=float(max(diagnostics.residual_norm)),
            finite=bool(scores.size and (abs(scores) < float("inf")).all()),
            warnings=[str(w.message)[:160] for w in caught],
        )
        if _factored(case) and more_tests:
            more = slice(num_tests, num_tests + more_tests)
            again = time.perf_counter()
            im.explain(x_test[more], y_test[more], verbose=0)
            row["more_seconds"] = time.perf_counter() - again
            row["more_tests"] = len(x_test[more])
        if case == "cg_gn":
            import tensorflow as tf

            vector = tf.random.stateless_normal([im.num_params, 1], [0, 1])
            im.operator.matvec(vector).numpy()
            product = time.perf_counter()
            im.operator.matvec(vector).numpy()
            row["product_seconds"] = time.perf_counter() - product
    except tfi.solvers.CurvatureError as error:
        row.update(status="refused", seconds=time.perf_counter() - start, error=str(error))
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
        row.update(
            status="error",
            seconds=time.perf_counter() - start,
            error=f"{type(error).__name__}: {error}"[:400],
            traceback=traceback.format_exc()[-2000:],
        )
    row["peak_mib"] = peak_rss_mb()
    queue.put(("done", row))


def run_case(case, weights, args, epoch_seconds, folder):
    """One case in a child process, stopped after ``args.budget_epochs`` training epochs."""
    budget = args.budget_epochs * epoch_seconds
    row = run_in_child(
        _run_case,
        (case, weights, args.num_train, args.tests, args.batch_size, args.more_tests, folder),
        budget,
        args.max_memory_mib,
        f"{args.budget_epochs:g} epochs",
    )
    row.setdefault("seconds", budget)  # stopped: it used its budget
    row["epochs"] = row["seconds"] / epoch_seconds
    if "product_seconds" in row:
        row["product_epochs"] = row["product_seconds"] / epoch_seconds
    if "more_seconds" in row:
        row["more_epochs"] = row["more_seconds"] / epoch_seconds
    return row


def agreement(folder, cases, top=10):
    """Per factored case: ``(Pearson with ekfac's scores, mean top-``top`` overlap)``."""
    path = os.path.join(folder, "ekfac.npy")
    if not os.path.exists(path):
        return {}
    reference = np.load(path)
    found = {}
    for case in cases:
        mine = os.path.join(folder, f"{case}.npy")
        if case == "ekfac" or not os.path.exists(mine):
            continue
        scores = np.load(mine)
        pearson = float(np.corrcoef(scores.ravel(), reference.ravel())[0, 1])
        overlaps = [
            len(set(np.argsort(-np.abs(a))[:top]) & set(np.argsort(-np.abs(b))[:top])) / top
            for a, b in zip(scores, reference, strict=True)
        ]
        found[case] = (pearson, float(np.mean(overlaps)))
    return found


def _smallest_curvature(error):
    found = re.search(r"= (-?[0-9.]+e[-+][0-9]+) <= 0", error)
    return found.group(1) if found else None


def describe(case, row, args):
    """The table's last column: what happened."""
    status = row["status"]
    if status.startswith(("stopped", "died")):
        return status
    if status == "refused":
        error = row["error"]
        smallest = _smallest_curvature(error)
        if smallest is not None:
            return f"refused: not positive definite (curvature {float(smallest):.3g})"
        if "diverged" in error:
            return "refused: diverged (" + error.split(":")[0] + ")"
        return "refused: " + error[:120]
    if status == "error":
        return "error: " + row["error"][:160]
    text = f"finished, damping {row['damping']:.3g}"
    if case.startswith("cg"):
        text += f", {row['iterations']} CG iterations"
    text += (
        ", converged" if row["converged"] else f", not converged (residual {row['residual']:.2g})"
    )
    if "more_seconds" in row:
        text += (
            f"; then {row['more_tests']} more test points in {row['more_seconds']:.1f} s"
            f" = {row['more_epochs']:.2f} epochs"
        )
    if "product_seconds" in row:
        text += f"; one product {row['product_seconds']:.1f} s = {row['product_epochs']:.2f} epochs"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 examples, budget 30 epochs")
    parser.add_argument("--num-train", type=int, default=cnn.NUM_TRAIN)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before the cases")
    parser.add_argument(
        "--budget-epochs", type=float, default=120, help="a case's time limit, in training epochs"
    )
    parser.add_argument(
        "--max-memory-mib", type=float, default=12000, help="stop a case above this memory"
    )
    parser.add_argument("--tests", type=int, default=3, help="test points to explain")
    parser.add_argument(
        "--more-tests",
        type=int,
        default=100,
        help="ekfac/kfac: other test points explained after the first answer",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="InfluenceModel.fit's batches")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {CASES}")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.budget_epochs = 300, 30
    cases = [case for case in args.cases.split(",") if case]
    unknown = sorted(c for c in set(cases) - set(CASES) if SUBSET.fullmatch(c) is None)
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)} or ekfac_<m>, kfac_<m>")

    data = cnn.load_data(args.num_train)
    log(f"training the residual CNN on {args.num_train} examples for {args.epochs} epochs")
    model, accuracy, epoch_seconds = cnn.train_model(data, epochs=args.epochs)
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "model.weights.h5")
        model.save_weights(weights)
        print(
            f"residual CNN: {model.count_params():,} parameters "
            f"({sum(int(v.shape.num_elements()) for v in model.trainable_variables):,} "
            f"trainable), {args.num_train} training examples, {args.epochs} epochs "
            f"(test accuracy {accuracy:.3f}); one training epoch: {epoch_seconds:.1f} s"
        )
        print(
            f"fit + explain of {args.tests} test points, batch size {args.batch_size}, "
            f"budget {args.budget_epochs:g} epochs per case "
            f"({args.budget_epochs * epoch_seconds:.0f} s)"
        )
        print("\n| case | curvature | damping | seconds | training epochs | peak MiB | outcome |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for case in cases:
            log(f"case {case}")
            row = run_case(case, weights, args, epoch_seconds, folder)
            _, damping, curvature = _settings(case)
            seconds = f"{row['seconds']:.0f}"
            if row.get("fit_seconds") is not None:
                seconds += f" (fit {row['fit_seconds']:.0f})"
            print(
                f"| {case} | {curvature} | {damping} | {seconds} | {row['epochs']:.1f} | "
                f"{row.get('peak_mib', float('nan')):.0f} | {describe(case, row, args)} |",
                flush=True,
            )
            if row["status"] == "error":
                log(row.get("traceback", ""))
            for message in row.get("warnings", []):
                log(f"{case} warning: {message}")
        found = agreement(folder, cases)
        if found:
            print(f"\nFirst answers against `ekfac` ({args.tests} test points):\n")
            columns = ("case", "Pearson of the scores", "top-10 overlap per test point")
            rows = [(case, f"{p:.3f}", f"{o:.2f}") for case, (p, o) in found.items()]
            print("\n".join(markdown_table(columns, rows)))


if __name__ == "__main__":
    main()
