"""Queries that stream over a ``GradientStore`` block by block, in bounded memory.

With ``rows`` the stored projected training gradients and ``queries`` the solved
projected test vectors (``inv(H_proj) @ P @ grad L(z_test)``), the influence is

    scores[i, j] = -queries[i] @ rows[j]        # I_up,loss in the projected space

(positive: up-weighting training example j raises test loss i, harmful; negative:
helpful). Each block costs one product ``(m, dim) x (dim, b)`` (float16 rows are
cast inside the compiled kernel) and, for top-k, a merge with the k kept so far
that only looks at the block's values better than the current k-th (one
comparison per value; a partition only when many pass). RAM holds one block of
rows, its ``(m, b)`` scores and the ``(m, k)`` kept, whatever n is.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence._validation import check_positive_int
from tf_influence.index import kernels
from tf_influence.index.blockio import choose_block_rows
from tf_influence.index.store import GradientStore


def _check_store(store) -> GradientStore:
    if not isinstance(store, GradientStore):
        raise ValueError(
            "Argument `store` must be a tf_influence.index.GradientStore (see "
            f"GradientStore.open). Received: store={describe(store)}"
        )
    store._check_complete()
    return store


def _check_queries(store: GradientStore, queries) -> np.ndarray:
    values = np.asarray(queries)
    if values.ndim != 2 or values.shape[1] != store.dim or values.dtype.kind not in "fiu":
        raise ValueError(
            f"Argument `queries` must be a real (m, {store.dim}) array: one solved projected "
            f"test vector per row, of the store's dim {store.dim} (a single vector v: pass "
            f"v[None]). Received: queries={describe(queries)}"
        )
    values = np.ascontiguousarray(values, np.float32)
    if not np.isfinite(values).all():
        raise ValueError(
            "Argument `queries` holds NaN or inf (row "
            f"{int(np.flatnonzero(~np.isfinite(values).all(1))[0])}). Received: "
            f"queries={describe(queries)}"
        )
    return values


def _dot_blocks(store: GradientStore, queries: np.ndarray, block_rows: int | None):
    """``(start, dots)`` with ``dots = queries @ rows[start:start + b]^T``, ``(m, b)``."""
    m = queries.shape[0]
    block_rows = choose_block_rows(
        block_rows, store.num_rows, store.dim * np.dtype(store.dtype).itemsize + 4 + 4 * m
    )
    query_tensor = kernels.as_tensor(queries)
    for start, count, block, scales in store.raw_blocks(block_rows):
        dots = kernels.dots(kernels.as_tensor(block), kernels.as_tensor(scales), query_tensor)
        yield start, dots.numpy()[:, :count]


class RunningTopK:
    """The ``k`` largest values of each row of a stream of ``(m, b)`` blocks, with indices.

    Ties go to the lower index, as ``np.argsort(-values, kind="stable")[:, :k]`` of
    the whole matrix would; blocks must arrive in index order.
    """

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.values = np.empty((num_queries, 0), np.float32)
        self.indices = np.empty((num_queries, 0), np.int64)

    def update(self, start: int, values: np.ndarray) -> None:
        """Merges the block ``values`` (columns ``start:start + b``) into the kept."""
        m, kept = self.values.shape
        if kept < self.k:
            mask = np.ones(values.shape, bool)
        else:  # only values strictly better than the k-th kept (ties: lower index)
            mask = values > self.values[:, -1:]
        if values.shape[1] > self.k and np.count_nonzero(mask) > 4 * m * self.k + 4096:
            kth = -np.partition(-values, self.k - 1, axis=1)[:, self.k - 1 : self.k]
            mask &= values >= kth  # at least k per row, with every tie of the k-th
        rows, columns = np.nonzero(mask)
        all_rows = np.concatenate([np.repeat(np.arange(m), kept), rows])
        all_values = np.concatenate([self.values.ravel(), values[rows, columns]])
        all_indices = np.concatenate([self.indices.ravel(), start + columns])
        order = np.lexsort((all_indices, -all_values, all_rows))
        counts = kept + np.bincount(rows, minlength=m)
        width = min(self.k, int(counts.min()))
        take = (np.cumsum(counts) - counts)[:, None] + np.arange(width)
        self.values = all_values[order[take]]
        self.indices = all_indices[order[take]]


def stream_top_k(
    store: GradientStore, queries: np.ndarray, k: int, block_rows: int | None = None
) -> dict[str, np.ndarray]:
    """The k most harmful and most helpful training examples per query, in one pass.

    Returns the top-k of ``scores[i, j] = -queries[i] @ rows[j]`` (I_up,loss in the
    projected space: positive = harmful, negative = helpful), exactly as the top-k
    of the dense ``(m, n)`` score matrix would be, ties going to the lower training
    index, without ever holding that matrix.

    Args:
        store: a complete ``GradientStore`` (e.g. ``GradientStore.open(path)``).
        queries: ``(m, dim)`` solved projected test vectors (cast to float32).
        k: how many of each; values above ``store.num_rows`` are clamped to it.
        block_rows: rows per block; default: about ``BLOCK_BYTES`` of memory.

    Returns:
        ``top_harmful_indices``, ``top_harmful_scores`` (largest scores first),
        ``top_helpful_indices``, ``top_helpful_scores`` (most negative first), each
        ``(m, min(k, n))``; indices int64, scores float32.

    Raises:
        ValueError: ``k`` or ``block_rows`` not a positive integer, ``queries`` not
            ``(m, store.dim)`` or not finite, or the store not complete.
    """
    store = _check_store(store)
    k = min(check_positive_int("k", k), store.num_rows)
    queries = _check_queries(store, queries)
    harmful, helpful = RunningTopK(len(queries), k), RunningTopK(len(queries), k)
    if len(queries):
        for start, dots in _dot_blocks(store, queries, block_rows):
            harmful.update(start, -dots)  # scores
            helpful.update(start, dots)  # -scores
    result = {
        "top_harmful_indices": harmful.indices,
        "top_harmful_scores": harmful.values,
        "top_helpful_indices": helpful.indices,
        "top_helpful_scores": -helpful.values,
    }
    if len(queries) == 0:
        result = {key: np.empty((0, k), value.dtype) for key, value in result.items()}
    elif not (np.isfinite(harmful.values).all() and np.isfinite(helpful.values).all()):
        raise ValueError(
            "The scores overflowed float32 (inf among the top-k): the queries or the stored "
            "rows are too large. Rescale the queries (scores scale linearly with them)."
        )
    return result


def stream_scores(
    store: GradientStore,
    queries: np.ndarray,
    block_rows: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The full score matrix ``scores[i, j] = -queries[i] @ rows[j]`` (I_up,loss).

    Args:
        store: a complete ``GradientStore``.
        queries: ``(m, dim)`` solved projected test vectors (cast to float32).
        block_rows: rows per block; default: about ``BLOCK_BYTES`` of memory.
        out: where to write, ``(m, n)`` float32 (e.g. ``np.lib.format.open_memmap``
            for a matrix larger than RAM); default: a new array.

    Returns:
        ``(m, n)`` float32 scores (``out`` when given).

    Raises:
        ValueError: bad ``queries``, ``block_rows`` or ``out``, or an incomplete store.
    """
    store = _check_store(store)
    queries = _check_queries(store, queries)
    shape = (len(queries), store.num_rows)
    if out is None:
        out = np.empty(shape, np.float32)
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32:
        raise ValueError(
            f"Argument `out` must be a float32 array of shape {shape} (queries x rows). "
            f"Received: out={describe(out)}"
        )
    if len(queries):
        for start, dots in _dot_blocks(store, queries, block_rows):
            np.negative(dots, out=out[:, start : start + dots.shape[1]])
    return out


