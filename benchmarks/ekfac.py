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

More tables (``--tables accuracy,queries,dtype,subset`` chooses; the default is
``accuracy``, the table above), at damping ``--query-damping``:

* ``queries``: query batching. ``explain`` of ``--query-tests`` test points (the 360
  test digits, then noisy copies of them) over the training set (``--grow`` times
  the 1,437 training points: the set and noisy copies of it), with ``EKFAC()`` and
  with ``EKFAC(query_rank=r)`` for each ``r`` of ``--query-ranks``: the median
  wall and CPU seconds of ``--repeats`` interleaved calls (the cached solutions
  are dropped before each), the CPU seconds split into test gradients and
  solves, compression and scoring, and Pearson and the top-10 overlap against the
  uncompressed scores.
* ``dtype``: ``EKFAC(factor_dtype="float32")`` against the default float64: the
  bytes of the saved factors, and 1 - Pearson, the largest difference and the
  top-10 overlap of the scores of the ``--tests`` test points against float64's.
* ``subset``: ``EKFAC(max_examples=m)`` for each ``m`` of ``--subsets`` (the factor
  and correction passes on a seeded subset of m training points): Pearson and the
  top-10 overlap of the ``--tests`` test points' scores against EK-FAC on every
  training point and against CG on the Gauss-Newton matrix, and the seconds of
  ``fit`` (median of ``--repeats`` fits, after one that traces), in one run.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.ekfac                     # about 3 minutes
    .venv/bin/python -m benchmarks.ekfac --dampings 0.01 --epochs 30
    .venv/bin/python -m benchmarks.ekfac --model cnn
    .venv/bin/python -m benchmarks.ekfac --tables queries,dtype   # about 5 minutes
    .venv/bin/python -m benchmarks.ekfac --tables queries --grow 10
    .venv/bin/python -m benchmarks.ekfac --tables subset --model cnn
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


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def query_batching(model, data, damping, ranks, repeats):
    """The ``queries`` table: explain time and agreement with and without compression."""
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    models = {}
    for rank in [None, *ranks]:
        im = tfi.InfluenceModel(model)
        im.compile(solver=tfi.solvers.EKFAC(query_rank=rank), damping=damping)
        log(f"queries: fit, query_rank={rank}")
        im.fit(x_train, y_train, batch_size=128, verbose=0)
        im.explain(x_test[:16], y_test[:16], verbose=0)  # traces
        models[rank] = im

    def explain(im):
        im.state.solutions.clear()
        return im.explain(x_test, y_test, verbose=0)

    def clocks():
        return time.perf_counter(), time.process_time()

    def since(start):
        now = clocks()
        return now[0] - start[0], now[1] - start[1]

    times = {rank: {"wall": [], "cpu": [], "solve": [], "compress": []} for rank in models}
    scores = {}
    for repeat in range(repeats):
        for rank, im in models.items():
            log(f"queries: explain, query_rank={rank}, repeat {repeat + 1}")
            start = clocks()
            scores[rank] = explain(im)
            wall, cpu = since(start)
            times[rank]["wall"].append(wall)
            times[rank]["cpu"].append(cpu)
            # The parts: test gradients and solves, then the compression alone.
            im.state.solutions.clear()
            start = clocks()
            solutions = im.state.inverse_hvp_tests(x_test, y_test)
            times[rank]["solve"].append(since(start)[1])
            start = clocks()
            im.state.solver.compress_queries(im.state.operator, solutions)[0][:1].numpy()
            times[rank]["compress"].append(since(start)[1])
    print(
        f"\nquery batching: digits {model.name} ({model.count_params():,} parameters), "
        f"EKFAC at damping {damping:g}, {len(x_test)} test points over "
        f"{len(x_train)} training points; medians of {repeats} interleaved explain calls: "
        "wall seconds, and CPU seconds of the process, split into test gradients and "
        "solves, compression, and scoring (the rest)\n"
    )
    print(
        "| query_rank | layers (rank) | explain, wall s | explain, CPU s | gradients + "
        "solves | compression | scoring | Pearson | top-10 overlap |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    exact = scores[None]
    for rank, im in models.items():
        median = {name: float(np.median(values)) for name, values in times[rank].items()}
        layers = ", ".join(
            f"{name} ({'exact' if r is None else r})"
            for name, r in im.diagnostics.info["query_ranks"].items()
        )
        scoring = median["cpu"] - median["solve"] - median["compress"]
        print(
            f"| {'None' if rank is None else rank} | {layers} | {median['wall']:.2f} | "
            f"{median['cpu']:.2f} | {median['solve']:.2f} | {median['compress']:.2f} | "
            f"{scoring:.2f} | {pearson(scores[rank], exact):.5f} | "
            f"{top_overlap(scores[rank], exact):.2f} |",
            flush=True,
        )


def factor_dtypes(model, data, damping):
    """The ``dtype`` table: float32 factors against float64 ones."""
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    print(
        f"\nfactor dtype: digits {model.name} ({model.count_params():,} parameters), EKFAC "
        f"at damping {damping:g}, {len(x_test)} test points over {len(x_train)}\n"
    )
    print(
        "| factor_dtype | saved factors (KiB) | 1 - Pearson against float64 | "
        "largest difference / largest score | top-10 overlap |"
    )
    print("| --- | --- | --- | --- | --- |")
    reference = None
    for dtype in ("float64", "float32"):
        log(f"dtype: {dtype}")
        im = tfi.InfluenceModel(model)
        im.compile(solver=tfi.solvers.EKFAC(factor_dtype=dtype), damping=damping)
        im.fit(x_train, y_train, batch_size=128, verbose=0)
        size = sum(a.nbytes for a in im.state.solver_state().values()) / 1024
        scores = im.explain(x_test, y_test, verbose=0).astype(np.float64)
        reference = scores if reference is None else reference
        difference = np.abs(scores - reference).max() / np.abs(reference).max()
        print(
            f"| {dtype} | {size:,.0f} | {1 - pearson(scores, reference):.1e} | "
            f"{difference:.1e} | {top_overlap(scores, reference):.2f} |",
            flush=True,
        )


def factor_subsets(model, data, damping, sizes, repeats):
    """The ``subset`` table: ``EKFAC(max_examples=m)`` against every training point."""
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    n = len(x_train)
    print(
        f"\nfactor subsets: digits {model.name} ({model.count_params():,} parameters), EKFAC "
        f"at damping {damping:g}, {len(x_test)} test points over {n}; fit seconds: "
        f"median of {repeats}\n"
    )
    print(
        "| max_examples | fit seconds | Pearson with all | top-10 overlap with all | "
        "Pearson with CG | top-10 overlap with CG |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    expected, _ = run(
        model, data, damping, tfi.solvers.CG(tol=CG_TOL, max_iter=5000), "gauss_newton"
    )
    reference = None
    for size in [None, *sizes]:
        log(f"subset: max_examples={size}")
        seconds = []
        for _ in range(repeats + 1):  # the first traces
            im = tfi.InfluenceModel(model)
            im.compile(solver=tfi.solvers.EKFAC(max_examples=size), damping=damping)
            start = time.perf_counter()
            im.fit(x_train, y_train, batch_size=128, verbose=0)
            seconds.append(time.perf_counter() - start)
        scores = im.explain(x_test, y_test, verbose=0)
        reference = scores if reference is None else reference
        print(
            f"| {size or f'all ({n:,})'} | {np.median(seconds[1:]):.2f} | "
            f"{pearson(scores, reference):.3f} | {top_overlap(scores, reference):.2f} | "
            f"{pearson(scores, expected):.3f} | {top_overlap(scores, expected):.2f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dampings", default=",".join(str(d) for d in DAMPINGS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--tables", default="accuracy")
    parser.add_argument("--query-damping", type=float, default=0.01)
    parser.add_argument("--query-ranks", default="1,4,16")
    parser.add_argument("--query-tests", type=int, default=500)
    parser.add_argument("--grow", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subsets", default="100,300,700", help="max_examples of `subset`")
    args = parser.parse_args(argv)
    import tf_influence as tfi

    tables = set(args.tables.split(","))
    warnings.simplefilter("ignore", UserWarning)
    x_train, y_train, x_test, y_test = digits.load_data()
    model = digits.build_model(args.model)
    log(f"training the digits {args.model} for {args.epochs} epochs")
    model.fit(
        digits.inputs(args.model, x_train), y_train, epochs=args.epochs, batch_size=32, verbose=0
    )
    if "queries" in tables:
        grown = digits.grown(x_train, y_train, args.grow)
        copies = -(-args.query_tests // len(x_test))
        queries = [t[: args.query_tests] for t in digits.grown(x_test, y_test, copies)]
        query_rank_list = [int(r) for r in args.query_ranks.split(",") if r]
        query_batching(
            model,
            (digits.inputs(args.model, grown[0]), grown[1])
            + (digits.inputs(args.model, queries[0]), queries[1]),
            args.query_damping,
            query_rank_list,
            args.repeats,
        )
    x_train, x_test = digits.inputs(args.model, x_train), digits.inputs(args.model, x_test)
    data = (x_train, y_train, x_test[: args.tests], y_test[: args.tests])
    if "dtype" in tables:
        factor_dtypes(model, data, args.query_damping)
    if "subset" in tables:
        sizes = [int(m) for m in args.subsets.split(",") if m]
        factor_subsets(model, data, args.query_damping, sizes, args.repeats)
    if "accuracy" not in tables:
        return
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
