"""Checks of targets: numbers only, and in the range each loss accepts."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence.engine.losses import (
    BINARY_LOSSES,
    ONE_HOT_LOSSES,
    SIGNED_BINARY_LOSSES,
    SPARSE_CLASS_LOSSES,
)

# numpy dtype kinds that hold numbers: bool, signed and unsigned integers, floats, complex.
_NUMERIC_KINDS = "biufc"


def _dtype_text(values: np.ndarray) -> str:
    """``values``' dtype for an error message, e.g. ``<U10 (strings)``."""
    kind = values.dtype.kind
    if kind == "U":
        return f"{values.dtype.str} (strings)"
    if kind == "S":
        return f"{values.dtype.str} (bytes)"
    if kind == "O":
        first = next((v for v in values.flat if v is not None), None)
        if isinstance(first, (str, bytes)):
            return f"object (strings, as {type(first).__name__})"
        return f"object (holding {type(first).__name__})" if first is not None else "object"
    return str(values.dtype)


def check_numeric_targets(y: Any, name: str) -> None:
    """Refuses targets that are not numbers (strings, bytes, other objects).

    A loss needs numbers; string labels would otherwise fail with a raw ``TypeError``
    deep inside numpy or TensorFlow.

    Args:
        y: targets: an array, tensor, ``tf.TensorSpec``, ``tf.DType``, list, or a nested
            structure (several outputs) of those.
        name: the argument the targets came from, for the message (``"y"``, ``"y_test"``).

    Raises:
        ValueError: a leaf of ``y`` has a string, bytes or object dtype.
    """
    for leaf in tf.nest.flatten(y):
        if leaf is None:
            continue
        dtype = getattr(leaf, "dtype", leaf)
        if isinstance(dtype, tf.DType):
            if dtype != tf.string:
                continue
            text = "string (tf.string)"
        else:
            values = np.asarray(leaf)
            if values.dtype.kind in _NUMERIC_KINDS:
                continue
            if values.dtype.kind == "O":
                try:
                    values.astype(np.float64)
                    continue  # Python numbers in an object array
                except (TypeError, ValueError):
                    pass
            text = _dtype_text(values)
        raise ValueError(
            f"Argument `{name}` must hold numbers (class indices or targets). Received: "
            f"{name} of dtype {text}. Encode the labels as integers first, e.g. with "
            "sklearn.preprocessing.LabelEncoder or keras.layers.StringLookup."
        )


def check_target_range(y: Any, loss: str, num_outputs: int | None, name: str, offset: int) -> None:
    """``check_targets`` for one loss and its targets (a numpy array)."""
    values = np.asarray(y)
    if values.size == 0:
        return
    flat = values.reshape(values.shape[0], -1)
    if loss in SPARSE_CLASS_LOSSES:
        bad = ~np.isclose(flat, np.round(flat)) | (flat < 0)
        if num_outputs is not None:
            bad |= flat >= num_outputs
        allowed = f"class indices 0..{num_outputs - 1}" if num_outputs else "class indices >= 0"
    elif loss in ONE_HOT_LOSSES | BINARY_LOSSES:
        bad = (flat < 0) | (flat > 1)
        allowed = "values in [0, 1] (one-hot or probabilities)"
    elif loss in SIGNED_BINARY_LOSSES:
        bad = (flat < -1) | (flat > 1)
        allowed = "values in [-1, 1] (or 0/1)"
    else:
        return
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        row = int(rows[0])
        value = flat[row][bad[row]][0].item()
        raise ValueError(
            f"Argument `{name}` holds {value!r} at example {offset + row}, which the loss "
            f"{loss!r} cannot take. Received: {name}[{offset + row}]={values[row].tolist()!r}; "
            f"allowed: {allowed}"
            + (f" for a model with {num_outputs} outputs" if num_outputs else "")
            + ". Fix the label, or use the loss that matches its encoding."
        )
