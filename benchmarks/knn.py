"""kNN narrowing (FastIF): speed-up of scoring and recall of the full top-10.

Digits MLP of ``benchmarks.common.digits`` (26,122 parameters, CG, damping 1e-2), the
training set grown 10x with noisy copies (14,370 examples) as in row 4 (``benchmarks.scaling``); 20
test points. For each number of candidates k (nearest training examples in the
feature space of the second hidden layer), times ``explain(..., candidates=k)``
against the full ``explain`` (both after the solutions are cached, so the
timings compare scoring plus the search, not the solve), and reports the recall
of the full top-10 harmful and top-10 helpful examples among the candidates'
top-10. Usage, from the repository root::

    .venv/bin/python -m benchmarks.knn            # about 1 minute
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common.digits import DAMPING, NUM_TESTS, grown, load_data, train_model

FACTOR = 10
KS = (100, 300, 1000, 3000)
LAYER = 2  # the second hidden layer's output


def recall(full_indices, found_indices):
    hits = [len(set(a) & set(b)) for a, b in zip(full_indices, found_indices, strict=True)]
    return float(np.mean(hits)) / full_indices.shape[1]


def main(argv=None):
    import tf_influence as tfi

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    data = load_data()
    model, _ = train_model("mlp", data, 30)
    x_train, y_train, x_test, y_test = data
    x, y = grown(x_train, y_train, FACTOR)
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.CG(tol=1e-5), damping=DAMPING["mlp"])
    im.fit(x, y, batch_size=128, verbose=0)
    tx, ty = x_test[:NUM_TESTS], y_test[:NUM_TESTS]
    layer = model.layers[LAYER - 1].name

    full_top = im.top_k(tx, ty, k=10, verbose=0)  # solves and caches; traces scoring
    start = time.perf_counter()
    full_top = im.top_k(tx, ty, k=10, verbose=0)
    full_seconds = time.perf_counter() - start
    print(f"{len(x)} training examples, {NUM_TESTS} test points, features of layer {layer!r}")
    print(f"full top-10: {full_seconds:.2f} s (scoring every training example)\n")
    print("| candidates k | seconds | speed-up | recall of top-10 harmful | of top-10 helpful |")
    print("|---|---|---|---|---|")
    for k in KS:
        im.top_k(tx, ty, k=10, candidates=k, feature_layer=layer, verbose=0)  # warm-up
        start = time.perf_counter()
        found = im.top_k(tx, ty, k=10, candidates=k, feature_layer=layer, verbose=0)
        seconds = time.perf_counter() - start
        harmful = recall(full_top.harmful_indices, found.harmful_indices)
        helpful = recall(full_top.helpful_indices, found.helpful_indices)
        print(
            f"| {k} | {seconds:.2f} | {full_seconds / seconds:.1f}x | {harmful:.2f} | "
            f"{helpful:.2f} |"
        )
    print("\ncommand: .venv/bin/python -m benchmarks.knn")


if __name__ == "__main__":
    main()