def stream_quadratic(
    store: GradientStore, matrix: np.ndarray, block_rows: int | None = None
) -> np.ndarray:
    """``rows[j] @ matrix @ rows[j]`` for every stored row, e.g. self-influence.

    With ``matrix = inv(H_proj)`` this is ``self_influence()[j]`` in the projected
    space, ``g_j^T inv(H) g_j`` (non-negative for a positive-definite H).

    Args:
        store: a complete ``GradientStore``.
        matrix: ``(dim, dim)`` (cast to float32).
        block_rows: rows per block; default: about ``BLOCK_BYTES`` of memory.

    Returns:
        ``(n,)`` float32.

    Raises:
        ValueError: ``matrix`` not ``(dim, dim)`` and finite, bad ``block_rows``, or an
            incomplete store.
    """
    store = _check_store(store)
    values = np.asarray(matrix)
    if (
        values.shape != (store.dim, store.dim)
        or values.dtype.kind not in "fiu"
        or not np.isfinite(values).all()
    ):
        raise ValueError(
            f"Argument `matrix` must be a finite ({store.dim}, {store.dim}) array (the "
            f"store's dim). Received: matrix={describe(matrix)}"
        )
    matrix_tensor = kernels.as_tensor(np.ascontiguousarray(values, np.float32))
    block_rows = choose_block_rows(
        block_rows, store.num_rows, store.dim * (np.dtype(store.dtype).itemsize + 8) + 8
    )
    result = np.empty(store.num_rows, np.float32)
    for start, count, block, scales in store.raw_blocks(block_rows):
        part = kernels.quadratic(kernels.as_tensor(block), kernels.as_tensor(scales), matrix_tensor)
        result[start : start + count] = part.numpy()[:count]
    return result


def stream_gram(store: GradientStore, block_rows: int | None = None) -> np.ndarray:
    """``rows^T @ rows``, the ``(dim, dim)`` Gram matrix of the store (``Phi^T Phi``).

    Each block's product is float32; blocks are summed in float64.

    Args:
        store: a complete ``GradientStore``.
        block_rows: rows per block; default: about ``BLOCK_BYTES`` of memory.

    Returns:
        ``(dim, dim)`` float64, symmetric.
    """
    store = _check_store(store)
    block_rows = choose_block_rows(
        block_rows, store.num_rows, store.dim * (np.dtype(store.dtype).itemsize + 4) + 4
    )
    total = np.zeros((store.dim, store.dim), np.float64)
    for _, count, block, scales in store.raw_blocks(block_rows):
        part = kernels.gram(
            kernels.as_tensor(block), kernels.as_tensor(scales), tf.constant(count, tf.int32)
        )
        total += part.numpy()
    return total
