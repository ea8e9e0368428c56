"""Where scores go: a full matrix in memory, a memory-mapped ``.npy`` file, or top-k only.

The scoring pass hands each block ``scores[:, start:start + b]`` of training
columns to a sink, so a run over 100k training points never holds more than one
block plus what the sink keeps.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tf_influence._validation import check_positive_int


class TopK(NamedTuple):
    """The most helpful and most harmful training examples for each test point.

    All arrays have shape ``(n_test, k)``. Helpful examples have the most negative
    scores (up-weighting them lowers the test loss), listed most helpful first;
    harmful examples have the most positive scores, listed most harmful first.
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


class DenseSink:
    """Keeps the whole ``(n_test, n_train)`` matrix in memory (or in a memmap)."""

    def __init__(
        self,
        num_tests: int,
        num_train: int,
        dtype: npt.DTypeLike,
        output: str | os.PathLike | None = None,
    ):
        self.output = None if output is None else os.fspath(output)
        if self.output is None:
            self.scores = np.empty((num_tests, num_train), dtype=dtype)
        else:
            if not self.output.endswith(".npy"):
                raise ValueError(
                    "Argument `output` must be a path ending in .npy. Received: "
                    f"output={self.output!r}"
                )
            self.scores = np.lib.format.open_memmap(
                self.output, mode="w+", dtype=dtype, shape=(num_tests, num_train)
            )

    def write(self, start: int, block: np.ndarray) -> None:
        self.scores[:, start : start + block.shape[1]] = block

    def result(self) -> np.ndarray:
        """The matrix, or the ``.npy`` file opened read-only with ``mmap_mode="r"``."""
        if self.output is None:
            return self.scores
        self.scores.flush()
        del self.scores
        return np.load(self.output, mmap_mode="r")


class TopKSink:
    """Keeps only the ``k`` most negative and ``k`` most positive scores per test point."""

    def __init__(self, num_tests: int, num_train: int, k: int, dtype: npt.DTypeLike):
        self.k = min(int(k), num_train)
        self.low_scores = np.empty((num_tests, 0), dtype)
        self.low_index = np.empty((num_tests, 0), np.int64)
        self.high_scores = np.empty((num_tests, 0), dtype)
        self.high_index = np.empty((num_tests, 0), np.int64)

    @staticmethod
    def _keep(
        scores: np.ndarray, index: np.ndarray, k: int, largest: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        if scores.shape[1] <= k:
            return scores, index
        key = -scores if largest else scores
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
        return np.take_along_axis(scores, part, 1), np.take_along_axis(index, part, 1)

    def write(self, start: int, block: np.ndarray) -> None:
        index = np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)
        self.low_scores, self.low_index = self._keep(
            np.concatenate([self.low_scores, block], 1),
            np.concatenate([self.low_index, index], 1),
            self.k,
            largest=False,
        )
        self.high_scores, self.high_index = self._keep(
            np.concatenate([self.high_scores, block], 1),
            np.concatenate([self.high_index, index], 1),
            self.k,
            largest=True,
        )

    def result(self) -> TopK:
        # Sort by score, ties by training index, so results match a full argsort.
        low = np.lexsort((self.low_index, self.low_scores), axis=1)
        high = np.lexsort((self.high_index, -self.high_scores), axis=1)
        return TopK(
            helpful_indices=np.take_along_axis(self.low_index, low, 1),
            helpful_scores=np.take_along_axis(self.low_scores, low, 1),
            harmful_indices=np.take_along_axis(self.high_index, high, 1),
            harmful_scores=np.take_along_axis(self.high_scores, high, 1),
        )


def check_k(k: int, name: str) -> None:
    """Raises unless ``k`` is a positive integer (``name`` is the argument's name)."""
    check_positive_int(name, k)


def check_sink_args(top_k: int | None, output: str | os.PathLike | None) -> None:
    """Checks ``explain``'s ``top_k`` / ``output`` before any work is done."""
    if top_k is not None:
        check_k(top_k, "top_k")
        if output is not None:
            raise ValueError(
                "Arguments `top_k` and `output` cannot be combined. Received: "
                f"top_k={top_k}, output={output!r}. Pass one of them."
            )


def make_sink(
    num_tests: int,
    num_train: int,
    dtype: npt.DTypeLike,
    top_k: int | None = None,
    output: str | os.PathLike | None = None,
) -> DenseSink | TopKSink:
    """``TopKSink`` with ``top_k``, else ``DenseSink`` (in memory, or ``output`` memmap)."""
    if top_k is not None:
        return TopKSink(num_tests, num_train, int(top_k), dtype)
    return DenseSink(num_tests, num_train, dtype, output)
