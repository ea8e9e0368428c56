"""Per kind of factored layer: its Kronecker factors, eigenbasis, corrections and layout.

A block (``solvers.ekfac._Block``) is the layer's ``[kernel; bias]`` seen as

* one ``(rows, cols)`` matrix: Dense, EinsumDense, Conv1D, Conv2D (``rows`` the
  input factor's size plus the bias row, ``cols`` the output's);
* ``groups`` of them: a DepthwiseConv2D, one ``(kh * kw + 1, depth_multiplier)``
  matrix per input channel, whose own ``A_c`` and ``S_c`` give a block of C small
  Kronecker products (the curvature between channels is dropped);
* an Embedding's ``(vocabulary, dim)`` table, whose ``A`` is diagonal (the tokens'
  frequencies per position), so ``Q_A`` is the identity and is never formed.

``A`` sums ``a_t a_t^T`` over positions and examples (``fit`` divides by the
positions per example, then by n) and ``S`` sums ``delta_t delta_t^T``; the EK-FAC
correction either rotates both factors into the eigenbasis before it multiplies
them into the layer's gradient of one example, or forms that gradient and rotates
it, whichever takes fewer products (a Dense layer on vectors never forms it).
"""

from __future__ import annotations

import tensorflow as tf

from tf_influence.engine.factored_layers import input_rows, output_rows


def _inputs(block, inputs, dtype) -> tf.Tensor:
    """``(b, t, rows)`` (``(b, t, C, rows)`` grouped): the input factor with a bias column."""
    rows = tf.cast(input_rows(block.entry, inputs, tf.shape(inputs)[0]), dtype)
    if block.groups:
        rows = tf.transpose(rows, [0, 1, 3, 2])  # (b, t, C, kh * kw)
    if block.bias:
        rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
    return rows


def _outputs(block, delta, dtype) -> tf.Tensor:
    """``(b, t, cols)`` (``(b, t, C, cols)`` grouped): the output gradient per position."""
    return tf.cast(output_rows(block.entry, delta, tf.shape(delta)[0]), dtype)


def input_moments(block, inputs, dtype) -> tuple[tf.Tensor, tf.Tensor]:
    """``(sum over the batch of sum_t a_t a_t^T, t)`` of one call, the sum in float64.

    An Embedding's is the diagonal, ``(vocabulary,)`` token counts.
    """
    if block.one_hot:
        tokens = input_rows(block.entry, inputs, tf.shape(inputs)[0])
        counts = tf.math.unsorted_segment_sum(
            tf.ones(tf.shape(tokens), tf.float64), tokens, block.fan_in
        )
        return counts, tf.shape(tokens)[1]
    rows = _inputs(block, inputs, dtype)
    return _gram(block, rows), tf.shape(rows)[1]


def output_moments(block, delta, dtype) -> tf.Tensor:
    """The sum over the batch of ``sum_t delta_t delta_t^T`` of one call, in float64."""
    return _gram(block, _outputs(block, delta, dtype))


def _gram(block, rows) -> tf.Tensor:
    """``sum_{b,t} r r^T`` of ``(b, t, n)`` rows (per group for ``(b, t, C, n)``), float64.

    One matrix product of the ``(b * t, n)`` rows with themselves: 1.7 to 2 times
    faster on CPU than the equivalent ``einsum`` for a convolution's patches.
    """
    if block.groups:
        return tf.cast(tf.einsum("btci,btcj->cij", rows, rows), tf.float64)
    flat = tf.reshape(rows, [-1, rows.shape[-1]])
    return tf.cast(tf.matmul(flat, flat, transpose_a=True), tf.float64)


def eigen(block, a: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor]:
    """``(Q_A, Q_S, l_A l_S^T)`` of the factors (``Q_A`` None for an Embedding)."""
    ls, qs = tf.linalg.eigh(s)
    la, qa = (a, None) if block.one_hot else tf.linalg.eigh(a)
    values = tf.maximum(la, 0.0)[..., :, None] * tf.maximum(ls, 0.0)[..., None, :]
    return qa, qs, values


def rotated_squares(block, calls, qa, qs, dtype) -> tf.Tensor:
    """``sum_j (Q_A^T G_j Q_S)^2`` over a batch, ``G_j = sum_t a_jt delta_jt^T`` (all calls).

    Either the factors are rotated first (``Q_A^T a``, ``Q_S^T delta``), then
    multiplied into the rotated gradient of this layer alone, or the gradient
    ``G_j`` is formed and rotated, whichever takes fewer products
    (``_gradient_first``; for the residual CNN of ``benchmarks.residual_cnn`` on
    CPU, per batch of 32: the gradient first 3.4 times faster on a 32x32 layer of
    64 channels, the factors first 4 times faster on an 8x8 layer of 256). One
    vector per example (a Dense layer) needs no gradient at all; an Embedding sums
    the rotated ``delta`` of each example's distinct tokens.
    """
    if block.one_hot:
        return _token_squares(block, calls, qs, dtype)
    rows = [(_inputs(block, x, dtype), _outputs(block, delta, dtype)) for x, delta in calls]
    if block.groups:
        grads = tf.add_n(
            [
                tf.einsum(
                    "btcj,btcp->bcjp",
                    tf.einsum("btci,cij->btcj", a, qa),
                    tf.einsum("btco,cop->btcp", d, qs),
                )
                for a, d in rows
            ]
        )  # (b, C, rows, cols)
        return tf.reduce_sum(tf.square(grads), axis=0)
    if len(rows) == 1 and rows[0][0].shape[1] == 1:
        # (a~ d~^T)^2 = a~^2 d~^2^T, summed over examples.
        a = tf.matmul(rows[0][0][:, 0], qa)
        d = tf.matmul(rows[0][1][:, 0], qs)
        return tf.matmul(tf.square(a), tf.square(d), transpose_a=True)
    if _gradient_first(block, rows):
        grads = tf.add_n([tf.matmul(a, d, transpose_a=True) for a, d in rows])  # (b, rows, cols)
        grads = tf.matmul(tf.matmul(qa, grads, transpose_a=True), qs)
    else:
        grads = tf.add_n(
            [
                tf.matmul(
                    tf.reshape(tf.matmul(tf.reshape(a, [-1, block.rows]), qa), tf.shape(a)),
                    tf.reshape(tf.matmul(tf.reshape(d, [-1, block.cols]), qs), tf.shape(d)),
                    transpose_a=True,
                )
                for a, d in rows
            ]
        )  # (b, rows, cols)
    return tf.reduce_sum(tf.square(grads), axis=0)


