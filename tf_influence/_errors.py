"""Small helpers that format the package's error messages the Keras way.

Every message names the argument, says what was received and how to fix it.
"""

from __future__ import annotations

import os
import sys

import numpy as np

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


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


def raise_at_first_nonfinite(finite, offset: int, message: str) -> None:
    """Raises ``ValueError(message.format(index=...))`` at the first False of ``finite``.

    ``finite`` is a boolean per training example of a block starting at ``offset``.
    """
    finite = np.asarray(finite)
    if not finite.all():
        raise ValueError(message.format(index=offset + int(np.flatnonzero(~finite)[0])))


def check_training_indices(indices, num_train: int, name: str) -> np.ndarray:
    """``indices`` as a 1-D integer array of distinct training indices, or a ValueError.

    ``name`` says which argument (or which part of it) the indices came from.
    """
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be a non-empty 1-D list of integer training indices. "
            f"Received: {describe(indices)}"
        )
    outside = array[(array < 0) | (array >= num_train)]
    if outside.size:
        raise ValueError(
            f"{name} holds index {int(outside[0])}, outside the {num_train} training "
            f"examples given to `fit` (0..{num_train - 1})."
        )
    return array
