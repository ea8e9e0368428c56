"""Evaluating influence: against real retraining, and at finding mislabelled examples.

* ``loo_check``: remove chosen training examples one at a time, retrain, and
  compare the actual change of the test loss with the predicted one, so that a
  user can see whether to trust the numbers on their own model.
* ``lds``: the linear datamodeling score (Park et al. 2023): the Spearman
  correlation, across models retrained on random subsets, of the measured test
  output with the one the scores predict (``tf_influence.lds``).
* ``mislabel_curve``: Koh & Liang (2017, section 5.4) flip a fraction of the
  training labels, rank the training examples by self-influence, and inspect
  them in that order: a good ranking finds most flips after inspecting a small
  fraction of the data.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence.engine.compile import GraphFunction
from tf_influence.engine.losses import WeightedTargets
from tf_influence.lds import KerasTrainer, LDSResult, keras_trainer, lds

if TYPE_CHECKING:
    import keras

    from tf_influence.engine.state import FittedState
    from tf_influence.influence_model import InfluenceModel

__all__ = [
    "KerasTrainer",
    "LDSResult",
    "LooCheck",
    "MislabelCurve",
    "keras_trainer",
    "lds",
    "loo_check",
    "mislabel_curve",
]


class MislabelCurve(NamedTuple):
    """Fraction of flipped labels found against the fraction of data inspected.

    Attributes:
        inspected: ``(m,)`` fractions of the training set inspected, in ``[0, 1]``.
        found: ``(m,)`` fractions of all flipped examples among the inspected ones.
    """

    inspected: np.ndarray
    found: np.ndarray

    def at(self, fraction: float) -> float:
        """Fraction found after inspecting ``fraction`` of the data (interpolated)."""
        return float(np.interp(fraction, self.inspected, self.found))

    def mean_found(self, start: float = 0.05, stop: float = 0.30) -> float:
        """Average fraction found over inspection budgets in ``[start, stop]``."""
        grid = np.linspace(start, stop, 26)
        return float(np.mean(np.interp(grid, self.inspected, self.found)))


def mislabel_curve(
    scores_or_ranking: np.ndarray,
    flipped_mask: np.ndarray,
    fractions: np.ndarray | None = None,
    kind: str = "scores",
) -> MislabelCurve:
    """How many flipped labels an inspection order finds, per fraction inspected.

    Args:
        scores_or_ranking: ``(n,)``. With ``kind="scores"``, a score per training
            example, inspected from the highest down (self-influence, training
            loss, ...). With ``kind="ranking"``, the training indices in the order
            they are inspected (a permutation of ``0..n-1``).
        flipped_mask: ``(n,)`` booleans, True where the label was flipped.
        fractions: fractions of the training set to report, in ``[0, 1]``;
            default ``0, 0.01, ..., 1``.
        kind: ``"scores"`` or ``"ranking"``.

    Returns:
        ``MislabelCurve(inspected, found)``.

    Example:
        >>> curve = tfi.evaluation.mislabel_curve(im.self_influence(), flipped)
        >>> curve.at(0.1)   # fraction of flips found in the top 10%
    """
    flipped = np.asarray(flipped_mask)
    if flipped.ndim != 1 or flipped.dtype != bool:
        raise ValueError(
            "Argument `flipped_mask` must be a 1-D boolean array. Received: "
            f"{describe(flipped_mask)}. Build it as e.g. `y_noisy != y_clean`."
        )
    n = flipped.shape[0]
    if not flipped.any():
        raise ValueError(
            "Argument `flipped_mask` has no True entry, so there is nothing to find. "
            f"Received: {n} examples, none flipped."
        )
    values = np.asarray(scores_or_ranking)
    if values.shape != (n,):
        raise ValueError(
            f"Argument `scores_or_ranking` must have shape ({n},) like `flipped_mask`. "
            f"Received: shape {values.shape}."
        )
    if kind == "scores":
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise ValueError(
                "Argument `scores_or_ranking` must hold finite numbers when kind='scores'. "
                f"Received: {describe(scores_or_ranking)}."
            )
        order = np.argsort(-values, kind="stable")
    elif kind == "ranking":
        if not np.issubdtype(values.dtype, np.integer) or not np.array_equal(
            np.sort(values), np.arange(n)
        ):
            raise ValueError(
                "Argument `scores_or_ranking` must be a permutation of 0..n-1 when "
                f"kind='ranking'. Received: {describe(scores_or_ranking)}."
            )
        order = values
    else:
        raise ValueError(f'Argument `kind` must be "scores" or "ranking". Received: kind={kind!r}')
    if fractions is None:
        fractions = np.linspace(0.0, 1.0, 101)
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or np.any((fractions < 0) | (fractions > 1)):
        raise ValueError(
            f"Argument `fractions` must be a 1-D array of values in [0, 1]. Received: {fractions}."
        )
    found_so_far = np.concatenate([[0], np.cumsum(flipped[order])])
    counts = np.floor(fractions * n + 1e-9).astype(int)
    return MislabelCurve(fractions, found_so_far[counts] / flipped.sum())


# -- leave-one-out check ------------------------------------------------------------------
class LooCheck(NamedTuple):
    """Predicted against actual change of the test loss when training examples are removed.

    Attributes:
        indices: ``(m,)`` training indices removed (one at a time).
        predicted: ``(m,)`` predicted change of the mean test loss, ``-mean_i
            scores[i, j] / n_train``.
        actual: ``(m,)`` change after retraining without example ``j``.
        pearson: Pearson correlation of ``predicted`` and ``actual``.
        spearman: Spearman rank correlation.
        seconds: time spent retraining.
    """

    indices: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    pearson: float
    spearman: float
    seconds: float


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    # Ties share their mean rank.
    for value in np.unique(values[np.r_[False, np.diff(values[order]) == 0]]):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _check_takes_sample_weight(retrain: Callable) -> None:
    """A clear error now, not after the first retraining, if ``retrain`` cannot take weights."""
    try:
        parameters = inspect.signature(retrain).parameters
    except (TypeError, ValueError):  # no signature to read: find out when it is called
        return
    if "sample_weight" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return
    raise TypeError(
        "Argument `retrain` must take a `sample_weight` keyword: the InfluenceModel was "
        "fitted with sample or class weights, and retraining must use them. Received: "
        f"retrain={describe(retrain)} with parameters {list(parameters)}. Define it as "
        "`fn(model, x, y, sample_weight=None)` and pass `sample_weight` to `model.fit`."
    )


def loo_check(
    im: InfluenceModel,
    x_test: Any,
    y_test: Any = None,
    n_points: int = 20,
    retrain: Callable[[keras.Model, Any, Any], object] | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    max_iterations: int = 1000,
    verbose: str | int = "auto",
) -> LooCheck:
    """Retrains without chosen training points and compares with the prediction.

    The test quantity is the mean loss over ``(x_test, y_test)``; removing training
    example ``j`` is predicted to change it by ``-mean_i scores[i, j] / n``
    (``scores = im.explain(x_test, y_test)``). Half of the ``n_points`` examples
    are those with the largest predicted change in absolute value, the other
    half drawn at random (seeded) from the rest, so the check covers the range.

    Default retraining (Keras models): L-BFGS (``tfp.optimizer.lbfgs_minimize``)
    on the parameters ``im`` analyses, warm-started at the trained weights, of
    ``(1/n) sum_{k != j} L(z_k) + Omega + (damping/2) |theta - theta_hat|^2``:
    the objective whose Hessian the influence inverts (with ``damping=0``, the
    training objective itself). A reference run without removal is retrained the
    same way, so ``actual = L(theta_-j) - L(theta_all)`` measures the removal,
    not a model that was not fully converged. The model's weights are restored
    afterwards.

    Args:
        im: a fitted ``InfluenceModel`` (training data given as arrays).
        x_test: test inputs.
        y_test: test targets; None uses the predicted class (at the trained
            weights, then held fixed).
        n_points: how many training examples to remove (one retraining each).
        retrain: optional ``fn(model, x, y)`` that retrains ``model`` in place,
            starting from the trained weights, on training arrays ``x, y`` with the
            example removed (e.g. a few epochs of ``model.fit``). It is also called
            once with all the data for the reference. When ``fit`` had sample or
            class weights, it is called as ``fn(model, x, y, sample_weight=w)``
            with the weights of the examples kept (pass them to ``model.fit``).
        seed: for the random half of the chosen examples.
        tolerance: gradient-norm tolerance of the default L-BFGS (default 1e-10
            for float64 parameters, 1e-6 for float32).
        max_iterations: L-BFGS iterations per retraining.
        verbose: "auto", 0, 1 or 2.

    Returns:
        ``LooCheck(indices, predicted, actual, pearson, spearman, seconds)``.

    Example:
        >>> check = tfi.evaluation.loo_check(im, x_test[:1], y_test[:1], n_points=20)
        >>> check.pearson, check.spearman

    References:
        Koh & Liang (2017), figure 2; Basu, Pope & Feizi, "Influence Functions in
        Deep Learning Are Fragile", ICLR 2021.
    """
    from tf_influence._progress import Progress, resolve_verbose

    state = im.state
    state.require_current("loo_check")
    data = state.data
    if not data.in_memory:
        raise ValueError(
            "loo_check retrains without chosen examples, which needs the training data as "
            "arrays. Received: `fit` was given a tf.data.Dataset. Fit the InfluenceModel on "
            "arrays (e.g. from `ds.as_numpy_iterator()`) to run the check."
        )
    n = data.num_examples
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)):
        n_points = -1
    if not 2 <= n_points <= n:
        raise ValueError(
            f"Argument `n_points` must be an integer from 2 to the {n} training examples "
            f"(correlations need two points). Received: n_points={n_points!r}."
        )
    if retrain is not None and not callable(retrain):
        raise TypeError(
            "Argument `retrain` must be None (L-BFGS) or a callable fn(model, x, y) that "
            f"retrains the model in place. Received: retrain={describe(retrain)}"
        )
    if retrain is not None and isinstance(state.data.elements[1], WeightedTargets):
        _check_takes_sample_weight(retrain)
    verbose = resolve_verbose(verbose)
    scores = np.asarray(im.explain(x_test, y_test, verbose=0))
    predicted_all = -scores.mean(axis=0) / n
    chosen = _choose(predicted_all, n_points, seed)

    tests = state.test_data(x_test, y_test, None)
    test_batches = [state.targets(batch) for batch in tests.batches()]  # labels fixed now
    objective = im.objective

    def test_loss() -> float:
        total = sum(float(tf.reduce_sum(objective.per_example_loss(x, y))) for x, y in test_batches)
        return total / tests.num_examples

    variables = objective.variables
    saved = [v.numpy() for v in variables]
    run = _LbfgsRetraining(state, tolerance, max_iterations) if retrain is None else None
    arrays = tf.nest.map_structure(lambda t: t.numpy(), data.elements)

    def retrained_loss(removed: int | None) -> float:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)
        if run is not None:
            run(removed)
        else:
            keep = np.ones(n, bool)
            if removed is not None:
                keep[removed] = False
            x, y = tf.nest.map_structure(lambda a: a[keep], (arrays[0], arrays[1]))
            if isinstance(y, WeightedTargets):
                retrain(objective.model, x, y.y, sample_weight=y.sample_weight)
            else:
                retrain(objective.model, x, y)
        return test_loss()

    start = time.perf_counter()
    progress = Progress(n_points + 1, verbose, "Leave-one-out retraining")
    try:
        reference = retrained_loss(None)
        actual = []
        for step, index in enumerate(chosen, start=1):
            actual.append(retrained_loss(int(index)) - reference)
            progress.update(step)
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)
        progress.done()
    seconds = time.perf_counter() - start
    actual = np.asarray(actual)
    predicted = predicted_all[chosen]
    return LooCheck(
        indices=chosen,
        predicted=predicted,
        actual=actual,
        pearson=_pearson(predicted, actual),
        spearman=_pearson(_ranks(predicted), _ranks(actual)),
        seconds=seconds,
    )


def _choose(predicted: np.ndarray, n_points: int, seed: int) -> np.ndarray:
    order = np.argsort(-np.abs(predicted), kind="stable")
    top = order[: (n_points + 1) // 2]
    rest = order[(n_points + 1) // 2 :]
    rng = np.random.default_rng(seed)
    random = rng.choice(rest, size=n_points - len(top), replace=False)
    return np.concatenate([top, np.sort(random)])


class _LbfgsRetraining:
    """Warm-started L-BFGS on ``(1/n) sum_k w_k L_k + Omega + (damping/2)|theta - theta_hat|^2``.

    The whole minimisation runs in one ``tf.function`` (traced once; the example
    weights are its argument), looping over the training batches in the graph.
    """

    def __init__(self, state: FittedState, tolerance: float | None, max_iterations: int) -> None:
        import tensorflow_probability as tfp

        self._lbfgs = tfp.optimizer.lbfgs_minimize
        self.objective = state.objective
        self.data = state.data
        self.damping = float(state.settings.damping)
        self.dtype = state.objective.dtype
        self.layout = state.objective.layout
        self.theta_hat = self.layout.flatten(
            [tf.convert_to_tensor(v) for v in self.objective.variables], self.dtype
        )
        if tolerance is None:
            tolerance = 1e-10 if self.dtype == tf.float64 else 1e-6
        self.tolerance = float(tolerance)
        self.max_iterations = int(max_iterations)
        # L-BFGS and its line search run without autograph (converting them is slow).
        # The objective is one function, called where L-BFGS evaluates (start, line
        # search, ...): those 10 sites hold calls, not 10 traces of the model. It gets
        # autograph only if the model or loss needs it: it retraces itself
        # (``GraphFunction``), so the error never reaches the outer function.
        self._value_and_gradient_fn = GraphFunction(self._value_and_gradient)
        self._minimize = GraphFunction(self._minimize_impl)
        self.last = None

    def _assign(self, theta: tf.Tensor) -> None:
        for variable, value in zip(
            self.objective.variables, self.layout.unflatten(theta), strict=True
        ):
            variable.assign(tf.cast(value, variable.dtype))

    def _value_and_gradient(
        self, theta: tf.Tensor, weights: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        self._assign(theta)
        variables = self.objective.variables

        def add(acc, batch, last=False):
            start, total = acc
            x, y = batch
            size = tf.shape(tf.nest.flatten(x)[0])[0]
            w = weights[start : start + size]
            return start + size, total + tf.reduce_sum(w * self.objective.per_example_loss(x, y))

        with tf.GradientTape() as tape:
            _, total = self.data.fold(add, (tf.constant(0), tf.zeros([], self.dtype)))
            total += tf.cast(self.objective.regularization(), self.dtype)
        gradient = self.layout.flatten(tape.gradient(total, variables), self.dtype)
        shift = theta - self.theta_hat
        total += 0.5 * self.damping * tf.reduce_sum(shift**2)
        return total, gradient + self.damping * shift

    def _minimize_impl(self, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        result = self._lbfgs(
            lambda theta: self._value_and_gradient_fn(theta, weights),
            initial_position=self.theta_hat,
            tolerance=self.tolerance,
            max_iterations=self.max_iterations,
        )
        self._assign(result.position)
        return (
            result.converged,
            result.num_iterations,
            tf.reduce_max(tf.abs(result.objective_gradient)),
        )

    def __call__(self, removed: int | None) -> None:
        n = self.data.num_examples
        weights = np.full(n, 1.0 / n)
        if removed is not None:
            weights[removed] = 0.0
        self.last = [t.numpy() for t in self._minimize(tf.constant(weights, self.dtype))]
