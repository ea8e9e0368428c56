"""Keras-style progress reporting that stays quiet on short work."""

from __future__ import annotations

import time

import keras

# A bar appears only once work has run this long (seconds), as "a few seconds".
SHOW_AFTER = 2.0


def resolve_verbose(verbose) -> int:
    """Keras's convention: "auto" -> 1, else 0 (silent), 1 (bar) or 2 (one line)."""
    if verbose == "auto":
        return 1
    if verbose in (0, 1, 2) and not isinstance(verbose, bool):
        return int(verbose)
    if isinstance(verbose, bool):
        return int(verbose)
    raise ValueError(f'Argument `verbose` must be "auto", 0, 1 or 2. Received: verbose={verbose!r}')


class Progress:
    """A ``keras.utils.Progbar`` that is created only when the work is slow.

    Args:
        total: number of steps.
        verbose: resolved verbosity (0, 1 or 2).
        label: what is being done, printed once the bar appears.
    """

    def __init__(self, total: int, verbose: int, label: str):
        self.total, self.verbose, self.label = total, verbose, label
        self.start = time.perf_counter()
        self.bar = None
        self.step = 0

    def update(self, step: int) -> None:
        self.step = step
        if self.verbose != 1:
            return
        if self.bar is None and time.perf_counter() - self.start < SHOW_AFTER:
            return
        if self.bar is None:
            print(self.label)
            self.bar = keras.utils.Progbar(self.total, verbose=1, unit_name="step")
        self.bar.update(step)

    def done(self, summary: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        if self.verbose == 1 and self.bar is not None and self.step < self.total:
            self.bar.update(self.total, finalize=True)
        elif self.verbose == 2:
            print(f"{self.label} {self.total} steps - {elapsed:.1f}s {summary}".rstrip())
