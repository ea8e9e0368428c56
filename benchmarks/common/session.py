"""What the speed rows share: data, trained models, one results table, the command line.

``benchmarks.run`` runs rows 1-4 in one session, so that their ratios are measured
side by side on the same models; each row module runs its own row alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from benchmarks.common import digits
from benchmarks.common.report import Table, add_plot_dir_argument, machine, now
from benchmarks.common.timing import log

# The module that runs each row alone (``python -m benchmarks.<module>``).
ROW_MODULES = {1: "products", 2: "explain", 3: "scoring", 4: "scaling"}
PYTHON = ".venv/bin/python"


def parse_args(argv=None, rows=(1, 2, 3, 4), description=None, default_models="mlp,cnn"):
    """The options of the speed rows.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        rows: the rows this command may run; ``--rows`` is offered when there are several.
        description: the ``--help`` text.
        default_models: the models trained when ``--models`` is not given.

    Returns:
        An ``argparse.Namespace`` with ``rows``, ``models`` and ``scale`` as lists.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced run")
    if len(rows) > 1:
        parser.add_argument(
            "--rows", default=",".join(str(r) for r in rows), help="rows to run, e.g. 1,3"
        )
    parser.add_argument("--models", default=None, help=f"mlp,cnn (default {default_models})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats")
    parser.add_argument("--epochs", type=int, default=digits.EPOCHS)
    if 4 in rows:
        parser.add_argument(
            "--scale", default=None, help="training-set multiples for row 4 (default 1,10,50)"
        )
        add_plot_dir_argument(parser)
        parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = getattr(args, "rows", None)
    args.rows = sorted({int(r) for r in given.split(",") if r.strip()}) if given else list(rows)
    if not set(args.rows) <= set(rows):
        parser.error(f"--rows takes numbers from {list(rows)}. Received: --rows {given}")
    args.rows_given = given is not None and len(rows) > 1 and args.rows != list(rows)
    args.models_given = args.models is not None
    args.models = (args.models or default_models).split(",")
    if not set(args.models) <= set(digits.MODELS):
        parser.error(f"--models takes mlp and/or cnn. Received: --models {','.join(args.models)}")
    args.scale_given = getattr(args, "scale", None) is not None
    default_scale = "1,5" if args.quick else "1,10,50"
    args.scale = [int(f) for f in (getattr(args, "scale", None) or default_scale).split(",")]
    args.plot_dir = getattr(args, "plot_dir", "")
    args.child = getattr(args, "child", None)
    return args


class Session:
    """Data, trained models and the results table of one run of the speed rows.

    Args:
        args: from ``parse_args``.
    """

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.batch_size = args.batch_size
        self.repeats = args.repeats or (3 if self.quick else 7)
        self.table = Table()
        self.notes = []  # markdown printed after the table (e.g. the numbers behind a plot)
        self.data = None
        self.models = {}
        self.accuracy = {}
        self.start_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def command(self, row):
        """The command that reproduces ``row``'s lines alone."""
        parts = [f"{PYTHON} -m benchmarks.{ROW_MODULES[row]}"]
        if self.quick:
            parts.append("--quick")
        if self.args.models_given:
            parts.append(f"--models {','.join(self.args.models)}")
        if self.batch_size != 128:
            parts.append(f"--batch-size {self.batch_size}")
        if self.args.repeats:
            parts.append(f"--repeats {self.args.repeats}")
        if self.args.scale_given and row == 4:
            parts.append(f"--scale {','.join(str(f) for f in self.args.scale)}")
        return " ".join(parts)

    def setup(self):
        """Loads the digits and trains every model of ``--models``."""
        self.data = digits.load_data()
        for name in self.args.models:
            start = time.perf_counter()
            model, accuracy = digits.train_model(name, self.data, self.args.epochs)
            self.models[name] = model
            self.accuracy[name] = accuracy
            log(
                f"trained {name}: {model.count_params()} parameters, test accuracy "
                f"{accuracy:.4f}, {time.perf_counter() - start:.1f} s"
            )

    def train_xy(self, name):
        """The training set in ``name``'s input shape."""
        return digits.inputs(name, self.data[0]), self.data[1]

    def test_xy(self, name, start, stop):
        """Test points ``start:stop`` in ``name``'s input shape."""
        return digits.inputs(name, self.data[2][start:stop]), self.data[3][start:stop]

    def influence_model(self, name, batch_size=None, **compile_args):
        """A fitted ``InfluenceModel`` of ``name`` (CG at ``CG_TOL`` unless ``solver=``)."""
        import tf_influence as tfi

        im = tfi.InfluenceModel(self.models[name])
        settings = {"solver": tfi.solvers.CG(tol=digits.CG_TOL, max_iter=digits.CG_MAX_ITER)}
        settings.update(compile_args)
        im.compile(damping=digits.DAMPING[name], **settings)
        x, y = self.train_xy(name)
        im.fit(x, y, batch_size=batch_size or self.batch_size, verbose=0)
        return im

    def reference_models(self):
        """Models for rows 2 and 3: the CNN's straightforward reference takes minutes, so
        ``--quick`` keeps the MLP only."""
        return [m for m in self.args.models if not (self.quick and m == "cnn")]

    def header(self):
        """The markdown lines above the table: date, machine, versions, models, settings."""
        import keras
        import scipy
        import tensorflow as tf

        lines = [
            f"# tf_influence benchmarks{' (--quick)' if self.quick else ''}",
            "",
            f"* date: {now()}",
            f"* machine: {machine()}; 1-min load average at start {self.start_load:.2f}",
            f"* python {platform.python_version()}, tensorflow {tf.__version__}, keras "
            f"{keras.__version__}, numpy {np.__version__}, scipy {scipy.__version__}; "
            "float32, CPU only",
            "* models: "
            + ", ".join(
                f"{m} ({self.models[m].count_params()} params, test acc "
                f"{self.accuracy[m]:.3f}, damping {digits.DAMPING[m]:g})"
                for m in self.args.models
            )
            + f"; L2 {digits.L2:g} on kernels; Adam {self.args.epochs} epochs; "
            f"{len(self.data[0])} training points",
            f"* batch size B={self.batch_size} for every pass over the training data; "
            f"timings: median of {self.repeats} interleaved repeats after a warm-up call",
            "",
        ]
        return "\n".join(lines)

    def run(self, rows):
        """Sets up, runs ``rows`` (``{row: function(session)}``) in order, prints the table."""
        start = time.perf_counter()
        self.setup()
        for row in self.args.rows:
            rows[row](self)
        print(self.header())
        print(self.table.render())
        for note in self.notes:
            print(f"\n{note}")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nTotal {time.perf_counter() - start:.0f} s; load average at the end {load:.2f}.")
