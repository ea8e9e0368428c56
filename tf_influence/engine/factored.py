"""Per-example gradients of Dense, EinsumDense, convolution and Embedding layers from their factors.

A ``Dense`` layer computes ``z = a @ W + b`` (then its activation). The gradient
of one example's loss with respect to ``W`` is the outer product ``a_j (x) delta_j``
of the layer's input ``a_j`` and of ``delta_j = dL(z_j)/dz``; with respect to ``b``
it is ``delta_j``. Both factors come out of one ordinary batched forward and
backward pass, so per-example gradients of these layers need neither pfor nor
one backward pass per example (Goodfellow, 2015). A convolution's kernel
gradient is the same product summed over output positions, with ``a`` replaced
by the input patches (``tf.image.extract_patches``); an ``EinsumDense``, a
``DepthwiseConv2D`` and an ``Embedding`` have factors of their own
(``engine.factored_layers``).

Scores against solved vectors ``s_i`` then need no gradient at all for a layer
with one input vector per example: ``g_j . s_i = a_j^T S_i delta_j`` with ``S_i``
the kernel block of ``s_i``, one ``(b, in) x (in, out * k)`` matrix product for all
k vectors (the "ghost" product of Li et al., 2022), or ``(b, out) x (out, in * k)``
when ``in < out``. It is used while ``k <= max(in, out)``, where it needs no more
memory than the gradients would. An Embedding's scores gather the rows of ``S_i``
of the example's tokens. When a matrix kind's part of each ``s_i`` is of low rank,
``S_i = U_i V_i^T`` with ``r`` columns (K-FAC's ``query_rank``), the score is
``sum_t (a_jt^T U_i) . (V_i^T delta_jt)``: ``r * (in + out)`` products per
position instead of ``in * out`` (``low_rank_pays`` decides per layer).

The factors are taken by swapping, while one batch function is traced, the
``call`` of each eligible layer for one that records its input and
pre-activation output. A layer is eligible when it is exactly one of the kinds
of ``engine.factored_layers`` (``Dense``, ``EinsumDense`` with a covered
equation, ``Conv1D`` / ``Conv2D`` with channels last and ``groups=1``,
``DepthwiseConv2D``, ``Embedding``, ``BatchNormalization``, ``LayerNormalization``),
without LoRA or quantisation, and holds chosen parameters. Everything else (and
every layer if the model does something this cannot see, such as reading a Dense
kernel outside the layer) goes through vectorised per-example gradients; ``check``
compares, on a real batch, the summed factored gradients with the batch gradient
before any factored result is used.

References:
    Goodfellow, "Efficient Per-Example Gradient Computations", arXiv 1510.01799, 2015.
    Li, Tramer, Liang & Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners" (ghost clipping), ICLR 2022.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tensorflow as tf

from tf_influence.engine.curvature import tf_variable
from tf_influence.engine.factored_layers import (
    KERNEL_KINDS,
    MATRIX_KINDS,
    NORM_KINDS,
    FactoredLayer,
    FactoredUnavailable,
    bias_gradients,
    factored_layer,
    input_rows,
    kernel_gradients,
    output_rows,
    recorded_call,
)
from tf_influence.engine.objective import Objective

__all__ = [
    "KERNEL_KINDS",
    "MATRIX_KINDS",
    "NORM_KINDS",
    "FactoredGradients",
    "FactoredLayer",
    "FactoredUnavailable",
    "Use",
    "find_layers",
]

# Summed factored gradients must match the batch gradient to this fraction of
# the summed per-example gradient norms (float32 rounding is near 1e-6).
CHECK_RTOL = 1e-4
# ... of at least this fraction of the summed norms over every factored variable.
CHECK_FLOOR = 1e-3


@dataclass(frozen=True)
class Use:
    """One call of a factored layer in a batch: its input and the loss gradient at its output."""

    entry: FactoredLayer
    inputs: tf.Tensor
    delta: tf.Tensor


def find_layers(objective: Objective) -> list[FactoredLayer]:
    """The layers of the model whose chosen parameters can be factored."""
    position = {id(v): i for i, v in enumerate(objective.variables)}
    found = []
    for layer in objective.model._flatten_layers(include_self=False):
        entry = factored_layer(layer, position)
        if entry is not None:
            found.append(entry)
    return found


@contextlib.contextmanager
def _recording(layers: list[FactoredLayer], records: list):
    """Swaps each layer's ``call`` for one that appends ``(entry, inputs, z)`` to ``records``."""
    saved = []
    try:
        for entry in layers:
            layer = entry.layer
            saved.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", _recording_call(entry, records))
        yield
    finally:
        for layer, previous in saved:
            if previous is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)


