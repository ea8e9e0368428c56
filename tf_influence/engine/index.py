"""The influence index: training gradients in a solver's coordinates, built once, then scored.

A solver with an ``IndexInverse`` (``Solver.index``) approximates ``inv(C +
damping*I)`` by ``P @ inverse @ P^T`` for a projection ``P``. The index keeps
``Phi_j = P^T grad L(z_j)`` for every training example (``n x dim``), so that

    score_ij = -(P^T g_test_i)^T inverse Phi_j       (a query: one gradient, one product)
    self_influence_j = Phi_j^T inverse Phi_j / w_j    (no solve)

and ``export`` can serve it with no training example. The rows live behind a small
seam, ``IndexRows``: ``MemoryRows`` (an ``(n, dim)`` tensor, the default) or any
object with the same ``write`` / ``blocks`` / ``finish`` (a store on disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from tf_influence._errors import raise_at_first_nonfinite
from tf_influence._progress import Progress
from tf_influence.solvers.base import IndexInverse, Projection

# Rows scored (or multiplied) at a time when reading the index.
READ_ROWS = 8192


class IndexRows(Protocol):
    """Where the index's rows are written at ``fit`` and read at every query."""

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + b - 1``, ``(b, dim)``."""

    def finish(self) -> None:
        """Every row was written."""

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(start, rows (b, dim))`` in order."""


class MemoryRows:
    """The index as one ``(n, dim)`` tensor (``rows`` after ``finish``)."""

    def __init__(self) -> None:
        self._parts: list = []
        self.rows: tf.Tensor | None = None

    def write(self, start: int, block: Any) -> None:
        self._parts.append(tf.convert_to_tensor(block))

    def finish(self) -> None:
        self.rows = tf.concat(self._parts, axis=0)
        self._parts = []

    def blocks(self, block_rows: int) -> Iterator[tuple[int, tf.Tensor]]:
        return row_blocks(self.rows, block_rows)


def row_blocks(rows: Any, block_rows: int, first: int = 0) -> Iterator[tuple[int, Any]]:
    """``(start, rows[start:start + block_rows])`` of a tensor, or of an ``IndexRows``.

    Blocks wholly before ``first`` are skipped (a resumed ``explain``).
    """
    if isinstance(rows, (tf.Tensor, np.ndarray)):
        n = int(rows.shape[0])
        for start in range(first - first % block_rows, n, block_rows):
            yield start, rows[start : start + block_rows]
        return
    for start, block in rows.blocks(block_rows):
        if start + int(block.shape[0]) > first:
            yield start, block


def build_rows(
    data: Any,
    projection: Projection,
    sink: IndexRows,
    verbose: int = 0,
    examples: Callable[[Any, Any], tf.Tensor] | None = None,
    with_gram: bool = True,
) -> tf.Tensor | None:
    """Writes ``P^T grad L(z_j)`` of every training example into ``sink``, in order.

    Args:
        data: the training ``ExampleData``.
        projection: the coordinates.
        sink: where the rows go.
        verbose: progress bar verbosity.
        examples: ``(x, y) -> (b, dim)``; default ``projection.examples``.
        with_gram: also return the Gram.

    Returns:
        float64 ``sum_j Phi_j Phi_j^T / w_j`` as ``(members, d, d)`` (``d = dim /
        members``; 0 for ``w_j = 0``), or None without ``with_gram``.
    """
    examples = examples or projection.examples
    weights = data.sample_weights()
    members = projection.members
    width = projection.dim // members
    gram = tf.zeros([members, width, width], tf.float64) if with_gram else None
    progress = Progress(data.num_batches(), verbose, "Influence index")
    start = 0
    for step, batch in enumerate(data.batches(), start=1):
        block = examples(batch[0], batch[1])
        size = int(block.shape[0])
        raise_at_first_nonfinite(
            np.isfinite(block.numpy()).all(axis=1),
            start,
            "The projected loss gradient is NaN or inf at training example {index}. Check "
            "that example and its label, then call `fit` again.",
        )
        if with_gram:
            rows = tf.reshape(tf.cast(block, tf.float64), [size, members, width])
            scaled = rows
            if weights is not None:
                w = weights[start : start + size]
                inverse = np.divide(1.0, w, out=np.zeros_like(w), where=w > 0)
                scaled = rows * inverse[:, None, None]
            gram += tf.einsum("bmi,bmj->mij", scaled, rows)
        sink.write(start, block)
        start += size
        progress.update(step)
    progress.done()
    sink.finish()
    return gram


