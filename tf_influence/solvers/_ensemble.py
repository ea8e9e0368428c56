"""The members of a ``Projected`` ensemble: weight lists, their digest, weights put back."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe


@contextlib.contextmanager
def restoring(model) -> Iterator[None]:
    saved = [tf.identity(w) for w in model.weights]
    try:
        yield
    finally:
        for variable, value in zip(model.weights, saved, strict=True):
            variable.assign(value)


def resolve_members(checkpoints: Any) -> tuple[list[list[np.ndarray]] | None, str | None]:
    """``(member weight lists, their sha256)``, or ``(None, None)`` without checkpoints."""
    if checkpoints is None:
        return None, None
    if hasattr(checkpoints, "checkpoints"):  # a TracInCheckpoints callback
        members = [list(weights) for weights, _ in checkpoints.checkpoints]
    elif isinstance(checkpoints, Sequence) and not isinstance(checkpoints, (str, bytes)):
        members = []
        for item in checkpoints:
            if hasattr(item, "get_weights"):  # a Keras model
                members.append(list(item.get_weights()))
            elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
                members.append([np.asarray(w) for w in item])
            else:
                members = None
                break
    else:
        members = None
    if members is None:
        raise ValueError(
            "Argument `checkpoints` must be a TracInCheckpoints callback that ran during "
            "`model.fit`, a list of Keras models of the same architecture, or a list of "
            f"weight lists (`model.get_weights()`). Received: checkpoints={describe(checkpoints)}."
        )
    if not members:
        raise ValueError(
            "Argument `checkpoints` holds no member. Received: an empty ensemble. Record "
            "checkpoints with TracInCheckpoints during `model.fit`, or pass trained models."
        )
    shapes = [tuple(np.shape(w)) for w in members[0]]
    found = first_mismatch(members, shapes)
    if found is not None:
        m, got = found
        raise ValueError(
            f"Member {m} of argument `checkpoints` has weight shapes {got}, member 0 "
            f"{shapes}. Received: checkpoints of different architectures. Pass "
            "checkpoints (or models) of one architecture."
        )
    members = [[np.asarray(w) for w in weights] for weights in members]
    return members, digest_of(members)


def first_mismatch(
    members: Sequence[Sequence[Any]], shapes: list[tuple[int, ...]]
) -> tuple[int, list[tuple[int, ...]]] | None:
    """``(index, its weight shapes)`` of the first member whose shapes are not ``shapes``."""
    for m, weights in enumerate(members):
        got = [tuple(np.shape(w)) for w in weights]
        if got != shapes:
            return m, got
    return None


def digest_of(members: list[list[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for weights in members:
        for w in weights:
            array = np.ascontiguousarray(w)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
