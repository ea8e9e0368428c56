"""Small helpers that format the package's error messages the Keras way.

Every message names the argument, says what was received and how to fix it.
"""

from __future__ import annotations

import numpy as np


def describe(value) -> str:
    """A short, readable description of a received value for error messages."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        dtype = getattr(value, "dtype", None)
        dtype = getattr(dtype, "name", dtype)
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def first_nonfinite_index(array) -> int | None:
    """Index (along axis 0) of the first example holding NaN or inf, or None."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None