def _recording_call(entry: FactoredLayer, records: list):
    def call(inputs, *args, **kwargs):
        recorded, z, outputs = recorded_call(entry, inputs, args, kwargs)
        records.append((entry, recorded, z))
        return outputs

    return call


class FactoredGradients:
    """Per-example gradients and scores of the factored layers of ``objective``.

    Args:
        objective: the per-example loss and the parameters.
        layers: the eligible layers (``find_layers``).
    """

    def __init__(self, objective: Objective, layers: list[FactoredLayer]):
        self.objective = objective
        self.layers = layers
        self.indices = sorted(i for e in layers for i in (e.kernel, e.bias) if i is not None)

    def uses(self, x, y, batch_grads=False) -> tuple[list[Use], tf.Tensor, list]:
        """One batched forward and backward pass.

        Returns:
            ``(uses, losses, batch_grads)``: every call of a factored layer with its
            input and ``dL/dz`` (rows are examples), the ``(b,)`` losses, and (if
            ``batch_grads``) the gradient of the summed loss for each factored
            variable, for ``check``.
        """
        records: list = []
        chosen = self.indices if batch_grads else []
        variables = [tf_variable(self.objective.variables[i]) for i in chosen]
        with tf.GradientTape() as tape:
            with _recording(self.layers, records):
                losses = self.objective.per_example_loss(x, y)
            total = tf.reduce_sum(losses)
        if not records:
            raise FactoredUnavailable("no factored layer was called")
        grads = tape.gradient(total, [z for _, _, z in records] + variables)
        deltas, batch_grads = grads[: len(records)], grads[len(records) :]
        uses = []
        for (entry, inputs, z), delta in zip(records, deltas, strict=True):
            # A call whose output the loss never reaches contributes nothing.
            uses.append(Use(entry, inputs, tf.zeros_like(z) if delta is None else delta))
        return uses, losses, batch_grads

    def per_example(self, uses: list[Use], size, dtype) -> dict[int, tf.Tensor]:
        """``{variable index: (b, variable size)}`` per-example gradients, summed over uses."""
        out: dict[int, tf.Tensor] = {}

        def add(index, value):
            value = tf.cast(tf.reshape(value, [size, -1]), dtype)
            out[index] = value if index not in out else out[index] + value

        for use in uses:
            entry = use.entry
            if entry.kernel is not None:
                add(entry.kernel, self._kernel_gradients(use, size))
            if entry.bias is not None:
                add(entry.bias, bias_gradients(entry, use.delta, size))
        return out

    def _kernel_gradients(self, use: Use, size) -> tf.Tensor:
        """``(b, kernel size)`` kernel gradients of one use (``(b, features)`` scales)."""
        if use.entry.kind in NORM_KINDS:
            product = tf.cast(use.inputs, use.delta.dtype) * use.delta
            return _rows(product, size, product.shape[-1], reduce=True)
        rows_in = input_rows(use.entry, use.inputs, size)
        return kernel_gradients(use.entry, rows_in, output_rows(use.entry, use.delta, size), size)

    def scores(
        self,
        uses: list[Use],
        size,
        blocks: list[tf.Tensor],
        queries: dict[int, tuple[tf.Tensor, tf.Tensor]] | None = None,
    ) -> tf.Tensor:
        """``(b, k)``: ``g_j . s_i`` over the factored variables (``blocks[i]`` is ``(n_i, k)``).

        ``queries``: ``{kernel index: (left (k, rows, r), right (k, cols, r))}`` for
        layers whose part of ``s_i`` is ``left[i] @ right[i]^T`` (kernel rows, then
        the bias row if any; ``blocks`` holds the same values densely). Those layers
        are scored from the factors where that takes fewer products.
        """
        k = tf.shape(blocks[0])[1]
        dtype = blocks[0].dtype
        total = tf.zeros([size, k], dtype)
        queries = queries or {}
        for use in uses:
            entry = use.entry
            delta = tf.cast(use.delta, dtype)
            factors = queries.get(entry.kernel) if entry.kernel is not None else None
            if factors is not None and low_rank_pays(use, *factors):
                total += self._low_rank_scores(use, size, *factors)
                continue
            if entry.kernel is not None:
                block = blocks[entry.kernel]
                if _one_position(use):
                    rows_in = tf.cast(input_rows(entry, use.inputs, size), dtype)[:, 0]
                    rows_out = output_rows(entry, delta, size)[:, 0]
                    total += self._ghost_scores(rows_in, rows_out, block, k)
                elif entry.kind == "embedding":
                    total += self._embedding_scores(use, delta, size, block, k)
                else:
                    grads = tf.cast(self._kernel_gradients(use, size), dtype)
                    total += tf.matmul(tf.reshape(grads, [size, -1]), block)
            if entry.bias is not None:
                rows = tf.cast(bias_gradients(entry, use.delta, size), dtype)
                total += tf.matmul(rows, blocks[entry.bias])
        return total

    def _embedding_scores(self, use: Use, delta, size, block, k) -> tf.Tensor:
        """``sum_t S_i[token_t] . delta_t``: the solved vectors' rows of the example's tokens.

        Gathering holds ``(b, t, dim, k)`` values, the gradients ``(b, vocabulary * dim)``;
        the smaller is used.
        """
        vocabulary, dim = use.entry.layer.embeddings.shape
        tokens = input_rows(use.entry, use.inputs, size)
        rows_out = output_rows(use.entry, delta, size)  # (b, t, dim)

        def gathered():
            table = tf.reshape(block, [vocabulary, dim, k])
            return tf.einsum("btdk,btd->bk", tf.gather(table, tokens), rows_out)

        def materialised():
            grads = kernel_gradients(use.entry, tokens, rows_out, size)
            return tf.matmul(grads, block)

        return tf.cond(tf.shape(tokens)[1] * k <= vocabulary, gathered, materialised)

    @staticmethod
    def _low_rank_scores(use: Use, size, left, right) -> tf.Tensor:
        """``sum_t (a_t^T left_i) . (right_i^T delta_t)``, ``(b, k)``, bias included."""
        dtype = left.dtype
        k, rows, rank = tf.shape(left)[0], left.shape[1], left.shape[2]
        cols = right.shape[1]
        inputs = tf.cast(input_rows(use.entry, use.inputs, size), dtype)  # (b, t, in)
        fan_in = inputs.shape[-1]
        rows_in = tf.reshape(inputs, [-1, fan_in])  # (b * t, in)
        delta = tf.cast(output_rows(use.entry, use.delta, size), dtype)  # (b, t, out)
        rows_out = tf.reshape(delta, [-1, cols])  # (b * t, out)
        left = tf.reshape(tf.transpose(left, [1, 0, 2]), [rows, -1])  # (rows, k * r)
        right = tf.reshape(tf.transpose(right, [1, 0, 2]), [cols, -1])
        projected = tf.matmul(rows_in, left[:fan_in])
        if rows > fan_in:  # the bias row meets a constant 1
            projected += left[fan_in]
        products = projected * tf.matmul(rows_out, right)  # (b * t, k * r)
        return tf.reduce_sum(tf.reshape(products, [size, -1, k, rank]), axis=[1, 3])

    @staticmethod
    def _ghost_scores(inputs, delta, block, k) -> tf.Tensor:
        """``a_j^T S_i delta_j`` for a Dense layer, or the same from materialised gradients.

        The ghost product multiplies ``S`` by whichever factor is wider, leaving
        ``(b, min(in, out) * k)`` values to weigh by the other factor.
        """
        fan_in, fan_out = inputs.shape[-1], delta.shape[-1]
        width = min(fan_in, fan_out)

        def ghost():
            if fan_out <= fan_in:  # (a S_i) . delta
                kernel = tf.reshape(block, [fan_in, fan_out * k])
                products, other = tf.matmul(inputs, kernel), delta
            else:  # a . (S_i delta)
                kernel = tf.reshape(block, [fan_in, fan_out, k])
                kernel = tf.reshape(tf.transpose(kernel, [1, 0, 2]), [fan_out, fan_in * k])
                products, other = tf.matmul(delta, kernel), inputs
            products = tf.reshape(products, [-1, width, k])
            return tf.einsum("bwk,bw->bk", products, other)

        def materialised():
            grads = tf.reshape(tf.einsum("bi,bo->bio", inputs, delta), [-1, fan_in * fan_out])
            return tf.matmul(grads, block)

        # The ghost product holds (b, min(in, out) * k) values, the gradients (b, in * out).
        return tf.cond(k <= max(fan_in, fan_out), ghost, materialised)

    def check(self, uses: list[Use], size, batch_grads) -> tf.Tensor:
        """True if the factored gradients add up to the batch gradient of every variable.

        A model that reads a factored kernel outside its layer, or a layer whose rows
        are not the batch's examples (e.g. inside ``TimeDistributed``), fails this check.
        """
        static = tf.get_static_value(size)
        if any(static is not None and u.inputs.shape[0] not in (None, static) for u in uses):
            return tf.constant(False)
        ok = tf.constant(True)
        for use in uses:
            ok = tf.logical_and(ok, tf.equal(tf.shape(use.inputs)[0], size))
        per_example = self.per_example(uses, size, tf.float64)
        pairs = []
        for index, grad in zip(self.indices, batch_grads, strict=True):
            mine = per_example.get(index)
            if mine is None:
                if grad is None:
                    continue  # a layer never called, and no gradient from elsewhere
                return tf.constant(False)  # read outside its layer
            if grad is None:
                grad = tf.zeros_like(mine[0])
            pairs.append((mine, tf.cast(tf.reshape(grad, [-1]), tf.float64)))
        scales = [tf.reduce_sum(tf.norm(mine, axis=1)) for mine, _ in pairs]
        # A floor relative to all the factored gradients: a variable whose gradient is
        # zero in exact arithmetic (an attention key's bias: softmax ignores a shift)
        # holds rounding noise only, which its own scale cannot judge.
        floor = CHECK_FLOOR * tf.add_n(scales) if scales else 0.0
        for (mine, batch), scale in zip(pairs, scales, strict=True):
            error = tf.norm(tf.reduce_sum(mine, axis=0) - batch)
            ok = tf.logical_and(ok, error <= CHECK_RTOL * (scale + floor) + 1e-30)
        return ok


