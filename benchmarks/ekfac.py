"""K-FAC and EK-FAC against the exact Gauss-Newton inverse: python -m benchmarks.ekfac.

On the digits MLP of ``benchmarks.common.digits`` (64 -> 128 tanh -> 128 tanh -> 10
logits, 26k parameters, L2 1e-4, ``--epochs`` epochs of Adam), or its CNN
(``--model cnn``: Conv2D(16) -> Conv2D(32) -> Dense(10)), for each damping
of ``--dampings``: the score matrix of ``--tests`` test points over the 1,437
training points from CG on the Gauss-Newton matrix at a tight tolerance (the exact
answer of that curvature), and from ``KFAC`` and ``EKFAC`` (one sampled output
draw per example, and the exact expectation over the draws). Reports Pearson and
Spearman of each against CG over the whole score matrix, the top-10 overlap per
test point, and the seconds of ``fit`` + ``explain``, all in one run.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.ekfac                     # about 3 minutes
    .venv/bin/python -m benchmarks.ekfac --dampings 0.01 --epochs 30
    .venv/bin/python -m benchmarks.ekfac --model cnn
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks.common import digits
from benchmarks.common.timing import log

CG_TOL = 1e-7
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)


def spearman(a, b):
    ranks_a = np.argsort(np.argsort(a))
    ranks_b = np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def top_overlap(scores, expected, k=10):
    found = np.argsort(-scores, axis=1)[:, :k]
    wanted = np.argsort(-expected, axis=1)[:, :k]
    return float(np.mean([len(set(f) & set(w)) / k for f, w in zip(found, wanted, strict=True)]))


def methods():
    import tf_influence as tfi

    return {
        "kfac": lambda: tfi.solvers.KFAC(),
        "kfac (exact draws)": lambda: tfi.solvers.KFAC(samples="exact"),
        "ekfac": lambda: tfi.solvers.EKFAC(),
        "ekfac (exact draws)": lambda: tfi.solvers.EKFAC(samples="exact"),
    }


def run(model, data, damping, solver, curvature=None):
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    im = tfi.InfluenceModel(model)
    kwargs = {} if curvature is None else {"curvature": curvature}
    im.compile(solver=solver, damping=damping, **kwargs)
    start = time.perf_counter()
    im.fit(x_train, y_train, batch_size=128, verbose=0)
    scores = im.explain(x_test, y_test, verbose=0)
    return scores, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dampings", default=",".join(str(d) for d in DAMPINGS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    args = parser.parse_args(argv)
    import tf_influence as tfi

    warnings.simplefilter("ignore", UserWarning)
    x_train, y_train, x_test, y_test = digits.load_data()
    x_train, x_test = digits.inputs(args.model, x_train), digits.inputs(args.model, x_test)
    data = (x_train, y_train, x_test[: args.tests], y_test[: args.tests])
    model = digits.build_model(args.model)
    log(f"training the digits {args.model} for {args.epochs} epochs")
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, verbose=0)
    print(
        f"\ndigits {args.model}, {model.count_params():,} parameters, {len(x_train)} "
        f"training points, {args.tests} test points, {args.epochs} epochs; "
        f"reference: CG(tol={CG_TOL:g}) on the Gauss-Newton matrix\n"
    )
    print("| damping | method | Pearson | Spearman | top-10 overlap | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for damping in [float(d) for d in args.dampings.split(",") if d]:
        log(f"damping {damping:g}: CG")
        expected, seconds = run(
            model, data, damping, tfi.solvers.CG(tol=CG_TOL, max_iter=5000), "gauss_newton"
        )
        print(f"| {damping:g} | CG (reference) | 1 | 1 | 1 | {seconds:.1f} |", flush=True)
        for name, make in methods().items():
            log(f"damping {damping:g}: {name}")
            scores, seconds = run(model, data, damping, make())
            pearson = float(np.corrcoef(scores.ravel(), expected.ravel())[0, 1])
            print(
                f"| {damping:g} | {name} | {pearson:.3f} | "
                f"{spearman(scores.ravel(), expected.ravel()):.3f} | "
                f"{top_overlap(scores, expected):.2f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
