"""Seconds of a first ``explain`` (tracing included), by fresh processes, for checkouts.

What a notebook user waits for: ``compile`` + ``fit`` + ``explain`` on 20 test points
in a new process, then three more ``explain`` calls on new test points. Same models,
data and settings as row 2 of ``run.py`` (CG tol 1e-5, B=128). Each round starts one
process per checkout, alternating, so that two versions of the package are compared
side by side under the same load (this machine's timings drift between processes).

Usage, from the repository root::

    .venv/bin/python benchmarks/first_call.py                   # this checkout, ~1 min
    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/first_call.py --trees .,/tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument(
        "--trees", default=".", help="comma-separated checkouts of the package to time"
    )
    parser.add_argument("--rounds", type=int, default=2, help="processes per checkout")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TREE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.trees = [os.path.abspath(t) for t in args.trees.split(",") if t]
    for tree in args.trees:
        if not os.path.isdir(os.path.join(tree, "tf_influence")):
            parser.error(f"--trees: {tree!r} holds no tf_influence package")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1. Received: {args.rounds}")
    return args


def child(name, tree):
    """Runs in a fresh process: imports the package from ``tree`` and times one model."""
    sys.path.insert(0, tree)
    sys.path.insert(1, HERE)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_influence as tfi

    # Imported after the package: run.py puts this checkout first on the path.
    run = importlib.import_module("run")
    assert os.path.dirname(os.path.abspath(tfi.__file__)) == os.path.join(tree, "tf_influence")

    data = run.load_data()
    model, _ = run.train_model(name, data, run.EPOCHS)
    x_train, y_train, x_test, y_test = data

    def tests(call):
        part = slice(call * run.NUM_TESTS, (call + 1) * run.NUM_TESTS)
        return run.inputs(name, x_test[part]), y_test[part]

    start = time.perf_counter()
    im = tfi.InfluenceModel(model)
    im.compile(
        solver=tfi.solvers.CG(tol=run.CG_TOL, max_iter=run.CG_MAX_ITER),
        damping=run.DAMPING[name],
    )
    im.fit(run.inputs(name, x_train), y_train, batch_size=128, verbose=0)
    fitted = time.perf_counter()
    im.explain(*tests(0), verbose=0)
    first = time.perf_counter()
    later = []
    for call in range(1, 4):
        begin = time.perf_counter()
        im.explain(*tests(call), verbose=0)
        later.append(time.perf_counter() - begin)
    print(
        json.dumps(
            {
                "fit": fitted - start,
                "first": first - start,
                "explain": first - fitted,
                "later": later,
            }
        )
    )


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return
    print("| model | checkout | compile+fit+first explain (fit / explain), s | calls 2-4, s |")
    print("|---|---|---|---|")
    for name in args.models:
        for _ in range(args.rounds):
            for tree in args.trees:
                result = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", name, tree],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(result.stdout.strip().splitlines()[-1])
                later = ", ".join(f"{t:.2f}" for t in r["later"])
                print(
                    f"| {name} | {tree} | {r['first']:.2f} ({r['fit']:.2f} / "
                    f"{r['explain']:.2f}) | {later} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
