"""Checks of training and test data against the objective, run before any work.

Each turns a problem that would otherwise surface deep inside TensorFlow (or as
a silent wrong answer) into a ``ValueError`` that names the argument, says what
was received and how to fix it. ``fit``, ``load`` and ``InfluenceCallback`` all
attach training data through ``FittedState``, which runs the same checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence.distribute import check_replicas_in_sync
from tf_influence.engine.data import ExampleData
from tf_influence.engine.objective import Objective, variable_name
from tf_influence.engine.weights import check_classes_exist
from tf_influence.outputs import check_k, check_sink_args


def check_weights(objective: Objective, strategy: tf.distribute.Strategy | None = None) -> None:
    """Refuses non-finite weights (and, on a strategy, replicas that disagree)."""
    for variable in objective.variables:
        value = np.asarray(variable.numpy())
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Model weight {variable_name(variable)!r} holds NaN or inf. Received: "
                f"{int(np.sum(~np.isfinite(value)))} non-finite values. Influence needs a "
                "trained model with finite weights: retrain it (lower learning rate, "
                "gradient clipping) or restore a good checkpoint."
            )
    if strategy is not None:
        check_replicas_in_sync(objective.variables, variable_name)


def num_outputs(objective: Objective, x: Any) -> int | list[int | None] | None:
    """Size of the model output's last axis (classes) on a batch ``x``.

    For several outputs, one size per output with a loss (in the order of
    ``Objective.output_losses.heads``), which also resolves the heads.
    """
    y_pred = objective.predict(x)
    losses = objective.output_losses_for(y_pred)
    if losses is not None:
        losses.heads(y_pred)  # resolved now, for the checks of the targets
        if not isinstance(y_pred, tf.Tensor):
            return list(losses.widths)
    if isinstance(y_pred, tf.Tensor) and y_pred.shape.rank:
        return int(y_pred.shape[-1]) or None
    return None


def check_targets(
    objective: Objective, data: ExampleData, y_name: str, outputs: int | None
) -> None:
    """Every target of ``data`` in the range its loss accepts (one pass, numpy)."""
    if not data.has_targets:
        return
    offset = 0
    for batch in data.batches(max(data.batch_size, 4096) if data.in_memory else None):
        y = tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, batch[1])
        objective.check_targets(y, outputs, y_name, offset)
        offset += len(tf.nest.flatten(y)[0])


def check_class_weight(data: ExampleData, outputs: Any) -> None:
    """Refuses class weights for classes the model's output cannot predict."""
    if data.class_weight is not None:
        check_classes_exist(data.class_weight, outputs if isinstance(outputs, int) else None)


def check_test_targets(objective: Objective, y: Any, outputs: int | None, offset: int) -> None:
    """The targets of one test batch in the range the loss accepts (``outputs`` classes)."""
    arrays = tf.nest.map_structure(lambda t: t.numpy(), y)
    objective.check_targets(arrays, outputs, "y_test", offset)


def check_batch(
    objective: Objective, batch: tuple, x_name: str, y_name: str, check_gradients: bool = False
) -> None:
    """Evaluates the loss on one batch to turn shape problems into clear errors."""
    x, y = batch[0], batch[1]
    y_pred = objective.predict(x)
    try:
        with tf.GradientTape() as tape:
            losses = objective.per_example_loss(x, y)
            total = tf.reduce_sum(losses) + objective.regularization()
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        raise ValueError(
            f"The loss {objective.loss_name!r} cannot be computed on the targets "
            f"`{y_name}`. Received: {y_name} batch of shape "
            f"{[tuple(t.shape) for t in tf.nest.flatten(y)]} for model outputs of shape "
            f"{[tuple(t.shape) for t in tf.nest.flatten(y_pred)]}. Give class indices of "
            "shape (n,) for sparse_categorical_crossentropy, one-hot (n, classes) for "
            "categorical_crossentropy, and targets shaped like the outputs otherwise. "
            f"(The loss said: {str(error).splitlines()[0][:300]})"
        ) from error
    size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    if losses.shape.rank != 1 or losses.shape[0] != size:
        raise ValueError(
            f"The loss must give one value per example of `{x_name}`. Received: per-example "
            f"loss of shape {tuple(losses.shape)} for a batch of {size}. Check the shapes of "
            f"`{y_name}` against the model outputs."
        )
    finite = np.isfinite(losses.numpy())
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"The loss is NaN or inf at example {index} of `{x_name}`. Received: loss="
            f"{losses.numpy()[index]!r}. Check that example's target, or use a loss on "
            "logits (from_logits=True) if predicted probabilities reach 0 or 1."
        )
    if check_gradients:
        grads = tape.gradient(total, objective.variables)
        missing = [
            variable_name(v) for v, g in zip(objective.variables, grads, strict=True) if g is None
        ]
        if missing:
            raise ValueError(
                f"These parameters get no gradient from the loss: {missing}. Received: "
                "params including variables the loss does not depend on"
                + _outputs_without_loss(objective, y_pred)
                + ". Exclude them with `params=` (layers, layer names or variables to "
                "analyse)."
            )


