"""Arnoldi (low rank) against Exact: agreement of influence scores by rank, and speed.

Digits MLP 64 -> 32 tanh -> 10 (2,410 parameters, small enough for ``Exact``),
float64, L2(1e-3), Adam 100 epochs, damping 1e-2; 1,437 training points, 20 test
points. For each rank r (iterations 2r), Pearson and Spearman between the
Arnoldi and Exact score matrices (20 x 1,437), and the time of a second
``explain`` on 20 new test points (the index makes scoring one small product).

Usage, from the repository root::

    .venv/bin/python benchmarks/arnoldi.py            # about 2 minutes
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from run import load_data  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import tf_influence as tfi  # noqa: E402

RANKS = (10, 25, 50, 100, 200, 400)
DAMPING = 1e-2


def main():
    x, y, x_test, y_test = load_data()
    x, x_test = x.astype("float64"), x_test.astype("float64")
    keras.backend.set_floatx("float64")  # model.fit of a float64 model with L2 needs it
    keras.utils.set_random_seed(0)
    reg = keras.regularizers.L2(1e-3)
    model = keras.Sequential(
        [
            keras.Input((64,), dtype="float64"),
            keras.layers.Dense(32, activation="tanh", dtype="float64", kernel_regularizer=reg),
            keras.layers.Dense(10, dtype="float64", kernel_regularizer=reg),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=100, batch_size=128, verbose=0)

    def run(solver):
        im = tfi.InfluenceModel(model)
        im.compile(solver=solver, damping=DAMPING)
        start = time.perf_counter()
        im.fit(x, y, batch_size=256, verbose=0)
        fit_seconds = time.perf_counter() - start
        scores = im.explain(x_test[:20], y_test[:20], verbose=0)
        start = time.perf_counter()
        im.explain(x_test[20:40], y_test[20:40], verbose=0)
        return scores, fit_seconds, time.perf_counter() - start

    exact, exact_fit, exact_explain = run("exact")
    print(f"{model.count_params()} parameters, {len(x)} training points, 20 test points")
    print(f"Exact: fit {exact_fit:.2f} s, explain {exact_explain:.3f} s\n")
    print("| rank | iterations | Pearson vs Exact | Spearman (mean per test) | fit s | explain s |")
    print("|---|---|---|---|---|---|")
    for rank in RANKS:
        scores, fit_seconds, explain_seconds = run(tfi.solvers.Arnoldi(rank, 2 * rank))
        pearson = float(np.corrcoef(scores.ravel(), exact.ravel())[0, 1])
        spearman = float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, exact, strict=True)]))
        print(
            f"| {rank} | {2 * rank} | {pearson:.4f} | {spearman:.4f} | {fit_seconds:.2f} | "
            f"{explain_seconds:.3f} |"
        )
    print("\ncommand: .venv/bin/python benchmarks/arnoldi.py")


if __name__ == "__main__":
    main()
