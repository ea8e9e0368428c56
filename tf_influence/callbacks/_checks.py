"""Argument checks shared by the callbacks."""

from __future__ import annotations

import numpy as np


def check_every_n_epochs(value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            "Argument `every_n_epochs` must be a positive integer"
            + (" or None" if allow_none else "")
            + f". Received: every_n_epochs={value!r}"
        )
    return int(value)


def check_epochs(value):
    if value is None:
        return None
    try:
        epochs = sorted({int(e) for e in value})
        ok = all(float(e) == int(e) and int(e) >= 1 for e in value) and bool(epochs)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "Argument `epochs` must be a non-empty list of 1-based epoch numbers, e.g. "
            f"[5, 10]. Received: epochs={value!r}"
        )
    return epochs
