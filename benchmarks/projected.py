"""Projected-gradient influence on the digits MLP: faithfulness, build time, queries, serving.

Digits MLP 64 -> 128 tanh -> 128 tanh -> 10 (26,122 parameters, float32, trained
30 epochs as in ``benchmarks.common.digits``), 1,437 training points, 20 test
points, damping 1e-2. The reference is the full-dimensional Gauss-Newton influence,
``-g_test^T inv(G + damping*I) g_j`` with CG on the Gauss-Newton matrix (``tol``
1e-7). For each projection, ``dim`` and curvature in the projected space
(``fisher="empirical"``: ``Phi^T Phi / n``; ``fisher="true"``: ``P^T G P`` from one
sampled output draw per example, or from the exact expectation over the draws):

* Pearson (all scores) and mean Spearman (per test point) against the reference;
* ``fit`` (the index pass, the curvature, its Cholesky factor, the first traces),
  and a rebuild with the traces kept (``state.refresh()``: the steady cost), in
  seconds and in training epochs of the same model (``model.fit``, batch 32, the
  median of epochs 2 to 4);
* the latency of one test point's top-10 (median of 5, after a first call).

A first row gives the same influence without projection and the empirical Fisher
as the curvature, ``-g_test^T inv(G^T G / n + damping*I) g_j`` in float64 (the
Woodbury identity, an ``n x n`` solve): how far that curvature alone is from the
reference.

Then, for ``dim=1024`` (Kronecker) and the training set grown with noisy copies
(``digits.grown``), the SavedModel ``export`` writes: its size, the time to load
it (``tf.saved_model.load``) and the latency of one ``explain`` request.

``--memory DIM`` measures one case instead: the peak resident memory (``VmHWM``)
of ``fit`` at ``dim = DIM``, then of ``explain`` on 100 test points and of
``self_influence``, on the same model (the damping of the LDS runs, 1e-3, or
``--damping auto``). Run it on two versions of the code to compare them.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.projected            # about 10 minutes
    .venv/bin/python -m benchmarks.projected --quick    # dims 1024, 4096; no serving
    .venv/bin/python -m benchmarks.projected --memory 16384 --fisher empirical
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import digits
from benchmarks.common.timing import fit_epochs, log, peak_rss_mb, reset_peak, status_mib

DAMPING = 1e-2
DIMS = (256, 1024, 4096)
KINDS = ("kronecker", "gaussian")
# (label, Projected arguments) of the curvatures in the projected space.
CURVATURES = (
    ("empirical", {"fisher": "empirical"}),
    ("GN, 1 draw", {"fisher": "true", "samples": 1}),
    ("GN, exact", {"fisher": "true", "samples": "exact"}),
)
CG_TOL = 1e-7
SERVING_FACTORS = (1, 10, 70)


def reference_scores(im, x, y, x_test, y_test):
    """``-g_test^T inv(G^T G / n + damping*I) G^T`` in float64 (Woodbury: n x n solve)."""
    grads = []
    for start in range(0, len(x), 256):
        grads.append(im.state.gradients(x[start : start + 256], y[start : start + 256]).numpy())
    g = np.concatenate(grads).astype(np.float64)  # (n, p)
    tests = im.state.gradients(x_test, y_test).numpy().astype(np.float64)
    n = len(g)
    # inv(G^T G / n + d I) = (I - G^T inv(n d I + G G^T) G) / d
    cross = tests @ g.T  # (k, n)
    inner = np.linalg.solve(n * DAMPING * np.eye(n) + g @ g.T, g @ g.T)  # (n, n)
    return -(cross - cross @ inner) / DAMPING


def agreement(scores, reference):
    from scipy.stats import pearsonr, spearmanr

    pearson = float(pearsonr(scores.ravel(), reference.ravel())[0])
    spearman = float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, reference, strict=True)]))
    return pearson, spearman


def latency(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def directory_bytes(path):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def gauss_newton_scores(model, x, y, x_test, y_test):
    """The reference: CG on the Gauss-Newton matrix at ``CG_TOL``, ``(k, n)``."""
    import tf_influence as tfi

    im = tfi.InfluenceModel(model)
    im.compile(
        solver=tfi.solvers.CG(tol=CG_TOL, max_iter=5000), damping=DAMPING, curvature="gauss_newton"
    )
    im.fit(x, y, batch_size=128, verbose=0)
    return im.explain(x_test, y_test, verbose=0)


def memory(dim, projection, fisher, damping):
    """Prints the peak resident memory of ``fit``, ``explain`` and ``self_influence``."""
    import tf_influence as tfi

    data = digits.load_data()
    x, y, x_test, y_test = data
    model, _ = digits.train_model("mlp", data)
    im = tfi.InfluenceModel(model)
    solver = tfi.solvers.Projected(dim=dim, projection=projection, fisher=fisher)
    im.compile(solver=solver, damping=damping)
    print(
        f"| step | seconds | peak RSS | above the RSS before it |  (dim {dim}, {projection}, "
        f"fisher={fisher}, damping={damping})"
    )
    print("| --- | ---: | ---: | ---: |")
    steps = (
        ("fit", lambda: im.fit(x, y, verbose=0)),
        ("explain, 100 test points", lambda: im.explain(x_test[:100], y_test[:100], verbose=0)),
        ("self_influence", lambda: im.self_influence(verbose=0)),
    )
    for name, step in steps:
        before = status_mib("VmRSS")
        if not reset_peak():
            log("cannot reset the peak RSS here: every peak is the process's")
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = peak_rss_mb()
        print(
            f"| {name} | {seconds:.1f} | {peak:,.0f} MiB | {peak - before:,.0f} MiB |", flush=True
        )
    log(f"index dim {im.state.index_inverse.projection.dim}, damping {im.state.damping:.3g}")


def main(argv=None):
    import tensorflow as tf

    import tf_influence as tfi

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="dims 1024 and 4096, no serving")
    parser.add_argument("--memory", type=int, metavar="DIM", help="peak memory of one case")
    parser.add_argument("--projection", default="kronecker", choices=KINDS + ("rademacher",))
    parser.add_argument("--fisher", default="true", choices=("true", "empirical"))
    parser.add_argument("--damping", default="1e-3", help='a number or "auto" (--memory)')
    args = parser.parse_args(argv)
    if args.memory is not None:
        damping = args.damping if args.damping == "auto" else float(args.damping)
        memory(args.memory, args.projection, args.fisher, damping)
        return
    dims = DIMS[1:] if args.quick else DIMS
    # Every fit computes its own curvature (no value found from an earlier one).
    tfi.engine.HessianOperator.share_values = False
    data = digits.load_data()
    x, y, x_test, y_test = data
    x_test, y_test = x_test[: digits.NUM_TESTS], y_test[: digits.NUM_TESTS]
    model, accuracy = digits.train_model("mlp", data)
    epoch = float(np.median(fit_epochs(digits.build_model("mlp"), x, y, 4, 32)[1:]))
    log(f"digits MLP: test accuracy {accuracy:.3f}; one training epoch {epoch:.2f} s")

    log("reference: CG on the Gauss-Newton matrix")
    reference = gauss_newton_scores(model, x, y, x_test, y_test)
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.Projected(dim=8), damping=DAMPING)
    im.fit(x[:32], y[:32], verbose=0)
    pearson, spearman = agreement(reference_scores(im, x, y, x_test, y_test), reference)
    print(
        "| projection | dim | curvature | Pearson | Spearman | fit | rebuild | rebuild / epoch "
        "| top-10 of 1 point |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| none | {im.num_params} | empirical | {pearson:.3f} | {spearman:.3f} | | | | |")
    for kind in KINDS:
        for dim in dims:
            for label, options in CURVATURES:
                log(f"{kind} {dim} {label}")
                im = tfi.InfluenceModel(model)
                solver = tfi.solvers.Projected(dim=dim, projection=kind, **options)
                im.compile(solver=solver, damping=DAMPING)
                start = time.perf_counter()
                im.fit(x, y, verbose=0)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                im.state.refresh()
                rebuild = time.perf_counter() - start
                scores = im.explain(x_test, y_test, verbose=0)
                pearson, spearman = agreement(scores, reference)
                query = latency(lambda im=im: im.top_k(x_test[:1], y_test[:1], k=10, verbose=0))
                used = im.state.index_inverse.projection.dim
                print(
                    f"| {kind} | {used} | {label} | {pearson:.3f} | {spearman:.3f} | "
                    f"{seconds:.1f} s | {rebuild:.1f} s | {rebuild / epoch:.1f} | "
                    f"{query * 1e3:.1f} ms |",
                    flush=True,
                )
    if args.quick:
        return
    print()
    print("| n_train | index | SavedModel | load | one explain request |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for factor in SERVING_FACTORS:
        grown_x, grown_y = digits.grown(x, y, factor)
        im = tfi.InfluenceModel(model)
        # The curvature does not change what the SavedModel holds: the cheapest one.
        solver = tfi.solvers.Projected(dim=1024, fisher="empirical")
        im.compile(solver=solver, damping=DAMPING)
        im.fit(grown_x, grown_y, batch_size=256, verbose=0)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "1")
        try:
            im.export(path, top_k=10)
            size = directory_bytes(path)
            start = time.perf_counter()
            loaded = tf.saved_model.load(path)
            load = time.perf_counter() - start
            signature = loaded.signatures["explain"]
            name = next(k for k in signature.structured_input_signature[1] if k != "labels")
            request = {name: tf.constant(x_test[:1]), "labels": tf.constant(y_test[:1])}
            served = latency(lambda s=signature, r=request: s(**r))
        finally:
            shutil.rmtree(folder)
        index = len(grown_x) * im.state.index_inverse.projection.dim * 4
        print(
            f"| {len(grown_x):,} | {index / 2**20:.0f} MiB | {size / 2**20:.0f} MiB | "
            f"{load:.1f} s | {served * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
