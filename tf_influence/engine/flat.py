"""Flatten and unflatten lists of variables: the one place that does it.

Every other module works with one flat parameter vector of length
``num_params`` (or a matrix whose first axis is ``num_params``); this module
converts between that layout and the per-variable tensors that Keras and
``tf.GradientTape`` use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


class ParamLayout:
    """How a list of variables maps onto one flat vector.

    Args:
        variables: the variables, in order. Their shapes must be fully known.

    Attributes:
        shapes: the static shape of each variable.
        sizes: the number of elements of each variable.
        num_params: ``sum(sizes)``, the length of the flat vector.
    """

    def __init__(self, variables: Sequence[tf.Variable]):
        self.shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.num_params = int(sum(self.sizes))

    def flatten(self, tensors, dtype=None) -> tf.Tensor:
        """Concatenates per-variable tensors into one vector, shape ``(num_params,)``."""
        """``None`` entries (variables with no gradient) count as zeros."""
        dtype = dtype or _common_dtype(tensors)
        parts = [
            tf.zeros([size], dtype) if t is None else tf.cast(tf.reshape(t, [-1]), dtype)
            for t, size in zip(tensors, self.sizes, strict=True)
        ]
        return tf.concat(parts, axis=0)

    def flatten_batched(self, tensors, batch_size, dtype) -> tf.Tensor:
        """Concatenates per-variable tensors with a leading batch axis.

        Args:
            tensors: one tensor per variable, shape ``(batch, *variable.shape)``;
                ``None`` entries (no gradient) count as zeros.
            batch_size: the leading dimension (a scalar tensor or int).
            dtype: dtype of the result.

        Returns:
            Tensor of shape ``(batch, num_params)``.
        """
        parts = [
            tf.zeros([batch_size, size], dtype)
            if t is None
            else tf.cast(tf.reshape(t, [batch_size, size]), dtype)
            for t, size in zip(tensors, self.sizes, strict=True)
        ]
        return tf.concat(parts, axis=1)

    def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Splits a ``(num_params,)`` vector back into per-variable tensors."""
        parts = tf.split(vector, self.sizes, axis=0)
        return [tf.reshape(p, s) for p, s in zip(parts, self.shapes, strict=True)]

    def unflatten_columns(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Splits a ``(num_params, k)`` matrix into tensors of shape ``(*variable.shape, k)``."""
        parts = tf.split(matrix, self.sizes, axis=0)
        return [tf.reshape(p, list(s) + [-1]) for p, s in zip(parts, self.shapes, strict=True)]


def _common_dtype(tensors):
    for t in tensors:
        if t is not None:
            return t.dtype
    raise ValueError("Cannot flatten: every entry is None and no dtype was given.")
