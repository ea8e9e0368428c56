"""Sample and class weights of the training data, checked and turned into one weight per example.

``fit(x, y, sample_weight=w)`` trains on ``(1/n) sum_j w_j L_j + Omega``, as
``model.fit`` does (Keras's default reduction sums the weighted losses and
divides by the number of examples, not by the sum of the weights).
``class_weight={class: weight}`` is turned into sample weights the way Keras
does it: the class of an example is its label (rounded), or the arg-max of a
one-hot label; classes missing from the dict weigh 1.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe


def check_sample_weight(sample_weight: Any, num_examples: int) -> np.ndarray:
    """``sample_weight`` as a ``(n,)`` float64 array of finite, non-negative numbers.

    Raises:
        ValueError: not one number per example, or a NaN, inf or negative weight (the
            message names the first such example).
    """
    try:
        weights = np.asarray(
            sample_weight.numpy() if hasattr(sample_weight, "numpy") else sample_weight,
            dtype=np.float64,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            "Argument `sample_weight` must hold one number per training example. Received: "
            f"sample_weight={describe(sample_weight)}."
        ) from error
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.ndim != 1 or weights.shape[0] != num_examples:
        raise ValueError(
            f"Argument `sample_weight` must have shape ({num_examples},): one weight per "
            f"training example. Received: sample_weight of shape {weights.shape} for "
            f"{num_examples} examples."
        )
    check_weight_values(weights, 0, "sample_weight")
    return weights


def check_weight_values(weights: np.ndarray, offset: int, name: str) -> None:
    """Refuses NaN, inf or negative weights, naming the first (``offset`` + row)."""
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(weights))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"Argument `{name}` holds {float(weights[row])!r} at training example {offset + row}. "
            f"Received: {name}[{offset + row}]={float(weights[row])!r}. Weights must be finite "
            "numbers >= 0; fix or drop that example."
        )
    bad = np.flatnonzero(weights < 0)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"Argument `{name}` holds a negative weight at training example {offset + row}. "
            f"Received: {name}[{offset + row}]={float(weights[row])!r}. Weights must be >= 0 (0 "
            "leaves the example out of the objective)."
        )


def check_class_weight(class_weight: Any) -> dict[int, float]:
    """``class_weight`` as ``{int class: float weight}``, weights finite and non-negative.

    Raises:
        ValueError: not a dict, a key that is not a class index, or a bad weight.
    """
    if not isinstance(class_weight, dict):
        raise ValueError(
            "Argument `class_weight` must be a dict {class index: weight}, as in "
            f"keras.Model.fit. Received: class_weight={describe(class_weight)}."
        )
    checked = {}
    for key, value in class_weight.items():
        index = _class_index(key)
        if index is None or index < 0:
            raise ValueError(
                "Argument `class_weight` must be keyed by class indices (integers >= 0). "
                f"Received: class_weight with key {key!r}. Encode the classes as integers."
            )
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(
                f"Argument `class_weight` must map classes to numbers. Received: "
                f"class_weight[{key!r}]={describe(value)}."
            )
        value = float(value)
        if not np.isfinite(value) or value < 0:
            raise ValueError(
                f"Argument `class_weight` must hold finite weights >= 0. Received: "
                f"class_weight[{key!r}]={value!r}."
            )
        checked[index] = value
    return checked


def _class_index(key: Any) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, numbers.Integral):
        return int(key)
    if isinstance(key, numbers.Real) and float(key).is_integer():
        return int(key)
    return None


def check_classes_exist(class_weight: dict[int, float], num_outputs: int | None) -> None:
    """Refuses class weights for classes the model's output cannot predict.

    ``num_outputs`` is the width of the model's output: its number of classes, or
    two classes (0 and 1) for a single sigmoid / logit output.
    """
    if not class_weight or num_outputs is None:
        return
    classes = max(int(num_outputs), 2)
    unknown = sorted(k for k in class_weight if k >= classes)
    if unknown:
        raise ValueError(
            f"Argument `class_weight` names classes the model does not have: {unknown}. "
            f"Received: class_weight={class_weight} for a model with {classes} classes "
            f"(0..{classes - 1}). Remove those keys or fix the class indices."
        )


def class_indices(y: np.ndarray) -> np.ndarray:
    """The class of each label as Keras reads it for ``class_weight`` (numpy)."""
    y = np.asarray(y)
    if y.ndim > 1:
        y = np.argmax(y, axis=-1) if y.shape[-1] != 1 else np.squeeze(y, axis=-1)
    return np.round(y).astype(np.int64).reshape(-1)


def class_weight_to_sample_weight(y: Any, class_weight: dict[int, float]) -> np.ndarray:
    """One weight per example from its class, 1 for classes not in ``class_weight``."""
    classes = class_indices(y)
    return np.array([class_weight.get(int(c), 1.0) for c in classes], dtype=np.float64)


def class_weight_fn(class_weight: dict[int, float]) -> Callable[[tf.Tensor], tf.Tensor]:
    """``y -> (batch,)`` weights from ``class_weight``, in TensorFlow (for a dataset's map)."""
    size = max(class_weight) + 1
    table = np.ones(size, np.float64)
    for index, value in class_weight.items():
        table[index] = value
    table = tf.constant(table)

    def weights(y: tf.Tensor) -> tf.Tensor:
        if y.shape.rank is not None and y.shape.rank > 1:
            y = tf.argmax(y, axis=-1) if y.shape[-1] != 1 else tf.squeeze(y, axis=-1)
        classes = tf.reshape(tf.cast(tf.round(tf.cast(y, tf.float64)), tf.int64), [-1])
        inside = (classes >= 0) & (classes < size)
        looked_up = tf.gather(table, tf.clip_by_value(classes, 0, size - 1))
        return tf.where(inside, looked_up, tf.ones_like(looked_up))

    return weights


def reject_nested_targets(y: Any) -> None:
    """``class_weight`` needs one target per example (one output), as in Keras."""
    if isinstance(y, (dict, list, tuple)):
        raise ValueError(
            "Argument `class_weight` is only supported for models with a single output, as "
            "in keras.Model.fit. Received: class_weight with targets for several outputs. "
            "Pass `sample_weight` instead (one weight per example)."
        )


def unweigh(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``values / w_j`` (0 where ``w_j`` is 0): ``w_j^2 q_j`` of weighted gradients to ``w_j q_j``.

    Self-influence multiplies the training gradient ``w_j grad L_j`` with itself;
    the test side of a self-influence is the example's own, unweighted loss, so
    one factor ``w_j`` is divided out again.
    """
    if weights is None:
        return values
    weights = np.asarray(weights, dtype=np.float64)
    safe = np.where(weights > 0, weights, 1.0)
    return np.where(weights > 0, values / safe, 0.0).astype(values.dtype)
