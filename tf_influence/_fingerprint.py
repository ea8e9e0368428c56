"""Digests that tell whether the weights or the training data are the ones a state was made for."""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf


def _update(digest, array) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())


def weights_fingerprint(variables) -> str:
    """sha256 of the variables' shapes, dtypes and values, in order.

    Names are left out: a model rebuilt by code gets new automatic names
    ("sequential_1/...") for the same weights.
    """
    digest = hashlib.sha256()
    for variable in variables:
        _update(digest, np.asarray(variable.numpy()))
    return digest.hexdigest()


def data_fingerprint(data) -> str:
    """sha256 of every example of an ``ExampleData``, in order (one pass over it)."""
    digest = hashlib.sha256()
    digest.update(str(data.num_examples).encode())
    for batch in data.batches():
        for leaf in tf.nest.flatten(batch):
            _update(digest, leaf.numpy() if hasattr(leaf, "numpy") else leaf)
    return digest.hexdigest()


def arrays_fingerprint(*values) -> str:
    """sha256 of every array leaf of ``values`` (nests of arrays), in order."""
    digest = hashlib.sha256()
    for value in values:
        for leaf in tf.nest.flatten(value):
            _update(digest, leaf)
    return digest.hexdigest()


def differing(stored: dict, current: dict) -> list[str]:
    """The names whose fingerprints differ between two ``name -> digest`` records."""
    return [
        name for name in sorted(set(stored) | set(current)) if stored.get(name) != current.get(name)
    ]