def positions(use: Use) -> int | None:
    """Rows per example of a matrix kind's factors (its positions), if known when tracing."""
    entry = use.entry
    # Dense: the input's middle axes; a convolution: one patch per output position.
    shape = use.inputs.shape if entry.kind in ("dense", "einsum") else use.delta.shape
    if shape.rank is None:
        return None
    if entry.kind == "einsum":  # the input axes that are neither the batch nor contracted
        order = entry.einsum.input_order
        middle = tf.TensorShape([shape[i] for i in order[1 : len(order) - entry.einsum.split]])
    else:
        middle = shape[1:-1]
    return middle.num_elements()


def low_rank_pays(use: Use, left: tf.Tensor, right: tf.Tensor) -> bool:
    """Whether scoring from rank-r factors takes fewer products than from the gradients.

    Per example and test vector: ``t * r * (rows + cols)`` from the factors, against
    ``rows * cols`` for the dot product with the per-example gradient, formed once
    for all test vectors (``t`` positions: 1 for a Dense layer on vectors).
    """
    t = positions(use)
    rows, cols, rank = left.shape[1], right.shape[1], left.shape[2]
    return t is not None and t * rank * (rows + cols) < rows * cols


def _one_position(use: Use) -> bool:
    """True for a matrix kind with one input vector per example (the ghost product applies)."""
    entry = use.entry
    if entry.kind == "dense":
        return use.inputs.shape.rank == 2
    return entry.kind == "einsum" and entry.einsum.one_position


def _rows(tensor, size, width, reduce=False) -> tf.Tensor:
    """``(b, t, width)`` (or ``(b, width)`` summed over t) from ``(b, ..., width)``."""
    rows = tf.reshape(tensor, [size, -1, width])
    return tf.reduce_sum(rows, axis=1) if reduce else rows
