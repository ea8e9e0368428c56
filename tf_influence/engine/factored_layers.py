"""Which layers are factored, and the two factors of each kind's kernel gradient.

While a batch function is traced, each eligible layer's ``call`` is swapped for
one that records its input and its pre-activation output ``z``
(``engine.factored``); ``delta = dL/dz`` comes from the ordinary backward pass.
Each kind's kernel gradient for one example is then a product of two factors
summed over positions ``t``:

* matrix kinds, a ``(fan_in, fan_out)`` kernel, gradient ``sum_t a_t delta_t^T``:
  ``"dense"`` (``a`` the input; a sequence input has one position per step),
  ``"conv1d"`` / ``"conv2d"`` (``a`` the input patches, one position per output
  pixel), ``"einsum"`` (an ``EinsumDense`` whose kernel axes are contracted input
  axes followed by output axes, e.g. ``abc,cde->abde`` or ``abcd,cde->abe``: ``a``
  the input's contracted axes, ``delta`` the output's kernel axes, the other axes
  of the input positions).
* ``"depthwise"``: a ``DepthwiseConv2D`` kernel ``(kh, kw, C, M)``; per input
  channel ``c``, ``sum_t p_tc delta_tc^T`` with ``p_tc`` the channel's ``kh * kw``
  patch values and ``delta_tc`` its ``M = depth_multiplier`` outputs.
* ``"embedding"``: an ``Embedding`` table ``(vocabulary, dim)``,
  ``sum_t e_{token_t} delta_t^T`` (a one-hot input).

The bias gradient is ``sum_t delta_t``. ``BatchNormalization`` (inference) and
``LayerNormalization`` (``"batchnorm"``, ``"layernorm"``) scales and shifts act
per feature: their gradients are ``sum x_hat * delta`` and ``sum delta``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import keras
import tensorflow as tf

MATRIX_KINDS = ("dense", "conv1d", "conv2d", "einsum")
KERNEL_KINDS = (*MATRIX_KINDS, "depthwise", "embedding")
NORM_KINDS = ("batchnorm", "layernorm")


class FactoredUnavailable(Exception):
    """Raised while tracing when a layer's factors cannot be taken (then pfor is used)."""


@dataclass(frozen=True)
class EinsumAxes:
    """How an ``EinsumDense`` equation maps to ``z = a @ W`` over positions.

    Attributes:
        input_order: the permutation of the input to ``(batch, positions..., contracted...)``.
        output_order: the permutation of the output to ``(batch, positions..., kernel outputs...)``.
        split: the number of contracted (leading) kernel axes.
        bias_fits: True when the bias spans exactly the kernel's output axes, in the
            kernel's order, so that it is the ``[kernel; bias]`` block's last row.
    """

    input_order: tuple[int, ...]
    output_order: tuple[int, ...]
    split: int
    bias_fits: bool

    @property
    def one_position(self) -> bool:
        """True when the batch is the input's only axis besides the contracted ones."""
        return len(self.input_order) - self.split == 1


@dataclass(frozen=True)
class FactoredLayer:
    """An eligible layer and the positions of its kernel and bias among the parameters."""

    layer: keras.layers.Layer
    kind: str  # one of KERNEL_KINDS or NORM_KINDS
    kernel: int | None
    bias: int | None
    einsum: EinsumAxes | None = None


