"""TracIn (Pruthi et al., 2020): influence traced through training checkpoints.

    tracin(z, z') = sum_t lr_t * grad L(z; theta_t) . grad L(z'; theta_t)

summed over the checkpoints ``theta_t`` recorded during ``model.fit`` (by
``tfi.callbacks.TracInCheckpoints``) with the learning rate ``lr_t`` in force
there. It needs no Hessian: it is the first-order effect of the gradient steps
that training took on each example. Scores use the sign convention of
``InfluenceModel`` so that the two can be compared and ranked alike::

    scores[i, j] = -sum_t lr_t * grad L(z_test_i; theta_t) . grad L(z_j; theta_t)

``scores[i, j] < 0``: training on example j lowered test loss i (helpful, a
"proponent"); ``> 0``: harmful (an "opponent").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from tf_influence._errors import describe, raise_at_first_nonfinite
from tf_influence._progress import Progress, resolve_verbose
from tf_influence.engine.data import ExampleData
from tf_influence.engine.gradients import PerExampleGradients
from tf_influence.engine.objective import LossLike, Objective, ParamsLike
from tf_influence.engine.weights import unweigh
from tf_influence.outputs import TopK, check_sink_args, make_sink

if TYPE_CHECKING:
    from tf_influence.callbacks.tracin_checkpoints import TracInCheckpoints


class TracIn:
    """Checkpoint-based influence (TracInCP) with the ``InfluenceModel`` interface.

    Args:
        model: the Keras model the checkpoints were recorded from.
        checkpoints: a ``tfi.callbacks.TracInCheckpoints`` that ran during
            ``model.fit``, or a list of ``(weights, learning_rate)`` pairs where
            ``weights`` is a list like ``model.get_weights()``.
        loss: keras loss object, name or callable; None uses ``model.loss``.
        params: None for all trainable weights, or layers / layer names / variables.
        loss_weights: weights of the outputs' losses, as for ``InfluenceModel``.

    Example:
        >>> ckpts = tfi.callbacks.TracInCheckpoints(every_n_epochs=2)
        >>> model.fit(x, y, epochs=10, callbacks=[ckpts])
        >>> tracin = tfi.TracIn(model, ckpts).fit(x, y)
        >>> scores = tracin.explain(x_test[:5], y_test[:5])   # (5, n_train)

    References:
        Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by
        Tracing Gradient Descent", NeurIPS 2020.
    """

    def __init__(
        self,
        model: keras.Model,
        checkpoints: TracInCheckpoints | Sequence[tuple[Sequence[np.ndarray], float]],
        loss: LossLike | None = None,
        params: ParamsLike | None = None,
        loss_weights: Any = None,
    ):
        self.model = model
        self.objective = Objective(model, loss=loss, params=params, loss_weights=loss_weights)
        self._checkpoints = _resolve_checkpoints(checkpoints, model)
        self._gradients = PerExampleGradients(self.objective)
        self._data: ExampleData | None = None

    @property
    def num_checkpoints(self) -> int:
        """The number of checkpoints summed over."""
        return len(self._checkpoints)

    @property
    def num_train(self) -> int:
        """The number of training examples given to ``fit`` (0 before it)."""
        return self._data.num_examples if self._data is not None else 0

    def fit(
        self,
        x: Any,
        y: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        sample_weight: Any = None,
        class_weight: dict[int, float] | None = None,
    ) -> TracIn:
        """Takes the training data (see ``InfluenceModel.fit``); returns self.

        With ``sample_weight`` or ``class_weight`` (as given to ``model.fit``), the
        training gradients are those of ``w_j L_j``, the step SGD took on example j.
        """
        del verbose  # nothing slow happens here
        self._data = ExampleData(x, y, batch_size, "x", "y", True, sample_weight, class_weight)
        return self

    def _require_fit(self, what: str) -> None:
        if self._data is None:
            raise RuntimeError(
                f"`{what}` needs the training data. Call `fit(x_train, y_train)` on the "
                "TracIn object first."
            )

    @contextlib.contextmanager
    def _restoring_weights(self) -> Iterator[None]:
        saved = [tf.identity(w) for w in self.model.weights]
        try:
            yield
        finally:
            for variable, value in zip(self.model.weights, saved, strict=True):
                variable.assign(value)

    def _load_checkpoint(self, index: int) -> float:
        for variable, value in zip(self.model.weights, self._checkpoints[index][0], strict=True):
            variable.assign(value)
        return self._checkpoints[index][1]

    def explain(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        top_k: int | None = None,
        output: str | os.PathLike | None = None,
    ) -> np.ndarray | TopK:
        """TracIn scores of every training example on every test point.

        ``scores[i, j] = -sum_t lr_t * grad L(z_test_i; theta_t) . grad L(z_j; theta_t)``
        (``w_j L(z_j)`` in place of ``L(z_j)`` with sample or class weights).
        (negative: helpful). ``y_test=None`` uses the final model's predicted class.
        ``top_k`` and ``output`` work as in ``InfluenceModel.explain``; memory stays
        bounded by a training batch, the test points and the checkpoints.

        Returns:
            ``np.ndarray`` of shape ``(n_test, n_train)``, or ``TopK``.
        """
        self._require_fit("explain")
        check_sink_args(top_k, output)
        verbose = resolve_verbose(verbose)
        tests = ExampleData(
            x_test, y_test, batch_size, x_name="x_test", y_name="y_test", require_y=False
        )
        test_batches = []
        for batch in tests.batches():
            x = batch[0]
            y = batch[1] if len(batch) > 1 else self.objective.predicted_labels(x)
            test_batches.append((x, y))
        dtype = self.objective.dtype.as_numpy_dtype
        sink = make_sink(tests.num_examples, self.num_train, dtype, top_k, output)
        progress = Progress(self._data.num_batches(), verbose, "TracIn scoring")
        with self._restoring_weights():
            # lr_t * test gradients, (p, n_test), one block per checkpoint.
            vectors = []
            for index in range(self.num_checkpoints):
                learning_rate = self._load_checkpoint(index)
                grads = tf.concat([self._gradients(x, y) for x, y in test_batches], axis=0)
                vectors.append(tf.transpose(grads) * tf.cast(learning_rate, grads.dtype))
            offset = 0
            for step, batch in enumerate(self._data.batches(), start=1):
                total = 0.0
                for index in range(self.num_checkpoints):
                    self._load_checkpoint(index)
                    block, _ = self._gradients.scores(batch[0], batch[1], vectors[index])
                    total += block
                total = np.asarray(total)
                _check_finite(total, offset)
                sink.write(offset, total)
                offset += total.shape[1]
                progress.update(step)
        progress.done()
        return sink.result()

    def self_influence(self, verbose: str | int = "auto") -> np.ndarray:
        """``sum_t lr_t * |grad L(z_j; theta_t)|^2`` for every training example, ``(n_train,)``.

        High values flag examples that training kept pushing on (often mislabelled).
        Equals ``-diag(explain(x_train, y_train))``; with sample weights ``w_j``,
        ``w_j * sum_t lr_t * |grad L(z_j; theta_t)|^2`` (the test side is unweighted).
        """
        self._require_fit("self_influence")
        progress = Progress(self._data.num_batches(), resolve_verbose(verbose), "Self-influence")
        values = []
        with self._restoring_weights():
            for step, batch in enumerate(self._data.batches(), start=1):
                total = 0.0
                for index in range(self.num_checkpoints):
                    learning_rate = self._load_checkpoint(index)
                    grads = self._gradients(batch[0], batch[1])
                    total += learning_rate * tf.reduce_sum(grads * grads, axis=1)
                values.append(np.asarray(total))
                progress.update(step)
        progress.done()
        result = unweigh(np.concatenate(values), self._data.sample_weights())
        _check_finite(result[None, :], 0)
        return result

    def top_k(
        self,
        x_test: Any,
        y_test: Any = None,
        k: int = 10,
        batch_size: int | None = None,
        verbose: str | int = "auto",
    ) -> TopK:
        """The ``k`` most helpful (most negative) and most harmful training examples."""
        return self.explain(x_test, y_test, batch_size=batch_size, verbose=verbose, top_k=k)


def _check_finite(block: np.ndarray, offset: int) -> None:
    raise_at_first_nonfinite(
        np.isfinite(block).all(axis=0),
        offset,
        "The TracIn score is NaN or inf at training example {index}: its gradient at a "
        "checkpoint is not finite. Check that example, and that the checkpoint weights are "
        "finite.",
    )


def _resolve_checkpoints(
    checkpoints: Any, model: keras.Model
) -> list[tuple[list[tf.Tensor], float]]:
    if hasattr(checkpoints, "checkpoints"):  # a TracInCheckpoints callback
        checkpoints = checkpoints.checkpoints
    try:
        pairs = [(list(weights), float(lr)) for weights, lr in checkpoints]
    except (TypeError, ValueError) as error:
        raise ValueError(
            "Argument `checkpoints` must be a TracInCheckpoints callback that ran during "
            "`model.fit`, or a list of (weights, learning_rate) pairs. Received: "
            f"{describe(checkpoints)}."
        ) from error
    if not pairs:
        raise ValueError(
            "Argument `checkpoints` holds no checkpoint. Received: an empty list. Pass the "
            "TracInCheckpoints callback to `model.fit(..., callbacks=[...])` and train first."
        )
    shapes = [tuple(w.shape) for w in model.weights]
    for t, (weights, lr) in enumerate(pairs):
        got = [tuple(np.shape(w)) for w in weights]
        if got != shapes:
            raise ValueError(
                f"Checkpoint {t} of argument `checkpoints` does not fit the model: weight "
                f"shapes {got} vs the model's {shapes}. Record checkpoints of this model."
            )
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"Checkpoint {t} of argument `checkpoints` has learning rate {lr!r}; it must "
                "be a positive number."
            )
    dtypes = [w.dtype for w in model.weights]
    return [
        ([tf.constant(np.asarray(w), dtype=d) for w, d in zip(weights, dtypes, strict=True)], lr)
        for weights, lr in pairs
    ]
