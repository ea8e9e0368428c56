"""The per-block work of the stream, compiled once per shape with XLA.

Each kernel takes one block of stored rows as they are on disk (float16 or
float32) with their per-row scales, so the conversion to float32 is fused into
the product instead of writing a float32 copy of the block (numpy's float16 to
float32 cast alone costs about 1.8 ns per value on the benchmark CPU, more than
reading the row). Blocks always have the same number of rows (the last one is
padded by the caller), so a stream traces each kernel once.

Blocks reach TensorFlow through DLPack, without a copy: the stream reads the
file into one reused, 64-byte aligned numpy buffer and hands TensorFlow a view
of it (``as_tensor``). A view is only used inside the call that made it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_ALIGN = 64  # bytes; what TensorFlow's CPU kernels and XLA expect of a buffer


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero-filled, C-ordered array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset : offset + size].view(dtype).reshape(shape)


def as_tensor(array: np.ndarray) -> tf.Tensor:
    """A ``tf.Tensor`` sharing ``array``'s memory (DLPack) if it is aligned, else a copy.

    TensorFlow's CPU kernels assume aligned buffers (a misaligned one aborts the
    process in some of them), so only C-ordered arrays on a 64-byte boundary, such
    as ``aligned_empty``'s, are shared.
    """
    if array.flags.c_contiguous and array.ctypes.data % _ALIGN == 0:
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except (AttributeError, TypeError, ValueError, tf.errors.OpError):  # pragma: no cover
            pass
    return tf.convert_to_tensor(array)


def _rows(block: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
    return tf.cast(block, tf.float32) * scales[:, None]


@tf.function(jit_compile=True)
def dots(block: tf.Tensor, scales: tf.Tensor, queries: tf.Tensor) -> tf.Tensor:
    """``queries @ rows^T``: ``(m, dim) x (b, dim) -> (m, b)`` float32.

    ``rows = float32(block) * scales[:, None]``; ``block`` is ``(b, dim)`` float16
    or float32, ``scales`` ``(b,)`` float32.
    """
    return tf.linalg.matmul(queries, tf.cast(block, tf.float32), transpose_b=True) * scales


@tf.function(jit_compile=True)
def rows(block: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
    """The block as float32 rows, ``(b, dim)``."""
    return _rows(block, scales)


@tf.function(jit_compile=True)
def quadratic(block: tf.Tensor, scales: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """``rows[j] @ matrix @ rows[j]`` for each row of the block, ``(b,)`` float32."""
    values = _rows(block, scales)
    return tf.reduce_sum(tf.linalg.matmul(values, matrix) * values, axis=1)


@tf.function(jit_compile=True)
def gram(block: tf.Tensor, scales: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """``rows[:count]^T @ rows[:count]``, ``(dim, dim)`` float32 (padding rows masked)."""
    valid = tf.range(tf.shape(block)[0]) < count
    values = _rows(block, tf.where(valid, scales, tf.zeros_like(scales)))
    return tf.linalg.matmul(values, values, transpose_a=True)


@tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
def encode_float16(values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(values / scales[:, None]`` as float16, ``scales)``, ``scales = max(abs(row))``.

    Rows of zeros keep a scale of 0. Traced once for any block shape (not compiled:
    blocks written come in many sizes); 2.8 us per 1,024-wide row against numpy's 6.1.
    """
    scales = tf.reduce_max(tf.abs(values), axis=1)
    safe = tf.where(scales > 0, scales, tf.ones_like(scales))
    return tf.cast(values / safe[:, None], tf.float16), scales