def score_rows(
    rows: Any,
    queries: tf.Tensor,
    sink: Any,
    divisors: np.ndarray | None = None,
    first: int = 0,
    message: str = "",
) -> Any:
    """Writes ``-queries^T Phi_j`` for every row into ``sink`` (``(k, b)`` blocks).

    Args:
        rows: the index (a tensor or ``IndexRows``).
        queries: ``(dim, k)``, ``inverse @ P^T g_test``.
        sink: a ``ScoreSink``.
        divisors: ``(n,)`` to divide column j by, or None.
        first: the first training example not yet written (a resumed ``explain``).
        message: the error for a non-finite score (``{index}`` is filled in).
    """
    for start, block in row_blocks(rows, READ_ROWS, first):
        block = tf.cast(tf.convert_to_tensor(block), queries.dtype)
        scores = -tf.matmul(queries, block, transpose_a=True, transpose_b=True).numpy()
        raise_at_first_nonfinite(np.isfinite(scores).all(axis=0), start, message)
        if divisors is not None:
            scores = scores / divisors[start : start + scores.shape[1]]
        sink.write(start, scores)
    return sink.result()


def quadratic_rows(rows: Any, inverse: IndexInverse) -> np.ndarray:
    """``Phi_j^T inverse Phi_j`` for every row, ``(n,)`` float64."""
    values = []
    for _, block in row_blocks(rows, READ_ROWS):
        block = tf.cast(tf.convert_to_tensor(block), tf.float64)
        applied = tf.transpose(inverse.apply(tf.transpose(block)))
        values.append(tf.reduce_sum(block * applied, axis=1).numpy())
    return np.concatenate(values) if values else np.zeros([0])


def index_queries(
    state: Any,
    x_test: Any,
    y_test: Any,
    batch_size: int | None,
    target: Callable | None,
    cache: Any,
) -> tf.Tensor:
    """``inverse @ P^T grad L(z_test_i)`` for every test point, ``(dim, n_test)``.

    ``FittedState.test_queries`` with an index (``state.index_inverse``): per test
    batch, the coordinates by ``projection.examples`` (of the test loss, at the
    targets ``state.targets`` gives) or, for ``target=`` functions, by
    ``projection.project`` of their gradients; cached in ``cache`` per batch.
    """
    spec = state.index_inverse
    projection = spec.projection
    if target is not None and projection.project is None:
        raise ValueError(
            "Argument `target` needs coordinates that are a linear map of one gradient. "
            f"Received: target={target!r} with solver={state.solver!r}, whose index averages "
            "several models. Explain the loss (target=None), or use one model."
        )
    tests = state.test_data(x_test, y_test, batch_size)
    queries, offset = [], 0
    for step, batch in enumerate(tests.batches(), start=1):
        key, gradients = state.test_gradients(batch, target, check=step == 1, offset=offset)
        key = key if target is None else f"{key}|index"
        cached = cache.get(key)
        if cached is None:
            if target is None and projection.examples is not None:
                coordinates = projection.examples(*state.targets(batch))  # (b, dim)
            else:
                coordinates = tf.transpose(projection.project(tf.transpose(gradients())))
            raise_at_first_nonfinite(
                np.isfinite(coordinates.numpy()).all(axis=1),
                offset,
                f"The {'loss' if target is None else 'target'} gradient is NaN or inf at "
                "test example {index} of `x_test`. Check that example and its target.",
            )
            cached = spec.apply(tf.transpose(coordinates)), None
            cache.put(key, *cached)
        queries.append(cached[0])
        offset += int(cached[0].shape[1])
    return tf.concat(queries, axis=1)
