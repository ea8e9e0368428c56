"""Timers, interleaved comparisons, peak memory and progress lines.

Timings are medians over interleaved repeats (the compared functions alternate, so
a change of machine load hits both), after a warm-up call that traces them.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np


def log(message):
    """A time-stamped progress line on stderr (stdout holds the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run(fn):
    out = fn()
    # Materialise the result, so that time is not hidden in an asynchronous op.
    for leaf in out if isinstance(out, (list, tuple)) else [out]:
        if hasattr(leaf, "numpy"):
            leaf.numpy()
    return out


def timed(fn):
    """Seconds of one call of ``fn`` (its tensors materialised)."""
    start = time.perf_counter()
    _run(fn)
    return time.perf_counter() - start


def timed_loop(fn, calls):
    """Mean seconds of ``calls`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        _run(fn)
    return (time.perf_counter() - start) / calls


def compare(fns, repeats, sample_seconds=0.05):
    """Warm-up (trace) then interleaved repeats; returns ``{name: (first, median)}`` seconds.

    A fast function is called several times per sample (at least ``sample_seconds``
    per sample), so that timer and scheduling noise do not dominate it.
    """
    first = {name: timed(fn) for name, fn in fns.items()}
    calls = {name: max(1, int(np.ceil(sample_seconds / timed(fn)))) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_loop(fn, calls[name]))
    return {name: (first[name], float(np.median(times[name]))) for name in fns}


def fmt_time(seconds):
    """``1.23 s`` or ``45.6 ms``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def status_mib(field, pid="self"):
    """``VmRSS`` / ``VmHWM`` of process ``pid`` (this one by default) from /proc, MiB
    (None if unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak():
    """Resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return status_mib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident set size of this process so far, MiB.

    ``VmHWM`` from /proc where there is one: ``getrusage(RUSAGE_SELF).ru_maxrss`` of a
    child process is at least the parent's RSS at the time of the fork (Linux keeps
    the pre-``exec`` high-water mark), which would hide the child's own peak.
    """
    peak = status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_blas_thread():
    """A context in which numpy's BLAS uses one thread (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_epochs(model, x, y, epochs, batch_size):
    """Trains ``model`` one epoch per ``fit`` call; returns each epoch's seconds."""
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        model.fit(x, y, epochs=epoch + 1, initial_epoch=epoch, batch_size=batch_size, verbose=0)
        seconds.append(time.perf_counter() - start)
    return seconds
