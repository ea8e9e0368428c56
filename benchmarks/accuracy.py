"""Accuracy of influence scores against real leave-one-out retraining.

Runs the experiment of ``tests/test_retraining.py`` (L2 logistic regression on
digits 3 vs 8, 3 highest-loss test points, 20 most influential + 20 random
removals each; see ``tests/retraining.py``) for every solver and prints a
markdown table. Usage, from the repository root::

    python benchmarks/accuracy.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.retraining import THRESHOLDS, Experiment, make_solver  # noqa: E402


def main():
    start = time.perf_counter()
    experiment = Experiment()
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
    for name in THRESHOLDS:
        result = experiment.evaluate(make_solver(name), name)
        print(
            f"| {make_solver(name)!r} | {result.pearson.min():.4f} | {result.spearman.min():.4f} "
            f"| {result.slope.min():.2f}-{result.slope.max():.2f} "
            f"| {result.score_error.max():.1e} | {result.explain_seconds:.2f} "
            f"| {result.fit_seconds:.2f} |",
            flush=True,
        )
    print(
        f"\n{experiment.num_retrained} leave-one-out retrainings took "
        f"{experiment.retrain_seconds:.2f} s; total {time.perf_counter() - start:.1f} s."
    )


if __name__ == "__main__":
    main()
