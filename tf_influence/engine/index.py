"""The influence index: training gradients in a solver's coordinates, built once, then scored.

A solver with an ``IndexInverse`` (``Solver.index``) approximates ``inv(C +
damping*I)`` by ``P @ inverse @ P^T`` for a projection ``P``. The index keeps
``Phi_j = P^T grad L(z_j)`` for every training example (``n x dim``), so that

    score_ij = -(P^T g_test_i)^T inverse Phi_j       (a query: one gradient, one product)
    self_influence_j = Phi_j^T inverse Phi_j / w_j    (no solve)

(``inverse`` applied as the solver gives it: weights, a matrix, or triangular solves
with a Cholesky factor), and ``export`` can serve it with no training example. The
rows live behind a small seam, ``IndexRows``: ``MemoryRows`` (an ``(n, dim)`` tensor,
the default) or any object with the same ``write`` / ``blocks`` / ``finish`` (a store
on disk).
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
    with_gram: bool = True,
    first: int = 0,
) -> tf.Tensor | None:
    """Writes ``P^T grad L(z_j)`` of every training example into ``sink``, in order.

    Args:
        data: the training ``ExampleData``.
        projection: the coordinates (``projection.examples`` per batch).
        sink: where the rows go.
        verbose: progress bar verbosity.
        with_gram: also return the Gram (of the rows written now).
        first: the first row to write (a resumed store): earlier ones are skipped.

    Returns:
        float64 ``sum_j Phi_j Phi_j^T / w_j`` as ``(members, d, d)`` (``d = dim /
        members``; 0 for ``w_j = 0``), or None without ``with_gram``.
    """
    gram = _GramSum(projection, data.sample_weights()) if with_gram else None
    rows = max(data.batch_size, projection.rows_per_pass or 0)
    progress = Progress(data.num_batches(rows), verbose, "Influence index")
    start = 0
    for step, batch in enumerate(data.batches(rows), start=1):
        size = int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
        if start + size <= first:
            start += size
            progress.update(step)
            continue
        block = projection.examples(batch[0], batch[1])
        raise_at_first_nonfinite(
            np.isfinite(block.numpy()).all(axis=1),
            start,
            "The projected loss gradient is NaN or inf at training example {index}. Check "
            "that example and its label, then call `fit` again.",
        )
        skip = max(0, first - start)
        block = block[skip:]
        if gram is not None:
            gram.add(start + skip, block)
        sink.write(start + skip, block if isinstance(sink, MemoryRows) else block.numpy())
        start += size
        progress.update(step)
    progress.done()
    sink.finish()
    return None if gram is None else gram.total


class _GramSum:
    """``sum_j Phi_j Phi_j^T / w_j`` per member block, float64, added block by block."""

    def __init__(self, projection: Projection, weights: np.ndarray | None):
        self.members = projection.members
        self.width = projection.dim // self.members
        self.weights = weights
        self.total = tf.zeros([self.members, self.width, self.width], tf.float64)

    def add(self, start: int, block: Any) -> None:
        """Adds rows ``start ...``: one product in the rows' dtype, summed in float64."""
        block = tf.convert_to_tensor(block)
        size = int(block.shape[0])
        rows = tf.transpose(tf.reshape(block, [size, self.members, self.width]), [1, 0, 2])
        scaled = rows
        if self.weights is not None:
            w = self.weights[start : start + size]
            inverse = np.divide(1.0, w, out=np.zeros_like(w), where=w > 0)
            scaled = rows * tf.cast(inverse, rows.dtype)[None, :, None]
        self.total += tf.cast(tf.matmul(scaled, rows, transpose_a=True), tf.float64)


def build_store(
    data: Any, projection: Projection, fingerprints: dict[str, str], verbose: int = 0
) -> tuple[Any, tf.Tensor | None]:
    """The index in ``projection.store``: built, resumed or reopened; and its Gram.

    A store with these fingerprints is gone on with from its last recorded row (a
    killed build) or, complete, used as it is; one of other fingerprints is
    refused (``GradientStore``). The Gram is taken from the stored rows once the
    store is complete (so a resumed build needs no earlier row again) and kept
    with it as the extra array ``"gram"``; not at all without
    ``projection.with_gram``.

    Returns:
        ``(store opened read-only, gram (members, d, d) float64 or None)``.
    """
    from tf_influence.index import GradientStore

    store = GradientStore(
        projection.store, fingerprints, data.num_examples, projection.dim, projection.store_dtype
    )
    try:
        if not store.complete:
            build_rows(data, projection, store, verbose, with_gram=False, first=store.rows_written)
        gram = None
        try:
            if projection.with_gram:
                gram = tf.constant(store.read_extra(GRAM))
        except ValueError:  # not computed yet
            reader = GradientStore.open(projection.store, fingerprints)
            total = _GramSum(projection, data.sample_weights())
            for start, block in reader.blocks():
                total.add(start, block)
            gram = total.total
            store.write_extra(GRAM, gram.numpy())
    finally:
        store.close()
    return GradientStore.open(projection.store, fingerprints), gram


# The extra array of a store that holds its Gram.
GRAM = "gram"


def rows_tensor(rows: Any) -> tf.Tensor:
    """The whole index as one ``(n, dim)`` tensor (a store read into memory)."""
    if isinstance(rows, tf.Tensor):
        return rows
    return tf.concat([tf.convert_to_tensor(block) for _, block in row_blocks(rows, READ_ROWS)], 0)


def score_rows(
    rows: Any,
    queries: tf.Tensor,
    sink: Any,
    divisors: np.ndarray | None = None,
    first: int = 0,
    message: str = "",
) -> Any:
    """Writes ``-queries^T Phi_j`` for every row into ``sink`` (``(k, b)`` blocks).

    The top-k of a store comes from ``tf_influence.index.stream_top_k`` (float32).

    Args:
        rows: the index (a tensor or ``IndexRows``).
        queries: ``(dim, k)``, ``inverse @ P^T g_test``.
        sink: a ``ScoreSink``.
        divisors: ``(n,)`` to divide column j by, or None.
        first: the first training example not yet written (a resumed ``explain``).
        message: the error for a non-finite score (``{index}`` is filled in).
    """
    from tf_influence.index import GradientStore, stream_top_k
    from tf_influence.outputs import TopK, TopKSink

    if isinstance(rows, GradientStore) and isinstance(sink, TopKSink) and divisors is None:
        # The store's own streaming top-k: one compiled product per block read.
        top = stream_top_k(rows, np.transpose(queries.numpy()), sink.k)
        dtype = sink.low_scores.dtype
        return TopK(
            helpful_indices=top["top_helpful_indices"],
            helpful_scores=top["top_helpful_scores"].astype(dtype),
            harmful_indices=top["top_harmful_indices"],
            harmful_scores=top["top_harmful_scores"].astype(dtype),
        )
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
        values.append(inverse.quadratic(tf.transpose(block)).numpy())
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