def _gradient_first(block, rows) -> bool:
    """Whether forming ``G_j`` then rotating it takes fewer products than rotating the factors.

    Per example, over the calls' ``t`` positions: rotating the factors first costs
    ``t * (rows^2 + cols^2 + rows * cols)``, the gradient first ``t * rows * cols``
    plus ``rows * cols * (rows + cols)`` once. Many positions and few output
    channels (an early convolution) favour the gradient; few positions and wide
    layers (a late one) the factors. Unknown positions: the factors.
    """
    if any(a.shape[1] is None for a, _ in rows):
        return False
    t = sum(int(a.shape[1]) for a, _ in rows)
    r, c = block.rows, block.cols
    return r * c * (t + r + c) < t * (r * r + c * c + r * c)


def _token_squares(block, calls, qs, dtype) -> tf.Tensor:
    """An Embedding's ``(vocabulary, dim)`` sums: row v of ``G_j Q_S`` is the rotated
    ``delta`` summed over example j's positions holding token v."""
    ids, values = [], []
    for inputs, delta in calls:
        size = tf.shape(delta)[0]
        tokens = tf.cast(input_rows(block.entry, inputs, size), tf.int64)  # (b, t)
        rows = tf.reshape(_outputs(block, delta, dtype), [-1, block.cols])
        values.append(tf.matmul(rows, qs))
        example = tf.range(tf.cast(size, tf.int64))[:, None]
        ids.append(tf.reshape(example * block.fan_in + tokens, [-1]))
    unique, index = tf.unique(tf.concat(ids, axis=0))
    summed = tf.math.unsorted_segment_sum(tf.concat(values, axis=0), index, tf.shape(unique)[0])
    return tf.math.unsorted_segment_sum(tf.square(summed), unique % block.fan_in, block.fan_in)


# -- the block's layout among the parameters ---------------------------------------------
def to_matrices(block, kernel: tf.Tensor, bias: tf.Tensor | None) -> tf.Tensor:
    """``(k, rows, cols)`` (``(k, C, rows, cols)`` grouped) from ``(size, k)`` parts."""
    if block.groups:
        shape = [block.fan_in, block.groups, block.cols, -1]
        matrices = tf.transpose(tf.reshape(kernel, shape), [3, 1, 0, 2])
        if bias is not None:
            row = tf.transpose(tf.reshape(bias, [block.groups, block.cols, -1]), [2, 0, 1])
            matrices = tf.concat([matrices, row[:, :, None]], axis=2)
        return matrices
    matrices = tf.reshape(kernel, [block.fan_in, block.cols, -1])
    if bias is not None:
        matrices = tf.concat([matrices, bias[None]], axis=0)
    return tf.transpose(matrices, [2, 0, 1])


def from_matrices(block, matrices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """The ``(kernel size, k)`` and ``(bias size, k)`` parts of ``to_matrices``'s layout."""
    k = tf.shape(matrices)[0]
    if block.groups:
        kernel = tf.transpose(matrices[:, :, : block.fan_in], [2, 1, 3, 0])  # (P, C, M, k)
        bias = None
        if block.bias:
            bias = tf.reshape(tf.transpose(matrices[:, :, block.fan_in], [1, 2, 0]), [-1, k])
        return tf.reshape(kernel, [-1, k]), bias
    parts = tf.transpose(matrices, [1, 2, 0])  # (rows, cols, k)
    kernel = tf.reshape(parts[: block.fan_in], [-1, k])
    return kernel, parts[block.fan_in] if block.bias else None


def rotate(block, matrices: tf.Tensor, qa, qs, back: bool = False) -> tf.Tensor:
    """``Q_A^T M Q_S`` (or ``Q_A M Q_S^T`` with ``back``) for every matrix ``M``."""
    if not block.one_hot:
        matrices = tf.matmul(qa, matrices, transpose_a=not back)
    return tf.matmul(matrices, qs, transpose_b=back)


def projected(block, kernel: tf.Tensor, bias: tf.Tensor | None, qa, qs) -> tf.Tensor:
    """The diagonal of ``Q^T D Q`` for a diagonal ``D`` given by its kernel and bias parts."""
    matrix = to_matrices(block, kernel[:, None], None if bias is None else bias[:, None])[0]
    if not block.one_hot:
        matrix = tf.matmul(tf.square(qa), matrix, transpose_a=True)
    return tf.matmul(matrix, tf.square(qs))