def _outputs_without_loss(objective: Objective, y_pred: Any) -> str:
    """``" (outputs without a loss: [...])"`` for a model with several outputs, else ``""``."""
    losses = objective.output_losses_for(y_pred)
    if losses is None or isinstance(y_pred, tf.Tensor):
        return ""
    with_loss = {head.name for head in losses.heads(y_pred)}
    names = [name for name in losses.output_names_of(y_pred) if name not in with_loss]
    return f" (outputs without a loss: {names})" if names else ""


def check_target_function(target: Callable, objective: Objective, x: Any) -> None:
    """Evaluates ``target`` on a test batch once, to turn misuse into a clear error."""
    if not callable(target):
        raise TypeError(
            "Argument `target` must be a callable fn(model, x) returning one scalar per "
            f"example. Received: target={describe(target)}"
        )
    try:
        with objective._full_precision():
            value = tf.convert_to_tensor(target(objective.model, x))
    except Exception as error:
        raise ValueError(
            "Argument `target` failed on a batch of `x_test`: it must be fn(model, x) -> one "
            f"scalar per example. Received error: {type(error).__name__}: {error}"
        ) from error
    size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    if value.shape.as_list() not in ([size], [size, 1]):
        raise ValueError(
            f"Argument `target` must return one scalar per example, shape ({size},) for a "
            f"batch of {size}. Received: shape {tuple(value.shape)}. Select one output, "
            "e.g. `lambda model, x: model(x)[:, 3]` for the logit of class 3."
        )
    if not value.dtype.is_floating:
        raise ValueError(
            f"Argument `target` must return floating-point values. Received: dtype "
            f"{value.dtype.name}."
        )


def check_explain_options(
    top_k: int | None,
    output: str | os.PathLike | None,
    relative: str | None,
    candidates: int | None,
    feature_layer: str | keras.layers.Layer | Callable | None,
    per_layer: bool = False,
) -> None:
    """The options of ``explain`` that exclude or need each other."""
    check_sink_args(top_k, output)
    if not isinstance(per_layer, bool):
        raise ValueError(f"Argument `per_layer` must be True or False. Received: {per_layer!r}")
    if per_layer and any(v is not None for v in (top_k, output, relative, candidates)):
        raise ValueError(
            "Argument `per_layer=True` returns one full score matrix per layer and cannot "
            "be combined with `top_k`, `output`, `relative` or `candidates`. Received: "
            f"top_k={top_k!r}, output={output!r}, relative={relative!r}, "
            f"candidates={candidates!r}."
        )
    if relative not in (None, "theta", "loss"):
        raise ValueError(
            f'Argument `relative` must be None, "theta" or "loss". Received: relative={relative!r}'
        )
    if candidates is not None:
        check_k(candidates, "candidates")
        if feature_layer is None or output is not None:
            raise ValueError(
                "Argument `candidates` needs `feature_layer` (the layer whose outputs "
                "define the neighbours) and cannot be combined with `output`. Received: "
                f"feature_layer={feature_layer!r}, output={output!r}."
            )
