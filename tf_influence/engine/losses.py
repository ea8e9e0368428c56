"""Per-example losses as ``model.fit`` combines them: several outputs, loss weights, sample weights.

A model with several outputs is trained on

    L_j = sum_k loss_weight_k * L_k(y_k,j, z_k,j)

where ``model.compile(loss=..., loss_weights=...)`` gives one loss for every
output (a single loss), a list (one per output, in the order of the outputs) or
a dict keyed by output name, and None leaves an output without a loss;
``loss_weights`` is a float, a list or a dict alike. Keras reduces each output's
loss over the batch by summing and dividing by the number of elements, so the
batch mean of ``L_j`` (each loss averaged over its extra axes) is what it
minimises.

Sample and class weights ride with the training targets as
``WeightedTargets(y, sample_weight)``: ``Objective.loss_from_outputs`` then
returns ``w_j * L_j``. Test points never carry weights.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from tf_influence._errors import describe

# Losses whose label is a class index / one-hot vector / binary decision, so
# that ``y_test=None`` can mean "the model's own prediction".
SPARSE_CLASS_LOSSES = {"sparse_categorical_crossentropy", "sparse_categorical_focal_crossentropy"}
ONE_HOT_LOSSES = {
    "categorical_crossentropy",
    "categorical_focal_crossentropy",
    "categorical_hinge",
}
BINARY_LOSSES = {"binary_crossentropy", "binary_focal_crossentropy"}
SIGNED_BINARY_LOSSES = {"hinge", "squared_hinge"}


class WeightedTargets(NamedTuple):
    """Training targets with one non-negative weight per example (``fit``'s ``sample_weight``).

    A ``NamedTuple`` so that ``tf.nest``, ``tf.data`` and ``tf.function`` carry it
    through every batch unchanged; ``Objective.loss_from_outputs`` unpacks it.

    Attributes:
        y: the targets, as ``fit`` received them (an array or a list/dict of them).
        sample_weight: ``(batch,)`` weights ``w_j``.
    """

    y: Any
    sample_weight: Any


def per_example_values(
    fn: Callable[..., tf.Tensor], y: Any, y_pred: Any, dtype: tf.DType, loss_name: str
) -> tf.Tensor:
    """``fn(y, y_pred)`` as one value per example, shape ``(batch,)``, in ``dtype``.

    Targets of shape ``(n,)`` for outputs of shape ``(n, 1)`` are expanded, as
    Keras's losses allow; further axes of the loss are averaged.
    """
    if (
        isinstance(y, tf.Tensor)
        and isinstance(y_pred, tf.Tensor)
        and y.shape.rank is not None
        and y.shape.rank == y_pred.shape.rank - 1
        and y_pred.shape[-1] == 1
    ):
        y = y[..., None]
    values = tf.convert_to_tensor(fn(y, y_pred))
    if values.shape.rank == 0:
        raise ValueError(
            "The loss returned one number for the whole batch; influence needs one value "
            f"per example. Received: loss {loss_name!r} returning shape (). Pass a "
            "keras loss object or a callable that does not reduce over the batch axis."
        )
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return tf.cast(values, dtype)


def predicted_labels_of(
    loss_name: str, from_logits: bool, y_pred: tf.Tensor, head: str = ""
) -> Any:
    """Labels equal to the prediction ``y_pred``, in the format the loss ``loss_name`` expects.

    Raises:
        ValueError: a regression (or unknown) loss, where a predicted label has no meaning.
    """
    if loss_name in SPARSE_CLASS_LOSSES:
        return tf.argmax(y_pred, axis=-1, output_type=tf.int32)
    if loss_name in ONE_HOT_LOSSES:
        depth = y_pred.shape[-1]
        return tf.one_hot(tf.argmax(y_pred, axis=-1), depth, dtype=y_pred.dtype)
    if loss_name in BINARY_LOSSES | SIGNED_BINARY_LOSSES:
        threshold = 0.0 if (from_logits or loss_name in SIGNED_BINARY_LOSSES) else 0.5
        return tf.cast(y_pred > threshold, y_pred.dtype)
    where = f" on output {head!r}" if head else ""
    raise ValueError(
        "`y_test=None` explains the model's own predicted class, which needs a "
        f"classification loss. Received: y_test=None with loss {loss_name!r}{where}. Pass "
        "the targets to explain with `y_test=`"
        + (" (one per output with a loss)" if head else "")
        + ", or a scalar function of the outputs with `target=`."
    )


class Head(NamedTuple):
    """One output with a loss: its name, position in ``tf.nest.flatten(outputs)``, loss, weight."""

    name: str
    position: int
    fn: Callable[..., tf.Tensor]
    loss_name: str
    from_logits: bool
    weight: float | None


def _is_nested(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple))


def _describe_spec(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _describe_spec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe_spec(v) for v in value]
    if value is None or isinstance(value, (str, numbers.Number)):
        return value
    return getattr(value, "name", None) or getattr(value, "__name__", type(value).__name__)


class OutputLosses:
    """The weighted sum of per-output losses, per example, as ``model.fit`` computes it.

    Args:
        loss: one loss (for every output), a list (one per output) or a dict keyed by
            output name; None entries leave an output without a loss.
        loss_weights: None, a float, a list or a dict, as ``model.compile`` takes it.
        output_names: the model's output names in the order of its outputs
            (``model.output_names``), or empty when unknown.
        resolve: ``loss -> (fn, name, from_logits)`` for one loss (``resolve_loss``).
        dtype: the dtype of the values.
        source: the argument the loss came from, for messages.
    """

    def __init__(
        self,
        loss: Any,
        loss_weights: Any,
        output_names: Sequence[str],
        resolve: Callable[[Any], tuple[Callable[..., tf.Tensor], str, bool]],
        dtype: tf.DType,
        source: str = "loss",
    ):
        self.loss, self.loss_weights, self.source = loss, loss_weights, source
        self.output_names = list(output_names or [])
        self.dtype = dtype
        self._resolve = resolve
        if loss_weights is not None and not isinstance(loss_weights, (dict, list, tuple)):
            if not isinstance(loss_weights, numbers.Real) or isinstance(loss_weights, bool):
                raise TypeError(
                    "Argument `loss_weights` must be a float, a list or a dict. Received: "
                    f"loss_weights={describe(loss_weights)}"
                )
        leaves = loss.values() if isinstance(loss, dict) else (loss if _is_nested(loss) else [loss])
        # Resolved once per distinct loss (checks names now, not at the first batch).
        self._resolved = {id(item): resolve(item) for item in leaves if item is not None}
        if not self._resolved:
            raise ValueError(
                f"No output has a loss. Received: {source}={_describe_spec(loss)}. Give at "
                "least one output a loss."
            )
        self._heads: dict[tuple, list[Head]] = {}
        # The structure and widths of the outputs last seen (for checking targets).
        self.last_spec: Any = None
        self.widths: list[int | None] | None = None

    @property
    def name(self) -> str:
        """A stable text naming every loss and weight (for fingerprints and saved states)."""
        names = {
            key: self._resolved[id(item)][1]
            for key, item in (
                self.loss.items()
                if isinstance(self.loss, dict)
                else enumerate(self.loss if _is_nested(self.loss) else [self.loss])
            )
            if item is not None
        }
        text = ",".join(f"{k}={v}" for k, v in names.items())
        if not _is_nested(self.loss):
            text = next(iter(names.values()))
        if self.loss_weights is not None:
            text += f"*{_describe_spec(self.loss_weights)}"
        return text

    # -- structure --------------------------------------------------------------------
    def output_names_of(self, outputs: Any) -> list[str]:
        """The names of all outputs (with a loss or not), in ``tf.nest.flatten`` order."""
        return self._names(outputs)

    def _names(self, outputs: Any) -> list[str]:
        flat = tf.nest.flatten(outputs)
        if isinstance(outputs, dict):
            if len(flat) != len(outputs):
                raise ValueError(_nested_outputs(outputs))
            return [str(k) for k in sorted(outputs)]
        if isinstance(outputs, (list, tuple)):
            if len(flat) != len(outputs):
                raise ValueError(_nested_outputs(outputs))
            if len(self.output_names) == len(flat):
                return list(self.output_names)
            return [str(i) for i in range(len(flat))]
        return [self.output_names[0] if len(self.output_names) == 1 else "output"]

    def _per_output(self, spec: Any, names: list[str], argument: str) -> list[Any]:
        count = len(names)
        if isinstance(spec, dict):
            unknown = [k for k in spec if str(k) not in names]
            if unknown:
                raise ValueError(
                    f"Argument `{argument}` names outputs the model does not have: {unknown}. "
                    f"Received: {argument}={_describe_spec(spec)}; the model's outputs are "
                    f"{names}. Use the output names as keys."
                )
            by_name = {str(k): v for k, v in spec.items()}
            return [by_name.get(name) for name in names]
        if isinstance(spec, (list, tuple)):
            if len(spec) != count:
                raise ValueError(
                    f"Argument `{argument}` must have one entry per output of the model "
                    f"({count}: {names}). Received: {argument}={_describe_spec(spec)} with "
                    f"{len(spec)} entries. Use None for an output without a loss."
                )
            return list(spec)
        return [spec] * count

    def heads(self, outputs: Any) -> list[Head]:
        """The outputs that have a loss, for the structure of ``outputs``."""
        key = tuple(
            (path, tuple(t.shape.as_list()[1:]) if t.shape.rank else ())
            for path, t in zip(_paths(outputs), tf.nest.flatten(outputs), strict=True)
        )
        heads = self._heads.get(key)
        if heads is None:
            names = self._names(outputs)
            losses = self._per_output(self.loss, names, self.source)
            weights = self._per_output(self.loss_weights, names, "loss_weights")
            heads = []
            for position, (name, item, weight) in enumerate(
                zip(names, losses, weights, strict=True)
            ):
                if item is None:
                    continue
                fn, loss_name, from_logits = self._resolved[id(item)]
                heads.append(
                    Head(name, position, fn, loss_name, from_logits, _weight(weight, name))
                )
            self._heads[key] = heads
        flat = tf.nest.flatten(outputs)
        self.last_spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)
        self.widths = [
            int(flat[h.position].shape[-1]) if flat[h.position].shape.rank else None for h in heads
        ]
        return heads

    def targets(self, y: Any, outputs: Any, argument: str = "y") -> list[Any]:
        """The targets of each head, in the order of ``heads(outputs)``.

        ``y`` is a dict keyed by output name, a list/tuple with one entry per output or
        one per output with a loss, or a single target when one output has a loss.

        Raises:
            ValueError: ``y`` misses the targets of an output with a loss.
        """
        heads = self.heads(outputs)
        names = self._names(outputs)
        wanted = [h.name for h in heads]
        if isinstance(y, dict):
            missing = [name for name in wanted if name not in y]
            if missing:
                raise ValueError(
                    f"Argument `{argument}` misses the targets of output(s) {missing}. "
                    f"Received: {argument} with keys {sorted(map(str, y))}; the outputs "
                    f"with a loss are {wanted}. Give a target for each of them (outputs "
                    "without a loss may be left out)."
                )
            return [y[name] for name in wanted]
        if isinstance(y, (list, tuple)) and not isinstance(y, WeightedTargets):
            if len(y) == len(names) and len(names) != len(heads):
                return [y[h.position] for h in heads]
            if len(y) == len(heads):
                return list(y)
            raise ValueError(
                f"Argument `{argument}` must hold one target per output ({len(names)}: "
                f"{names}) or one per output with a loss ({len(heads)}: {wanted}). "
                f"Received: {argument} with {len(y)} entries. Pass a list in the order of "
                "the outputs, or a dict keyed by output name."
            )
        if len(heads) == 1:
            return [y]
        raise ValueError(
            f"Argument `{argument}` must hold the targets of every output with a loss "
            f"({wanted}). Received: a single {argument}={describe(y)}. Pass a list in the "
            "order of the outputs, or a dict keyed by output name."
        )

    # -- values -------------------------------------------------------------------------
    def __call__(self, y: Any, outputs: Any) -> tf.Tensor:
        """``sum_k loss_weight_k * L_k`` per example, shape ``(batch,)``."""
        heads = self.heads(outputs)
        flat = tf.nest.flatten(outputs)
        total = None
        for head, target in zip(heads, self.targets(y, outputs), strict=True):
            values = per_example_values(
                head.fn, target, flat[head.position], self.dtype, head.loss_name
            )
            if head.weight is not None:
                values = values * tf.constant(head.weight, self.dtype)
            total = values if total is None else total + values
        return total

    def predicted_labels(self, outputs: Any) -> Any:
        """A dict ``{output name: labels equal to its prediction}`` over the heads."""
        flat = tf.nest.flatten(outputs)
        return {
            h.name: predicted_labels_of(h.loss_name, h.from_logits, flat[h.position], h.name)
            for h in self.heads(outputs)
        }


def _paths(outputs: Any) -> list[str]:
    if isinstance(outputs, dict):
        return [str(k) for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [str(i) for i in range(len(tf.nest.flatten(outputs)))]
    return [""]


def _weight(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"Argument `loss_weights` must hold numbers. Received: {describe(value)} for "
            f"output {name!r}."
        )
    return float(value)


def _nested_outputs(outputs: Any) -> str:
    return (
        "Models whose outputs nest more than one level (a list or dict of outputs) are not "
        f"supported. Received: outputs {tf.nest.map_structure(lambda t: t.shape, outputs)}. "
        "Return a flat list or dict of outputs."
    )
