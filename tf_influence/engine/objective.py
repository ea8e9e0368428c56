"""The training objective that ``model.fit`` minimised, made differentiable per example.

    R(theta) = (1/n) * sum_j L(z_j, theta) + Omega(theta)

``L`` is the per-example loss (the compiled Keras loss with reduction off),
``Omega`` the sum of the weight regularizers of the model, and ``theta`` the
chosen parameters. The model is always called with ``training=False`` so that
Dropout and BatchNormalization behave as at prediction time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence.engine.flat import ParamLayout
from tf_influence.engine.losses import (
    OutputLosses,
    WeightedTargets,
    per_example_values,
    predicted_labels_of,
)
from tf_influence.engine.targets import check_numeric_targets, check_target_range

# What ``loss=`` accepts: a keras loss object, a loss name, or a callable
# ``(y_true, y_pred)`` returning one value per example.
LossLike = keras.losses.Loss | str | Callable[..., tf.Tensor]
# One item of ``params=``: a layer, a layer's name, or a variable of the model.
ParamLike = keras.layers.Layer | str | keras.Variable | tf.Variable
# What ``params=`` accepts: one item or a sequence of them.
ParamsLike = ParamLike | Sequence[ParamLike]


def check_model(model: keras.Model) -> None:
    """Raises a clear error if ``model`` cannot be analysed."""
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "tf_influence needs the TensorFlow backend of Keras. Received: "
            f"keras.backend.backend()={keras.backend.backend()!r}. Set the environment "
            "variable KERAS_BACKEND=tensorflow before importing keras."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Argument `model` must be a keras.Model (Sequential, Functional or subclassed). "
            f"Received: model={describe(model)}"
        )
    if not model.built:
        raise ValueError(
            f"Argument `model` must be built before it can be analysed. Received: model "
            f"{model.name!r} with built=False. Build it by calling it on a batch of data, "
            "e.g. `model(x[:1])`, by `model.build(input_shape)`, or by starting a "
            "Sequential model with `keras.Input(shape)`."
        )
    for layer in model._flatten_layers(include_self=True):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer {layer.name!r} of argument `model` has an activity_regularizer, which "
                "makes the training loss depend on the batch and is not supported. Received: "
                f"activity_regularizer={layer.activity_regularizer!r}. Remove it, or analyse "
                "a copy of the model without it."
            )


def resolve_loss(
    loss: LossLike | None, model: keras.Model, dtype: tf.DType | str | None = None
) -> tuple[Callable[..., tf.Tensor], str, bool]:
    """Turns ``loss`` (or the compiled ``model.loss``) into a per-example loss function.

    Returns:
        ``(fn, name, from_logits)`` where ``fn(y_true, y_pred)`` returns one value per
        example (any further axes are averaged, as Keras's default reduction does),
        ``name`` is the underlying Keras loss name (or the callable's name) and
        ``from_logits`` tells whether predictions are logits.
    """
    source = "loss"
    if loss is None:
        loss = getattr(model, "loss", None)
        source = "model.loss"
        if loss is None:
            raise ValueError(
                "No loss to differentiate. Received: loss=None and the model was not compiled "
                "with a loss. Pass `loss=` to InfluenceModel (a keras loss object, its name, "
                "or a callable(y_true, y_pred)), or call `model.compile(loss=...)` first."
            )
    if isinstance(loss, (dict, list, tuple)):
        raise TypeError(
            f"Argument `{source}` here must be one loss. Received: {source}={describe(loss)}. "
            "Losses per output are resolved one by one (see tf_influence.engine.losses)."
        )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError as error:
            raise ValueError(
                f"Unknown loss name. Received: {source}={loss!r}. Use a name from "
                "keras.losses (e.g. 'sparse_categorical_crossentropy') or a callable."
            ) from error
    if isinstance(loss, keras.losses.Loss):
        config = dict(loss.get_config())
        from_logits = bool(config.get("from_logits", False))
        config["reduction"] = None
        if dtype is not None:
            # Compute the loss in the parameters' dtype (Keras defaults to floatx).
            config["dtype"] = tf.as_dtype(dtype).name
        unreduced = type(loss).from_config(config)
        fn_name = getattr(getattr(loss, "fn", None), "__name__", type(loss).__name__)
        return unreduced, _canonical(fn_name), from_logits
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        return loss, _canonical(name), False
    raise TypeError(
        f"Argument `{source}` must be a keras loss object, a loss name or a callable "
        f"(y_true, y_pred). Received: {source}={describe(loss)}"
    )


def _canonical(name: str) -> str:
    aliases = {"mse": "mean_squared_error", "mae": "mean_absolute_error"}
    return aliases.get(name, name)


def resolve_params(model: keras.Model, params: ParamsLike | None) -> list[keras.Variable]:
    """The trainable variables to differentiate with respect to.

    Args:
        model: the keras.Model.
        params: None (all trainable weights), or a sequence of layers, layer names
            or variables of ``model``.
    """
    if params is None:
        variables = list(model.trainable_variables)
    else:
        # Before Keras 3.7, layers create variables of a parent class of the exported
        # `keras.Variable`, so also accept the classes of the model's own variables.
        variable_types = (keras.Variable, tf.Variable, *{type(v) for v in model.variables})
        if isinstance(params, (str, keras.layers.Layer, *variable_types)):
            params = [params]
        variables = []
        for item in params:
            if isinstance(item, str):
                try:
                    layer = model.get_layer(item)
                except ValueError as error:
                    names = [layer.name for layer in model.layers]
                    raise ValueError(
                        f"Argument `params` names a layer the model does not have. Received: "
                        f"params=[..., {item!r}, ...]. Layers of the model: {names}."
                    ) from error
                variables.extend(layer.trainable_variables)
            elif isinstance(item, keras.layers.Layer):
                variables.extend(item.trainable_variables)
            elif isinstance(item, variable_types):
                variables.append(item)
            else:
                raise TypeError(
                    "Argument `params` must hold layers, layer names or variables. "
                    f"Received an item: {describe(item)}"
                )
        known = {id(v) for v in model.trainable_variables}
        for v in variables:
            if id(v) not in known:
                raise ValueError(
                    "Argument `params` holds a variable that is not a trainable variable of "
                    f"the model. Received: {v.path if hasattr(v, 'path') else v.name}. Pass "
                    "variables from `model.trainable_variables`, or layers of the model."
                )
        # Keep model order and drop duplicates.
        chosen = {id(v) for v in variables}
        variables = [v for v in model.trainable_variables if id(v) in chosen]
    if not variables:
        raise ValueError(
            f"There are no trainable parameters to analyse. Received: params={describe(params)} "
            f"for model {model.name!r} with {len(model.trainable_variables)} trainable "
            "variables. Make sure the chosen layers are trainable."
        )
    return variables


# The oldest Keras on which mixed-precision models were checked to compute in
# float32 here (tests/test_model_kinds.py); Keras 3.4 still rounds to float16.
MIXED_PRECISION_KERAS = (3, 15)


def _keras_version() -> tuple[int, int]:
    major, minor = keras.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _is_mixed(policy: Any) -> bool:
    compute = getattr(policy, "compute_dtype", None)
    variable = getattr(policy, "variable_dtype", None)
    return compute is not None and variable is not None and compute != variable


def compiled_loss_weights(model: keras.Model) -> Any:
    """The ``loss_weights`` the model was compiled with (None if none)."""
    compiled = getattr(model, "_compile_loss", None)
    if compiled is not None and hasattr(compiled, "_user_loss_weights"):
        return compiled._user_loss_weights
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    return config.get("loss_weights")


def output_names(model: keras.Model) -> list[str]:
    """The model's output names in the order of its outputs (empty when unknown)."""
    try:
        return [str(name) for name in (getattr(model, "output_names", None) or [])]
    except (AttributeError, TypeError, ValueError):
        return []


def variable_name(variable: keras.Variable | tf.Variable) -> str:
    """The variable's path in the model (its name on older Keras)."""
    return getattr(variable, "path", None) or variable.name


class Objective:
    """Per-example loss, regularisation and parameters of a Keras model.

    Args:
        model: a built ``keras.Model`` (TensorFlow backend).
        loss: keras loss object, name or callable ``(y_true, y_pred)``; ``None`` uses
            ``model.loss``.
        params: ``None`` for all trainable weights, or layers / layer names / variables.
        loss_weights: weights of the outputs' losses (a float, list or dict), as
            ``model.compile`` takes them; ``None`` uses the model's when ``loss`` is
            None too, else none.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: LossLike | None = None,
        params: ParamsLike | None = None,
        loss_weights: Any = None,
    ):
        check_model(model)
        self.model = model
        self.variables: Sequence[keras.Variable] = resolve_params(model, params)
        self.layout = ParamLayout(self.variables)
        self.dtype = tf.as_dtype(self.variables[0].dtype)
        if not self.dtype.is_floating:
            raise ValueError(
                f"Parameters must be floating point. Received: dtype={self.dtype.name} for "
                f"variable {variable_name(self.variables[0])!r}."
            )
        self._init_loss(loss, loss_weights)
        # Layers that compute in a lower precision than their variables (a
        # "mixed_float16" / "mixed_bfloat16" policy). Curvature in float16 is too
        # coarse, so the model is run in its variables' dtype (float32) here.
        self._low_precision_layers = [
            layer
            for layer in model._flatten_layers(include_self=True)
            if _is_mixed(getattr(layer, "dtype_policy", None))
        ]
        if self._low_precision_layers and _keras_version() < MIXED_PRECISION_KERAS:
            raise ValueError(
                "Argument `model` has a mixed-precision policy "
                f"({self._low_precision_layers[0].dtype_policy.name!r}), which tf_influence "
                "analyses in float32 only with Keras >= "
                f"{'.'.join(map(str, MIXED_PRECISION_KERAS))} (older Keras keeps computing parts "
                f"in float16). Received: keras {keras.__version__}. Upgrade Keras, or analyse "
                "a float32 copy: build the model under the 'float32' policy and `set_weights`."
            )

    @property
    def mixed_precision(self) -> bool:
        """True if the model has a mixed-precision policy (computed in float32 here)."""
        return bool(self._low_precision_layers)

    def predict(self, x: Any) -> tf.Tensor:
        """The model's output on ``x`` in inference mode, in full precision."""
        with self._full_precision():
            return self.model(x, training=False)

    @contextlib.contextmanager
    def _full_precision(self) -> Iterator[None]:
        if not self._low_precision_layers:
            yield
            return
        saved = [layer.dtype_policy for layer in self._low_precision_layers]
        try:
            for layer, policy in zip(self._low_precision_layers, saved, strict=True):
                layer.dtype_policy = policy.variable_dtype
            yield
        finally:
            for layer, policy in zip(self._low_precision_layers, saved, strict=True):
                layer.dtype_policy = policy

    @property
    def num_params(self) -> int:
        """The number of scalar parameters, ``p``."""
        return self.layout.num_params

    def _init_loss(self, loss: Any, loss_weights: Any) -> None:
        """Sets ``loss_fn``, ``loss_name``, ``from_logits`` and ``output_losses``."""
        spec, weights, source = loss, loss_weights, "loss"
        if loss is None:
            spec, source = getattr(self.model, "loss", None), "model.loss"
            if weights is None:
                weights = compiled_loss_weights(self.model)
        self.output_losses: OutputLosses | None = None
        self._single_loss = spec
        if spec is not None and (isinstance(spec, (dict, list, tuple)) or weights is not None):
            self.output_losses = OutputLosses(
                spec, weights, output_names(self.model), self._resolve_one, self.dtype, source
            )
            # The combined loss: per example, traced as one (never shared with another).
            self.loss_fn = self.output_losses
            self.loss_name, self.from_logits = self.output_losses.name, False
        else:
            self.loss_fn, self.loss_name, self.from_logits = resolve_loss(
                loss, self.model, self.dtype
            )

    def _resolve_one(self, loss: Any) -> tuple[Callable[..., tf.Tensor], str, bool]:
        return resolve_loss(loss, self.model, self.dtype)

    def output_losses_for(self, outputs: Any) -> OutputLosses | None:
        """The per-output losses, also for one loss on a model with several outputs."""
        if self.output_losses is None and isinstance(outputs, (dict, list, tuple)):
            # One loss for every output, as model.compile(loss="mse") applies it.
            self.output_losses = OutputLosses(
                self._single_loss if self._single_loss is not None else self.loss_fn,
                None,
                output_names(self.model),
                lambda _: (self.loss_fn, self.loss_name, self.from_logits),
                self.dtype,
            )
        return self.output_losses

    def per_example_loss(self, x: Any, y: Any) -> tf.Tensor:
        """``w_j * L(z_j, theta)`` for each example of a batch, ``(batch,)``, in ``self.dtype``.

        ``w_j`` is the example's sample (or class) weight when ``y`` is a
        ``WeightedTargets`` (training data of ``fit(sample_weight=...)``), else 1.
        """
        return self.loss_from_outputs(self.predict(x), y)

    def loss_from_outputs(self, outputs: Any, y: Any) -> tf.Tensor:
        """``w_j * L_j`` per example from the model's outputs, shape ``(batch,)``.

        The second half of ``per_example_loss`` (which calls the model first), for
        curvatures that differentiate the loss with respect to the outputs
        (Gauss-Newton). With several outputs, ``L_j`` is the weighted sum of their
        losses (``loss_weights``), as ``model.fit`` computes it.

        Args:
            outputs: the model's outputs on a batch (a tensor, or a list/dict of them).
            y: the targets (a tensor, a list/dict for several outputs), or
                ``WeightedTargets(y, sample_weight)``.
        """
        weight = None
        if isinstance(y, WeightedTargets):
            y, weight = y
        losses = self.output_losses_for(outputs)
        if losses is not None:
            values = losses(y, outputs)
        else:
            values = per_example_values(self.loss_fn, y, outputs, self.dtype, self.loss_name)
        if weight is not None:
            values = values * tf.cast(tf.reshape(weight, [-1]), self.dtype)
        return values

    def regularization(self) -> tf.Tensor:
        """``Omega(theta)``: the sum of the weight regularizers, as ``model.fit`` adds them."""
        total = tf.zeros([], self.dtype)
        for variable in self.model.trainable_variables:
            regularizer = getattr(variable, "regularizer", None)
            if regularizer is not None:
                total += tf.cast(regularizer(variable), self.dtype)
        return total

    def has_regularization(self) -> bool:
        """True if a trainable variable has a weight regularizer (``Omega`` is not 0)."""
        return any(
            getattr(v, "regularizer", None) is not None for v in self.model.trainable_variables
        )

    def predicted_labels(self, x: Any) -> Any:
        """Labels equal to the model's own prediction, in the format the loss expects.

        With several outputs, a dict ``{output name: labels}`` over the outputs with a
        loss; every one of them must have a classification loss.

        Raises:
            ValueError: the loss (of an output) is a regression loss (or unknown), so a
                "predicted label" has no meaning; ``y_test`` must be given.
        """
        y_pred = self.predict(x)
        losses = self.output_losses_for(y_pred)
        if losses is not None:
            return losses.predicted_labels(y_pred)
        return predicted_labels_of(self.loss_name, self.from_logits, y_pred)

    def check_targets(self, y: Any, num_outputs: int | None, name: str, offset: int = 0) -> None:
        """Refuses targets outside what the loss accepts, naming the first bad example.

        Targets must be numbers for every loss (strings are refused, see
        ``check_numeric_targets``). Sparse class losses need integer class indices in
        ``[0, num_outputs)`` (out of range, TensorFlow returns NaN on GPU or fails deep
        inside the graph on CPU); one-hot and binary losses need values in ``[0, 1]``;
        hinge losses in ``[-1, 1]``. The range of other losses' targets (regression,
        custom) is not checked.

        Args:
            y: a batch of targets (array-like), ``offset`` the index of its first example.
            num_outputs: the size of the model output's last axis (classes), if known.
            name: the argument the targets came from, for the message.
        """
        if isinstance(y, WeightedTargets):
            y = y.y
        check_numeric_targets(y, name)
        losses = self.output_losses
        if losses is not None and losses.last_spec is not None:
            # Several outputs: each head's targets against its own loss and width.
            heads = losses.heads(losses.last_spec)
            targets = losses.targets(y, losses.last_spec, name)
            for head, width, target in zip(heads, losses.widths, targets, strict=True):
                where = name if len(heads) == 1 else f"{name}[{head.name!r}]"
                check_target_range(target, head.loss_name, width, where, offset)
            return
        if isinstance(y, (dict, list, tuple)):
            return
        check_target_range(y, self.loss_name, num_outputs, name, offset)
