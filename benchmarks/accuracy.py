"""How well do influence scores predict real leave-one-out retraining?

Runs the experiment of ``tests/test_retraining.py`` (``tf_influence.experiments.
LeaveOneOut``: L2 logistic regression on digits 3 vs 8, the 3 highest-loss test
points, the 20 most influential and 20 random removals each, retrained in closed
form) for every solver and prints a markdown table. Writes
``loo_predicted_vs_actual.png`` (predicted ``-scores / n`` against the actual change
of the test loss, ``Exact``) into ``--plot-dir`` and prints the points it shows.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.accuracy            # about 30 s
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common.report import add_plot_dir_argument, pyplot, save_figure
from tf_influence.experiments import LOO_THRESHOLDS, LeaveOneOut, loo_solver

COMMAND = ".venv/bin/python -m benchmarks.accuracy"
PLOT = "loo_predicted_vs_actual.png"
PLOTTED_SOLVER = "Exact"


def plot(experiment, result, plot_dir):
    """Predicted against actual change, one colour per test point, and the line y = x."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 4.5))
    for i, index in enumerate(experiment.test_index):
        axes.scatter(
            result.predicted[i],
            result.actual[i],
            s=14,
            label=f"test point {index} (Pearson {result.pearson[i]:.3f})",
        )
    values = np.concatenate([result.predicted.ravel(), result.actual.ravel()])
    low, high = float(values.min()), float(values.max())
    axes.plot([low, high], [low, high], ":", color="gray", label="actual = predicted")
    axes.set_xlabel("predicted change of the test loss, -scores / n")
    axes.set_ylabel("actual change after retraining without the point")
    axes.set_title(
        f"Leave-one-out, logistic regression on digits 3 vs 8 ({result.solver})", fontsize=9
    )
    axes.legend(fontsize=7)
    axes.grid(True, alpha=0.3)
    return save_figure(figure, plot_dir, PLOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plot_dir_argument(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    experiment = LeaveOneOut()
    print(
        f"L2 logistic regression, digits 3 vs 8: n_train={experiment.n}, "
        f"{experiment.theta_hat.size} parameters, l2={experiment.l2:g}; test points "
        f"{experiment.test_index.tolist()} (losses {experiment.base_losses.round(3).tolist()})\n"
    )
    print(
        "| solver | Pearson (min over test points) | Spearman (min) | slope actual/predicted "
        "| rel. error vs closed form (max) | seconds to explain | seconds to fit |"
    )
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name in LOO_THRESHOLDS:
        result = results[name] = experiment.evaluate(loo_solver(name), name)
        print(
            f"| {loo_solver(name)!r} | {result.pearson.min():.4f} | {result.spearman.min():.4f} "
            f"| {result.slope.min():.2f}-{result.slope.max():.2f} "
            f"| {result.score_error.max():.1e} | {result.explain_seconds:.2f} "
            f"| {result.fit_seconds:.2f} |",
            flush=True,
        )
    print(
        f"\n{experiment.num_retrained} leave-one-out retrainings took "
        f"{experiment.retrain_seconds:.2f} s; total {time.perf_counter() - start:.1f} s."
    )
    result = results[PLOTTED_SOLVER]
    if args.plot_dir:
        plot(experiment, result, args.plot_dir)
    print(f"\nPoints of {PLOT} ({PLOTTED_SOLVER}; `{COMMAND}`):\n")
    print("| test point | removed training point | predicted -scores/n | actual change |")
    print("|---|---|---|---|")
    for i, index in enumerate(experiment.test_index):
        for j, predicted, actual in zip(
            result.removed[i], result.predicted[i], result.actual[i], strict=True
        ):
            print(f"| {index} | {j} | {predicted:.6f} | {actual:.6f} |")


if __name__ == "__main__":
    main()
