"""A small memory-bounded cache of inverse-HVP vectors, keyed by the test batch."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import tensorflow as tf

# Largest total size of cached solutions (bytes); the oldest entries go first.
DEFAULT_BUDGET = 512 * 2**20


def batch_key(x, y) -> str:
    """A digest of a test batch's inputs and targets (their bytes, shapes and dtypes)."""
    digest = hashlib.sha256()
    for leaf in tf.nest.flatten((x, y)):
        array = np.ascontiguousarray(leaf.numpy() if hasattr(leaf, "numpy") else leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class SolutionCache:
    """LRU cache ``key -> (solution, diagnostics)``; cleared when the curvature changes."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET):
        self.budget = budget_bytes
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._size = 0
        self.hits = 0

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        return None

    def put(self, key, solution, diagnostics) -> None:
        size = int(np.prod(solution.shape)) * solution.dtype.size
        if size > self.budget:
            return
        self._entries[key] = (solution, diagnostics)
        self._size += size
        while self._size > self.budget:
            _, (old, _) = self._entries.popitem(last=False)
            self._size -= int(np.prod(old.shape)) * old.dtype.size

    def items(self):
        """The ``(key, (solution, diagnostics))`` entries, oldest first."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0
