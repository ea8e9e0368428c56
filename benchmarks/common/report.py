"""Markdown results tables, the machine header and plots."""

from __future__ import annotations

import datetime
import os
import platform

from benchmarks.common.timing import log

# Where the documentation's figures live, relative to the repository root.
PLOT_DIR = os.path.join("docs", "img")


class Table:
    """One markdown table of measurements; every line names the command that made it."""

    HEADER = (
        "| row | measurement | model | setting | measured | baseline | ratio | goal | met "
        "| command |"
    )

    def __init__(self):
        self.lines = []

    def add(self, row, what, model, setting, ours, reference, ratio, goal, met, command):
        """Adds (and logs) one line; ``met`` is True, False or None (no goal)."""
        met_text = "" if met is None else ("yes" if met else "**no**")
        cells = [str(row), what, model, setting, ours, reference, ratio, goal, met_text]
        self.lines.append("| " + " | ".join(cells) + f" | `{command}` |")
        log("  " + self.lines[-1])

    def render(self):
        separator = "|" + "|".join(["---"] * (self.HEADER.count("|") - 1)) + "|"
        return "\n".join([self.HEADER, separator, *self.lines])


def markdown_table(columns, rows):
    """The lines of a markdown table: ``columns`` (names), then one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def machine():
    """``"<cpu>, <n> cores, <system> <machine>"`` for result headers."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def now():
    """The local date and time, ISO format, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, plot_dir, filename):
    """Writes ``figure`` to ``plot_dir/filename`` (PNG, 150 dpi), closes it, returns the path.

    Args:
        figure: a ``matplotlib.figure.Figure``.
        plot_dir: the folder (created if missing); ``""`` writes nothing.
        filename: e.g. ``"arnoldi_rank.png"``.

    Returns:
        The path written, or None when ``plot_dir`` is empty.
    """
    plt = pyplot()
    if not plot_dir:
        plt.close(figure)
        return None
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, filename)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    log(f"wrote {path}")
    return path


def add_plot_dir_argument(parser):
    """``--plot-dir``: where the script's figures go (default ``docs/img``; "" for none)."""
    parser.add_argument(
        "--plot-dir",
        default=PLOT_DIR,
        help=f'folder for the figures (default {PLOT_DIR}; "" writes none)',
    )
