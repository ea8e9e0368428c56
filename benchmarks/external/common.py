"""Helpers shared by the per-library scripts (numpy and the standard library only).

Each ``run_*`` module runs in its own virtualenv, reads ``workload.npz`` written
by ``export_workload.py`` and writes ``<library>.json`` next to its score matrices
(``.npy``). The JSON lists one entry per (workload, solver) run::

    {"library": ..., "version": ..., "status": "ok" | "not installable here" | "failed",
     "reason": ..., "runs": [{"workload", "solver", "params", "seconds",
     "seconds_measured", "timing", "scores", "columns", "factor", "conversion",
     "settings", "notes"}]}

``scores`` is the library's raw output (its own sign and scale), shape
``(n_test, len(columns))``; ``factor`` converts it to tf_influence's convention,
``scores_ours = factor * scores_theirs``, with

    scores_ours[i, j] = -grad L(z_test_i)^T H^-1 grad L(z_j)

and ``columns`` the training indices (None: all of them, in order).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback

import numpy as np

# The two workloads of the comparison (see README.md).
WORKLOADS = {
    "A": "last layer (logits kernel + bias) of the digits MLP",
    "B": "all weights of the digits MLP",
}
LAYERS = ("dense_1", "dense_2", "logits")


class Workload:
    """The contents of ``workload.npz``."""

    def __init__(self, path):
        data = np.load(path)
        self.path = os.path.abspath(path)
        self.x_train = data["x_train"]
        self.y_train = data["y_train"]
        self.x_test = data["x_test"]
        self.y_test = data["y_test"]
        self.l2 = float(data["l2"])
        self.damping = float(data["damping"])
        self.batch_size = int(data["batch_size"])
        self.weights = {name: (data[f"{name}/kernel"], data[f"{name}/bias"]) for name in LAYERS}

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def parse_args(description, argv=None, extra=()):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    for flags, options in extra:
        parser.add_argument(*flags, **options)
    parser.add_argument("--workload", default="/tmp/bench/workload.npz")
    parser.add_argument("--out", default="/tmp/bench/results", help="folder for JSON and .npy")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per batch for this library's passes (default: the workload's)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="suffix of the JSON / .npy names, to keep a variant run apart (e.g. @b479)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated runs to do, e.g. 'A-exact,B-cg' (default: all)",
    )
    return parser.parse_args(argv)


def selected(args, workload, solver) -> bool:
    if not args.only:
        return True
    return f"{workload}-{solver}" in {s.strip() for s in args.only.split(",")}


class Timer:
    """Wall-clock seconds of a ``with`` block."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


class Results:
    """Collects the runs of one library and writes ``<library>.json``."""

    def __init__(self, library, version, out_dir, framework="", tag=""):
        self.library = library
        self.tag = tag
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.doc = {
            "library": library,
            "version": version,
            "framework": framework,
            "tag": tag,
            "python": platform.python_version(),
            "status": "ok",
            "reason": "",
            "runs": [],
        }

    def add(
        self,
        workload,
        solver,
        params,
        scores,
        seconds,
        factor,
        conversion,
        settings=None,
        columns=None,
        seconds_measured=None,
        timing="measured on the full task",
        notes="",
        stages=None,
    ):
        scores = np.asarray(scores, dtype=np.float64)
        name = f"{self.library}{self.tag}_{workload}_{solver}.npy"
        path = os.path.join(self.out_dir, name)
        np.save(path, scores)
        self.doc["runs"].append(
            {
                "workload": workload,
                "solver": solver,
                "params": int(params),
                "seconds": float(seconds),
                "seconds_measured": float(
                    seconds if seconds_measured is None else seconds_measured
                ),
                "timing": timing,
                "scores": path,
                "shape": list(scores.shape),
                "columns": None if columns is None else [int(c) for c in columns],
                "factor": float(factor),
                "conversion": conversion,
                "settings": settings or {},
                "notes": notes,
                "stages": stages or {},
            }
        )
        self.write()
        print(
            f"{self.library} {workload}-{solver}: {params} params, {seconds:.2f} s "
            f"({timing}), scores {scores.shape} -> {path}",
            flush=True,
        )

    def fail_run(self, workload, solver, error):
        self.doc["runs"].append(
            {
                "workload": workload,
                "solver": solver,
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:500]}",
                "traceback": traceback.format_exc()[-3000:],
            }
        )
        self.write()
        print(f"{self.library} {workload}-{solver} FAILED: {error!r}", file=sys.stderr, flush=True)

    def not_installable(self, reason):
        self.doc["status"] = "not installable here"
        self.doc["reason"] = reason
        self.write()
        print(f"{self.library}: not installable here: {reason}", flush=True)

    def write(self):
        path = os.path.join(self.out_dir, f"{self.library}{self.tag}.json")
        with open(path, "w") as handle:
            json.dump(self.doc, handle, indent=2)
        return path
