"""How close does Arnoldi (low rank) come to Exact as its rank grows, and how fast is it?

Digits MLP 64 -> 32 tanh -> 10 (2,410 parameters, small enough for ``Exact``),
float64, L2(1e-3), Adam 100 epochs, damping 1e-2; 1,437 training points, 20 test
points. For each rank r (iterations 2r), Pearson and Spearman between the
Arnoldi and Exact score matrices (20 x 1,437), and the time of a second
``explain`` on 20 new test points (the index makes scoring one small product).
Writes ``arnoldi_rank.png`` (agreement with Exact against rank) into ``--plot-dir``.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.arnoldi            # about 2 minutes
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common.digits import load_data
from benchmarks.common.report import add_plot_dir_argument, pyplot, save_figure

RANKS = (10, 25, 50, 100, 200, 400)
DAMPING = 1e-2
COMMAND = ".venv/bin/python -m benchmarks.arnoldi"
PLOT = "arnoldi_rank.png"


def trained_model(x, y):
    """The float64 tanh MLP, trained with Adam for 100 epochs."""
    import keras

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
    return model


def plot(rows, plot_dir):
    """Pearson and mean Spearman against Exact, by rank (log scale)."""
    plt = pyplot()
    ranks = [row["rank"] for row in rows]
    figure, axes = plt.subplots(figsize=(5, 3.8))
    axes.plot(ranks, [row["pearson"] for row in rows], "o-", label="Pearson (all scores)")
    axes.plot(
        ranks, [row["spearman"] for row in rows], "s-", label="Spearman (mean per test point)"
    )
    axes.axhline(1.0, color="gray", linestyle=":")
    axes.set_xscale("log")
    axes.set_xticks(ranks, [str(r) for r in ranks])
    axes.minorticks_off()
    axes.set_xlabel("Arnoldi rank (iterations = 2 x rank)")
    axes.set_ylabel("agreement with Exact")
    axes.set_title("Arnoldi vs Exact, digits MLP (2,410 parameters)", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    return save_figure(figure, plot_dir, PLOT)


def main(argv=None):
    from scipy.stats import spearmanr

    import tf_influence as tfi

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plot_dir_argument(parser)
    args = parser.parse_args(argv)
    x, y, x_test, y_test = load_data()
    x, x_test = x.astype("float64"), x_test.astype("float64")
    model = trained_model(x, y)

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
    rows = []
    for rank in RANKS:
        scores, fit_seconds, explain_seconds = run(tfi.solvers.Arnoldi(rank, 2 * rank))
        pearson = float(np.corrcoef(scores.ravel(), exact.ravel())[0, 1])
        spearman = float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, exact, strict=True)]))
        rows.append({"rank": rank, "pearson": pearson, "spearman": spearman})
        print(
            f"| {rank} | {2 * rank} | {pearson:.4f} | {spearman:.4f} | {fit_seconds:.2f} | "
            f"{explain_seconds:.3f} |",
            flush=True,
        )
    print(f"\ncommand: {COMMAND}; {PLOT} plots the Pearson and Spearman columns by rank.")
    if args.plot_dir:
        plot(rows, args.plot_dir)


if __name__ == "__main__":
    main()
