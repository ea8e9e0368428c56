"""A benchmark case in a child process, stopped at a time budget or above a memory limit.

Each case gets a fresh process (``spawn``): its traces, caches and peak memory are
its own. The child runs ``target(*args, queue)``, which puts ``("ready",
time.time())`` once its model is built (the budget counts from there) and then
``("done", row)`` with a dict of results.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_lib
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common.timing import status_mib

# Importing TensorFlow and building the model, before the budget starts.
START_TIMEOUT = 600


def run_in_child(
    target: Callable, args: tuple, budget_seconds: float, max_memory_mib: float, budget_text: str
) -> dict[str, Any]:
    """``target(*args, queue)`` in a child process; its row, or why it was stopped.

    Args:
        target: a module-level function (it is pickled).
        args: its arguments before the queue.
        budget_seconds: stop the child this long after it reported ready.
        max_memory_mib: stop the child when its resident memory exceeds this.
        budget_text: the budget in words, for the status (e.g. ``"60 epochs"``).

    Returns:
        The child's row, or ``{"status": "stopped after ..." | "stopped above ... MiB" |
        "died (exit code ...)"}``.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue), daemon=True)
    child.start()
    try:
        _, started = queue.get(timeout=START_TIMEOUT)
        row = None
        while row is None:
            try:
                _, row = queue.get(timeout=2)
            except queue_lib.Empty:
                seconds = time.time() - started
                if seconds > budget_seconds:
                    row = {"status": f"stopped after {budget_text}"}
                elif (status_mib("VmRSS", child.pid) or 0.0) > max_memory_mib:
                    row = {"status": f"stopped above {max_memory_mib:g} MiB"}
                elif not child.is_alive():
                    row = {"status": f"died (exit code {child.exitcode})"}
    finally:
        if child.is_alive():
            child.terminate()
        child.join(30)
    return row
