"""Koh & Liang (2017, section 5.4): fraction of flipped labels found vs fraction inspected.

Breast-cancer degree-2 features, 10% labels flipped, L2 logistic regression, float64,
Exact solver; rankings by self-influence, training loss and random; averaged over
seeds. The set-up is ``tf_influence.experiments.mislabel_run`` (shared with the test).

Usage, from the repository root::

    .venv/bin/python -m benchmarks.mislabel            # 10 seeds, about 30 s
"""

from __future__ import annotations

import argparse

import numpy as np

from tf_influence.experiments import load_mislabel_features, mislabel_run

BUDGETS = (0.05, 0.10, 0.20, 0.30)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    x, y = load_mislabel_features()
    rows = {}
    for seed in range(args.seeds):
        curves, _ = mislabel_run(seed, x, y)
        for name, curve in curves.items():
            values = [curve.at(b) for b in BUDGETS] + [curve.mean_found(0.05, 0.30)]
            rows.setdefault(name, []).append(values)
    header = " | ".join(f"found at {b:.0%}" for b in BUDGETS)
    print(f"| ranking | {header} | mean over 5-30% |")
    print("|---" * (len(BUDGETS) + 2) + "|")
    for name, values in rows.items():
        mean = np.mean(values, axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    print(f"\n{args.seeds} seeds; command: .venv/bin/python -m benchmarks.mislabel")


if __name__ == "__main__":
    main()
