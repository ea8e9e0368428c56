"""How many recycled directions CG should keep: iterations and time per ``explain``.

Same models, data and settings as row 2 (``benchmarks.explain``) (CG tol 1e-5, B=128). For each
``CG(recycle=m)``, one model explains 20 test points, then ``CALLS`` more sets of 20
new test points; each later call prints its seconds, block-CG iterations and the
number of directions it started from. Iteration counts are deterministic; times
vary with the machine's load.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.recycle                    # both models, ~3 min
    .venv/bin/python -m benchmarks.recycle --models mlp --keep 0,256,512
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import digits

CALLS = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument(
        "--keep",
        default="0,auto,256,512,1024",
        help='comma-separated values of CG(recycle=...): integers or "auto"',
    )
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.keep = [v if v == "auto" else int(v) for v in args.keep.split(",") if v]
    for name in args.models:
        if name not in digits.DAMPING:
            parser.error(f"--models: unknown model {name!r}; choose from {sorted(digits.DAMPING)}")
    return args


def main(argv=None):
    import tf_influence as tfi
    from tf_influence.solvers.cg import RECYCLE_BUDGET
    from tf_influence.solvers.recycling import recycle_capacity

    args = parse_args(argv)
    data = digits.load_data()
    x_train, y_train, x_test, y_test = data
    print("| model | recycle | later calls: seconds (iterations, directions kept before) |")
    print("|---|---|---|")
    for name in args.models:
        model, _ = digits.train_model(name, data, digits.EPOCHS)
        x = digits.inputs(name, x_train)
        for keep in args.keep:
            im = tfi.InfluenceModel(model)
            im.compile(
                solver=tfi.solvers.CG(tol=digits.CG_TOL, max_iter=digits.CG_MAX_ITER, recycle=keep),
                damping=digits.DAMPING[name],
            )
            im.fit(x, y_train, batch_size=128, verbose=0)
            im.explain(
                digits.inputs(name, x_test[: digits.NUM_TESTS]),
                y_test[: digits.NUM_TESTS],
                verbose=0,
            )
            if keep == "auto":
                keep = f"auto ({recycle_capacity(im.operator, keep, RECYCLE_BUDGET)})"
            cells = []
            for call in range(1, CALLS + 1):
                part = slice(call * digits.NUM_TESTS, (call + 1) * digits.NUM_TESTS)
                start = time.perf_counter()
                im.explain(digits.inputs(name, x_test[part]), y_test[part], verbose=0)
                seconds = time.perf_counter() - start
                info = im.diagnostics.info.get("recycled_directions", 0)
                cells.append(f"{seconds:.2f} ({im.diagnostics.iterations}, {info})")
            print(f"| {name} | {keep} | {'; '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
