"""A seeded dense Johnson-Lindenstrauss matrix, generated block by block inside the graph.

The ``(rows, dim)`` matrix has entries ``N(0, 1/dim)`` (``"gaussian"``) or
``+-1/sqrt(dim)`` (``"rademacher"``), so that ``E[P P^T] = I``. It is defined by
its blocks of ``JL_BLOCK_ROWS`` rows: block ``i`` is drawn from the stateless seed
``(seed, JL_STREAM + i)``, so any block can be generated alone, in any order, in
the graph, and a product with the matrix holds one block at a time, never the
whole matrix.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

# Rows of the dense JL matrix generated at a time (part of its definition: the
# values of block i depend on it).
JL_BLOCK_ROWS = 512
# Second component of a JL block's stateless seed: JL_STREAM + block index (the
# Kronecker factors of ``engine.projection`` use small streams).
JL_STREAM = 2**32


def jl_block(kind: str, seed: int, index: Any, dim: int, dtype: tf.DType) -> tf.Tensor:
    """Rows ``index * JL_BLOCK_ROWS ...`` of the dense JL matrix, ``(JL_BLOCK_ROWS, dim)``.

    Traceable (``index`` may be a tensor).
    """
    key = tf.stack([tf.constant(seed, tf.int64), JL_STREAM + tf.cast(index, tf.int64)])
    shape = [JL_BLOCK_ROWS, dim]
    if kind == "rademacher":
        bits = tf.random.stateless_uniform(shape, key, 0, 2, dtype=tf.int32)
        values = tf.cast(2 * bits - 1, dtype)
    else:
        values = tf.random.stateless_normal(shape, key, dtype=dtype)
    return values / tf.cast(math.sqrt(dim), dtype)


def jl_matrix(kind: str, seed: int, rows: int, dim: int, dtype: tf.DType) -> tf.Tensor:
    """The dense JL matrix ``(rows, dim)``, its blocks stacked (small matrices and tests)."""
    blocks = [jl_block(kind, seed, i, dim, dtype) for i in range(-(-rows // JL_BLOCK_ROWS))]
    return tf.concat(blocks, axis=0)[:rows]


def project_rows(rows: tf.Tensor, kind: str, seed: int, dim: int, size: int) -> tf.Tensor:
    """``rows @ P`` for ``(b, size)`` rows, ``(b, dim)``: one generated block at a time."""
    count = -(-size // JL_BLOCK_ROWS)
    padded = tf.pad(rows, [[0, 0], [0, count * JL_BLOCK_ROWS - size]])

    def body(i, total):
        chunk = padded[:, i * JL_BLOCK_ROWS : (i + 1) * JL_BLOCK_ROWS]
        return i + 1, total + tf.matmul(chunk, jl_block(kind, seed, i, dim, rows.dtype))

    total = tf.zeros([tf.shape(rows)[0], dim], rows.dtype)
    _, total = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), total))
    return total


def expand(coefficients: tf.Tensor, kind: str, seed: int, rows: int, dim: int) -> tf.Tensor:
    """``P @ coefficients`` for ``(dim, k)`` coefficients, ``(rows, k)``, block by block."""
    count = -(-rows // JL_BLOCK_ROWS)
    blocks = tf.TensorArray(coefficients.dtype, size=count)

    def body(i, blocks):
        block = jl_block(kind, seed, i, dim, coefficients.dtype)
        return i + 1, blocks.write(i, tf.matmul(block, coefficients))

    _, blocks = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), blocks))
    return tf.reshape(blocks.stack(), [-1, tf.shape(coefficients)[1]])[:rows]