def kind_of(layer) -> str | None:
    """The kind of ``layer`` (see the module docstring), or None if it is not factored."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    kind = type(layer)
    if kind is keras.layers.Dense:
        return "dense"
    if kind is keras.layers.BatchNormalization and not getattr(layer, "renorm", False):
        return "batchnorm"
    if kind is keras.layers.LayerNormalization and not layer.rms_scaling:
        return "layernorm"
    if kind is keras.layers.EinsumDense:
        return "einsum" if einsum_axes(layer) is not None else None
    if kind is keras.layers.Embedding:
        return "embedding"
    convolutions = {
        keras.layers.Conv1D: ("conv1d", ("valid", "same", "causal")),
        keras.layers.Conv2D: ("conv2d", ("valid", "same")),
        keras.layers.DepthwiseConv2D: ("depthwise", ("valid", "same")),
    }
    if kind in convolutions:
        name, paddings = convolutions[kind]
        if (
            layer.data_format == "channels_last"
            and getattr(layer, "groups", 1) == 1
            and layer.padding in paddings
        ):
            return name
    return None


def factored_layer(layer, position: dict[int, int]) -> FactoredLayer | None:
    """``layer`` as a ``FactoredLayer`` if it is eligible and holds chosen parameters.

    Args:
        layer: a Keras layer.
        position: ``{id(variable): index}`` of the chosen parameters.
    """
    kind = kind_of(layer)
    if kind is None:
        return None
    axes = einsum_axes(layer) if kind == "einsum" else None
    if kind in NORM_KINDS:
        scale, shift = layer.gamma, layer.beta
    elif kind == "embedding":
        scale, shift = layer.embeddings, None
    else:
        scale, shift = layer.kernel, layer.bias
        if axes is not None and not axes.bias_fits:
            shift = None  # a bias over other axes: pfor and the diagonal
    kernel = position.get(id(scale)) if scale is not None else None
    bias = position.get(id(shift)) if shift is not None else None
    if kernel is None and bias is None:
        return None
    return FactoredLayer(layer, kind, kernel, bias, axes)


def einsum_axes(layer) -> EinsumAxes | None:
    """The factored form of an ``EinsumDense``, or None for equations it does not cover.

    Covered: ``X,K->Z`` (or ``...X,K->...Z``) where the kernel ``K`` lists the
    contracted input axes, then the output axes; every other input axis appears in
    the output, the first (the batch) first.
    """
    equation = layer.equation.replace(" ", "")
    match = re.fullmatch(r"(\.\.\.)?([a-zA-Z]+),([a-zA-Z]+)->(\.\.\.)?([a-zA-Z]+)", equation)
    if match is None or bool(match.group(1)) != bool(match.group(4)):
        return None
    elided, inputs, kernel, _, outputs = match.groups()
    if elided:
        ndim = getattr(layer.input_spec, "ndim", None)
        if not isinstance(ndim, int) or not len(inputs) < ndim <= len(inputs) + 10:
            return None
        extra = "".join(str(i) for i in range(ndim - len(inputs)))
        inputs, outputs = extra + inputs, extra + outputs
    if any(len(set(spec)) != len(spec) for spec in (inputs, kernel, outputs)):
        return None
    contracted = [c for c in kernel if c in inputs and c not in outputs]
    produced = [c for c in kernel if c in outputs and c not in inputs]
    positions = [c for c in inputs if c not in kernel]
    if (
        kernel != "".join(contracted + produced)
        or set(outputs) != set(positions + produced)
        or inputs[0] != outputs[0]
        or inputs[0] in kernel
    ):
        return None
    bias_axes = getattr(layer, "bias_axes", None)
    bias_fits = bool(
        bias_axes
        and produced
        and set(bias_axes) == set(produced)
        and outputs.endswith("".join(produced))
    )
    return EinsumAxes(
        input_order=tuple(inputs.index(c) for c in positions + contracted),
        output_order=tuple(outputs.index(c) for c in positions + produced),
        split=len(contracted),
        bias_fits=bias_fits,
    )


# -- the recorded call -------------------------------------------------------------------
def recorded_call(entry: FactoredLayer, inputs, args, kwargs) -> tuple:
    """``(recorded input, z, layer output)`` of one call of a factored layer."""
    layer = entry.layer
    if not isinstance(inputs, tf.Tensor):
        raise FactoredUnavailable(f"layer {layer.name!r} got {type(inputs).__name__}")
    if entry.kind == "embedding":
        tokens = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        z = keras.ops.take(layer.embeddings, tokens, axis=0)
        return tokens, z, keras.ops.cast(z, layer.compute_dtype)
    if not inputs.dtype.is_floating:
        raise FactoredUnavailable(f"layer {layer.name!r} got {inputs.dtype.name} inputs")
    if entry.kind in NORM_KINDS:
        training = kwargs.get("training", args[0] if args else None)
        x_hat, z = _normalised(entry, inputs, training)
        return x_hat, z, keras.ops.cast(z, layer.compute_dtype)
    if entry.kind == "dense":
        z = keras.ops.matmul(inputs, layer.kernel)
    elif entry.kind == "einsum":
        if inputs.shape.rank != len(entry.einsum.input_order):
            raise FactoredUnavailable(f"layer {layer.name!r} got rank {inputs.shape.rank}")
        z = keras.ops.einsum(layer.equation, inputs, layer.kernel)
    elif entry.kind == "depthwise":
        z = keras.ops.depthwise_conv(
            inputs,
            layer.kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
    else:  # "conv1d", "conv2d"
        z = _convolve(entry, inputs, layer.kernel)
    if layer.bias is not None:
        z = keras.ops.add(z, layer.bias)
    return inputs, z, layer.activation(z) if layer.activation is not None else z


def _convolve(entry: FactoredLayer, inputs, kernel) -> tf.Tensor:
    """The convolution of a ``"conv1d"`` / ``"conv2d"`` layer with another ``kernel``.

    ``kernel`` is ``(kernel_size..., channels, k)``: the layer's strides, padding
    (a Conv1D's causal padding too) and dilation, ``k`` output channels.
    """
    layer = entry.layer
    if entry.kind == "conv2d":
        return layer.convolution_op(inputs, kernel)
    padded, padding = _padded(layer, inputs)
    return keras.ops.conv(
        padded,
        kernel,
        strides=list(layer.strides),
        padding=padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )


def _padded(layer, inputs) -> tuple[tf.Tensor, str]:
    """A Conv1D's input with its causal padding applied, and the padding left to do."""
    if layer.padding != "causal":
        return inputs, layer.padding
    left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
    return tf.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "valid"


def _last_axis(axis, rank) -> bool:
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _normalised(entry: FactoredLayer, inputs, training):
    """``(x_hat, z = x_hat * gamma + beta)`` of a normalisation layer in inference mode."""
    layer = entry.layer
    rank = inputs.shape.rank
    if rank is None or not _last_axis(layer.axis, rank):
        raise FactoredUnavailable(f"layer {layer.name!r} does not normalise the last axis")
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    x = keras.ops.cast(inputs, dtype)
    if entry.kind == "batchnorm":
        if training and layer.trainable:
            raise FactoredUnavailable(f"layer {layer.name!r} runs in training mode")
        mean = keras.ops.cast(layer.moving_mean, dtype)
        variance = keras.ops.cast(layer.moving_variance, dtype)
    else:
        mean, variance = keras.ops.moments(x, axes=[rank - 1], keepdims=True)
    x_hat = (x - mean) * keras.ops.rsqrt(variance + layer.epsilon)
    z = x_hat
    if layer.gamma is not None:
        z = z * keras.ops.cast(layer.gamma, dtype)
    if layer.beta is not None:
        z = z + keras.ops.cast(layer.beta, dtype)
    return x_hat, z


# -- the factors per position ------------------------------------------------------------
def input_rows(entry: FactoredLayer, inputs: tf.Tensor, size) -> tf.Tensor:
    """The input factor per example and position (no bias column).

    Returns:
        ``(b, t, fan_in)`` for the matrix kinds, ``(b, t, kh * kw, C)`` for a
        depthwise convolution, ``(b, t)`` token ids for an embedding.
    """
    kind, layer = entry.kind, entry.layer
    if kind == "embedding":
        return tf.reshape(inputs, [size, -1])
    if kind == "einsum":
        fan_in = math.prod(layer.kernel.shape[: entry.einsum.split])
        return tf.reshape(tf.transpose(inputs, entry.einsum.input_order), [size, -1, fan_in])
    if kind == "dense":
        return tf.reshape(inputs, [size, -1, inputs.shape[-1]])
    patches = _patches(entry, inputs)
    if kind == "depthwise":
        kh, kw, channels, _ = layer.kernel.shape
        return tf.reshape(patches, [size, -1, kh * kw, channels])
    return tf.reshape(patches, [size, -1, patches.shape[-1]])


def projected_input_rows(entry: FactoredLayer, inputs: tf.Tensor, matrix, size) -> tf.Tensor:
    """``input_rows(entry, inputs, size) @ matrix`` of a matrix kind, ``(b, t, k)``.

    ``matrix`` is ``(fan_in, k)``. A convolution's is the layer's own convolution
    with ``matrix`` as its kernel (``(kernel_size..., channels, k)``: the patches'
    order), so that the ``(b, t, kernel_size * channels)`` patches are never formed;
    the same products, without writing and reading ``kernel_size`` copies of the
    input.
    """
    matrix = tf.cast(matrix, inputs.dtype)
    if entry.kind in ("conv1d", "conv2d"):
        kernel = tf.reshape(matrix, [*entry.layer.kernel.shape[:-1], -1])
        return tf.reshape(_convolve(entry, inputs, kernel), [size, -1, matrix.shape[-1]])
    return tf.einsum("bti,ik->btk", input_rows(entry, inputs, size), matrix)


def output_rows(entry: FactoredLayer, delta: tf.Tensor, size) -> tf.Tensor:
    """The output gradient per example and position, rows matching ``input_rows``.

    Returns:
        ``(b, t, fan_out)``, ``(b, t, C, M)`` for a depthwise convolution.
    """
    kind, layer = entry.kind, entry.layer
    if kind == "einsum":
        fan_out = math.prod(layer.kernel.shape[entry.einsum.split :])
        return tf.reshape(tf.transpose(delta, entry.einsum.output_order), [size, -1, fan_out])
    if kind == "depthwise":
        _, _, channels, multiplier = layer.kernel.shape
        return tf.reshape(delta, [size, -1, channels, multiplier])
    return tf.reshape(delta, [size, -1, delta.shape[-1]])


def kernel_gradients(entry: FactoredLayer, rows_in, rows_out, size) -> tf.Tensor:
    """``(b, kernel size)`` per-example kernel gradients from the two factors."""
    if entry.kind == "embedding":
        vocabulary, dim = entry.layer.embeddings.shape
        tokens = tf.cast(rows_in, tf.int64)
        ids = tf.range(tf.cast(size, tf.int64))[:, None] * vocabulary + tokens
        table = tf.math.unsorted_segment_sum(
            tf.reshape(rows_out, [-1, dim]), tf.reshape(ids, [-1]), size * vocabulary
        )
        return tf.reshape(table, [size, -1])
    rows_in = tf.cast(rows_in, rows_out.dtype)
    if entry.kind == "depthwise":
        grads = tf.einsum("btpc,btcm->bpcm", rows_in, rows_out)
    else:
        grads = tf.einsum("bti,bto->bio", rows_in, rows_out)
    return tf.reshape(grads, [size, -1])


def bias_gradients(entry: FactoredLayer, delta: tf.Tensor, size) -> tf.Tensor:
    """``(b, bias size)``: ``delta`` summed over positions."""
    if entry.kind == "einsum":
        return tf.reduce_sum(output_rows(entry, delta, size), axis=1)
    return tf.reduce_sum(tf.reshape(delta, [size, -1, delta.shape[-1]]), axis=1)


def _patches(entry: FactoredLayer, inputs) -> tf.Tensor:
    """A convolution's input patches, ``(b, positions..., kernel_size * channels)``."""
    layer = entry.layer
    if entry.kind == "conv1d":
        padded, padding = _padded(layer, inputs)
        (k,), (stride,), (rate,) = layer.kernel_size, layer.strides, layer.dilation_rate
        return tf.image.extract_patches(
            padded[:, None],
            sizes=[1, 1, k, 1],
            strides=[1, 1, stride, 1],
            rates=[1, 1, rate, 1],
            padding=padding.upper(),
        )
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(
        inputs,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1],
        padding=layer.padding.upper(),
    )
