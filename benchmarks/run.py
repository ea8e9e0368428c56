"""Speed and memory of tf_influence: rows 1-4 measured side by side in one run.

Prints one markdown table; every line says the command that reproduces it alone.
Rows (one module each, see their docstrings):

1. ``benchmarks.products``: Hessian-vector product / gradient time.
2. ``benchmarks.explain``: ``explain`` against a careful straightforward implementation.
3. ``benchmarks.scoring``: scoring every training point against the solved vectors.
4. ``benchmarks.scaling``: time and peak memory as the training set grows (writes
   ``time_vs_train_size.png`` into ``--plot-dir``).

The models and data are those of ``benchmarks.common.digits``; they are trained once
and shared by the rows, so that the ratios of one run are measured on the same
models, one after the other on the same machine.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.run                # full run (7-11 min on 2 cores)
    .venv/bin/python -m benchmarks.run --quick        # reduced run (1-2.5 min)
    .venv/bin/python -m benchmarks.run --rows 1,3 --models mlp
"""

from __future__ import annotations

from benchmarks import explain, products, scaling, scoring
from benchmarks.common.session import Session, parse_args

ROWS = {1: products.run, 2: explain.run, 3: scoring.run, 4: scaling.run}


def main(argv=None):
    args = parse_args(argv, rows=tuple(ROWS), description=__doc__.splitlines()[0])
    Session(args).run(ROWS)


if __name__ == "__main__":
    main()
