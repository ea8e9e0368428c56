"""``FittedState``: everything ``fit`` prepared, and the one object feature modules use.

It owns the training data, the curvature operator, the per-example gradients,
the solver's prepared state, the influence index of a solver that keeps one
(``Solver.projection`` / ``Solver.index``, see ``tf_influence.engine.index``), the cache
of inverse-HVP solutions and the fingerprints of the weights and the data.
``InfluenceModel.fit``, ``InfluenceModel.load`` and ``InfluenceCallback`` all
make one the same way (``FittedState(...)`` runs the checks of
``tf_influence.engine.checks`` and builds the curvature), and every feature
(groups, neighbours, perturbation, export, saving, evaluation, callbacks) works
through its public methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import tensorflow as tf

from tf_influence._cache import SolutionCache, batch_key
from tf_influence._errors import raise_at_first_nonfinite, user_stacklevel
from tf_influence._fingerprint import data_fingerprint, weights_fingerprint
from tf_influence._progress import Progress
from tf_influence.distribute import check_workers_agree
from tf_influence.engine import checks
from tf_influence.engine import damping as damping_lib
from tf_influence.engine.curvature import HessianOperator, make_operator
from tf_influence.engine.data import ExampleData
from tf_influence.engine.gradients import PerExampleGradients
from tf_influence.engine.index import (
    MemoryRows,
    build_rows,
    build_store,
    index_queries,
    quadratic_rows,
    score_rows,
)
from tf_influence.engine.objective import Objective
from tf_influence.engine.settings import Settings
from tf_influence.engine.weights import unweigh
from tf_influence.outputs import make_sink
from tf_influence.solvers.base import Diagnostics, IndexInverse, LowRankQueries, Solver

_Result = TypeVar("_Result", covariant=True)


class ScoreSink(Protocol[_Result]):
    """Where ``FittedState.score_training`` writes the scores, block by block.

    ``tf_influence.outputs.DenseSink`` (the matrix, in memory or memory-mapped),
    ``TopKSink`` (the ``top_k`` per test point) and the resumable ``.npy`` file of
    ``explain(output=)`` implement it.
    """

    def write(self, start: int, block: np.ndarray) -> None:
        """Takes the ``(k, m)`` scores of training examples ``start .. start + m - 1``."""

    def result(self) -> _Result:
        """What ``explain`` returns, once every block was written."""


# explain(per_layer=True): the masked solutions of one scoring pass stay within this.
PER_LAYER_BYTES = 512 * 2**20

NONFINITE_TRAINING = (
    "The loss gradient is NaN or inf at training example {index}. Check that example and "
    "its label, then call `fit` again."
)


class FittedState:
    """The training data and everything computed from it for one set of weights.

    Args:
        objective: the per-example loss, regularisation and parameters.
        settings: the ``Settings`` record of ``compile``.
        data: the training examples, in the order of the score columns.
        strategy: None, or the ``tf.distribute.Strategy`` to shard products over.
        verbose: resolved verbosity (0, 1 or 2) of the work done now.
        data_fingerprint: the training data's fingerprint when already known
            (``load`` read it from the file).
        solver_state: arrays from ``Solver.get_state`` to restore instead of
            recomputing them (``load``).

    Attributes:
        objective, data, strategy: as given.
        settings: the ``Settings`` record with ``damping="auto"`` resolved to the float
            used (``compile``'s record is ``requested_settings``).
        damping: the damping the operator and the solver use (a float).
        curvature: the curvature's name (``"hessian"`` or ``"gauss_newton"``).
        spectrum: the ``SpectrumEstimate`` behind ``damping="auto"``, or None.
        solver: ``settings.solver``.
        gradients: the ``PerExampleGradients`` used for every score.
        operator: the curvature operator ``v -> (H + damping*I) v``.
        solutions: the cache of inverse-HVP vectors of test batches.
        index: the influence index of a solver with one (``Solver.index``): its
            training gradients in the solver's coordinates, ``(n_train, dim)`` (a
            tensor, or the rows on disk), or None (see ``tf_influence.engine.index``).
        index_inverse: the solver's ``IndexInverse`` the index is scored with, or None.
        weights_fingerprint: sha256 of the weights the state was built for.
        diagnostics: the ``Diagnostics`` of the last solve (None before one).
    """

    def __init__(
        self,
        objective: Objective,
        settings: Settings,
        data: ExampleData,
        strategy: tf.distribute.Strategy | None = None,
        verbose: int = 0,
        data_fingerprint: str | None = None,
        solver_state: dict[str, np.ndarray] | None = None,
    ):
        self.objective = objective
        self.requested_settings = settings
        self.settings = settings
        self.spectrum: damping_lib.SpectrumEstimate | None = None
        self.data = data
        self.strategy = strategy
        self.gradients = PerExampleGradients(objective, settings.scoring, settings.jit_compile)
        # Solutions for ``target=`` functions, keyed by the function's id: this model's own.
        self._target_solutions = SolutionCache()
        self.diagnostics: Diagnostics | None = None
        self.operator: HessianOperator | None = None
        self.index: Any = None
        self.index_inverse: IndexInverse | None = None
        self.weights_fingerprint: str | None = None
        self._data_fingerprint = data_fingerprint
        self._outputs: int | None = None
        self._relative: dict | None = None
        self._features: dict = {}
        checks.check_weights(objective, strategy)
        if strategy is None:
            self._warm_up()
        first = data.first_batch()  # one read of the data for the checks below
        self._outputs = checks.num_outputs(objective, first[0])
        checks.check_targets(objective, data, "y", self._outputs)
        checks.check_class_weight(data, self._outputs)
        checks.check_batch(objective, first, "x", "y", check_gradients=True)
        self.gradients.check_factored(*first[:2])
        if strategy is None:
            self.gradients.warm_up(*first[:2])
        else:
            check_workers_agree(
                strategy,
                {
                    "weights": weights_fingerprint(objective.model.weights),
                    "training data": self.training_fingerprint(),
                },
            )
        self._build(verbose, solver_state)

    # -- building -----------------------------------------------------------------------
    @property
    def solver(self) -> Solver:
        return self.settings.solver

    @property
    def solutions(self) -> SolutionCache:
        """The inverse-HVP vectors of test batches (of the loss), keyed by the batch.

        Kept on the operator for this solver configuration: dropped when the
        weights change, and shared with every ``InfluenceModel`` on the same model,
        configuration, training data, damping and weights (see
        ``HessianOperator.cached``), so a new one explains the same test points
        without solving again.
        """
        key = ("solutions", type(self.solver).__name__, repr(self.solver.get_config()))
        return self.operator.cached(key, SolutionCache)

    @property
    def damping(self) -> float:
        """The damping the curvature and the solver use (``"auto"`` resolved at ``fit``)."""
        return float(self.settings.damping)

    @property
    def curvature(self) -> str:
        """The curvature's name: ``"hessian"`` or ``"gauss_newton"``."""
        return self.settings.curvature

    @property
    def num_train(self) -> int:
        return self.data.num_examples

    @property
    def num_params(self) -> int:
        return self.objective.num_params

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

    def _warm_up(self) -> None:
        """The operator, and the solver's ``warm_up``, before the data checks.

        The checks take a while in a new process; meanwhile the solver may get its
        first solve ready. A curvature kind that reads the data when it is made (the
        Gauss-Newton loss check) may fail on bad data here: then nothing is started,
        the checks explain the data's problem, and the operator is made after them.
        """
        try:
            operator = self._make_operator()
            self.solver.warm_up(operator)
        except Exception:  # noqa: BLE001 - raised again, or explained, after the checks
            return
        self.operator = operator

    def _make_operator(self) -> HessianOperator:
        requested = self.requested_settings
        return make_operator(
            requested.curvature,
            self.objective,
            self.data,
            0.0 if requested.damping == "auto" else requested.damping,
            requested.hvp,
            requested.jit_compile,
            self.strategy,
        )

    def _build(
        self,
        verbose: int,
        solver_state: dict[str, np.ndarray] | None = None,
        reuse: bool = False,
    ) -> None:
        requested = self.requested_settings
        auto = requested.damping == "auto"
        if reuse and self.operator is not None:
            self.operator.clear_cache()  # the traced functions are kept
        elif self.operator is None:
            self.operator = self._make_operator()

        def progress(total, label):
            return Progress(total, verbose, label)

        self.index, self.index_inverse = None, None
        if auto:
            self.operator.set_damping(0.0)
        if solver_state:  # from `load`: before the solver sees the operator
            self.solver.set_state(self.operator, solver_state)
        # Coordinates known before any pass: the index first, its Gram to the solver.
        projection = self.solver.projection(self.operator)
        if projection is not None and projection.store is not None:
            fingerprints = self.store_fingerprints(projection)
            self.index, gram = build_store(self.data, projection, fingerprints, verbose)
        elif projection is not None:
            rows = MemoryRows()
            gram = build_rows(self.data, projection, rows, verbose, projection.with_gram)
            self.index = rows.rows
        if projection is not None and projection.with_gram:
            self.solver.set_index_gram(self.operator, gram, self.num_train)
        if auto:  # once per set of weights
            mean = self.solver.mean_eigenvalue(self.operator, progress)
            self.spectrum = damping_lib.estimate(self.operator, mean=mean)
            # What the solver computed for its estimate does not depend on the damping:
            # carried across the damping change (which drops the operator's values).
            carried = self.solver.get_state(self.operator) if mean is not None else None
            self.operator.set_damping(self.spectrum.damping)
            if carried or solver_state:
                self.solver.set_state(self.operator, carried or solver_state)
            self.settings = dataclasses.replace(requested, damping=self.spectrum.damping)
        self._target_solutions.clear()
        self._relative = None
        self._features = {}
        self.weights_fingerprint = weights_fingerprint(self.objective.model.weights)
        self.solver.prepare(self.operator, progress)
        self.index_inverse = self.solver.index(self.operator)
        if self.index_inverse is None:
            self.index = None
        elif self.index is None:  # coordinates found by `prepare` (a low-rank basis)
            self.index = self._build_index(self.index_inverse.projection, verbose)

    def refresh(self, verbose: int = 0) -> None:
        """Rebuilds the curvature for the model's current weights (same data, same traces).

        For repeated analyses of one training run (``InfluenceCallback``): the
        weights are checked again, everything computed from the old ones is
        dropped, and the compiled functions are kept.
        """
        checks.check_weights(self.objective, self.strategy)
        self._build(verbose, reuse=True)

    def solver_state(self) -> dict[str, np.ndarray]:
        """The arrays the solver keeps (``Solver.get_state``), for ``save``."""
        return self.solver.get_state(self.operator)

    def _build_index(self, projection: Any, verbose: int) -> tf.Tensor:
        """``P^T grad L(z_j)`` for every training example, ``(n_train, dim)``, one pass.

        Per batch with ``projection.examples``; else through the scoring path with
        ``projection.matrix`` (factored products, no per-example gradient formed).
        """
        rows = MemoryRows()
        if projection.examples is not None:
            build_rows(self.data, projection, rows, verbose, with_gram=False)
            return rows.rows
        progress = Progress(self.data.num_batches(), verbose, "Influence index")
        blocks = self.training_blocks(projection.matrix)
        for step, (offset, block, _) in enumerate(blocks, start=1):
            rows.write(offset, -tf.transpose(block))  # block = -(P^T g), (dim, b)
            progress.update(step)
        progress.done()
        rows.finish()
        return rows.rows

    # -- checks -------------------------------------------------------------------------
    def training_fingerprint(self) -> str:
        """sha256 of the training examples, in order (one pass, then cached)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.data)
        return self._data_fingerprint

    @property
    def known_fingerprint(self) -> str | None:
        """The training data's fingerprint if already computed (no pass over the data)."""
        return self._data_fingerprint

    def require_current(self, what: str) -> None:
        """Refuses to mix the curvature of ``fit`` with weights that changed since."""
        if weights_fingerprint(self.objective.model.weights) != self.weights_fingerprint:
            raise RuntimeError(
                f"`{what}` refused: the model's weights changed since `fit` (training went on, "
                "or weights were loaded), so the stored curvature and cached solutions "
                "describe another model. Call `fit(x_train, y_train)` again."
            )

    def store_fingerprints(self, projection: Any) -> dict[str, str]:
        """Digests of what a stored index depends on: weights, data, objective, projection."""
        return {
            "weights": weights_fingerprint(self.objective.model.weights),
            "training data": self.training_fingerprint(),
            "objective": _digest(
                {"loss": self.objective.loss_name, "params": self.param_indices()}
            ),
            "projection": _digest(projection.key),
        }

    def param_indices(self) -> list[int]:
        """Positions of the analysed variables in ``model.trainable_variables``."""
        position = {id(v): i for i, v in enumerate(self.objective.model.trainable_variables)}
        return [position[id(v)] for v in self.objective.variables]

    def fingerprints(self, tests: ExampleData, options: dict[str, Any]) -> dict[str, str]:
        """Digests of everything a score matrix depends on, for resuming it safely."""
        settings = {
            **self.settings.to_config(),  # with the damping that was used
            "batch_size": self.batch_size,
            "params": self.param_indices(),
            "loss": self.objective.loss_name,
        }
        return {
            "weights": self.weights_fingerprint,
            "training data": self.training_fingerprint(),
            "solver settings": _digest(settings),
            "test points": data_fingerprint(tests),
            "options": _digest(options),
        }

    # -- test points --------------------------------------------------------------------
    def test_data(
        self, x_test: Any, y_test: Any = None, batch_size: int | None = None
    ) -> ExampleData:
        """Test points as ``ExampleData`` (``y_test`` may be None: the predicted class)."""
        return ExampleData(
            x_test, y_test, batch_size, x_name="x_test", y_name="y_test", require_y=False
        )

    def targets(self, batch: tuple) -> tuple:
        """``(x, y)`` of a test batch; without labels, ``y`` is the predicted class."""
        x = batch[0]
        if len(batch) > 1:
            return x, batch[1]
        return x, self.objective.predicted_labels(x)

    def test_gradients(
        self, batch: tuple, target: Callable | None = None, check: bool = False, offset: int = 0
    ) -> tuple[str, Callable[[], tf.Tensor]]:
        """``(cache key, () -> (b, p) gradients)`` of the test loss, or of ``target``."""
        if target is None:
            x, y = self.targets(batch)
            if len(batch) > 1:
                checks.check_test_targets(self.objective, y, self._outputs, offset)
            if check:
                checks.check_batch(self.objective, (x, y), "x_test", "y_test")
            return batch_key(x, y), lambda: self.gradients(x, y)
        x = batch[0]
        if check:
            checks.check_target_function(target, self.objective, x)
        key = f"{batch_key(x, ())}|target:{id(target)}"
        return key, lambda: self.gradients.target_gradients(target, x)

    def test_gradient_matrix(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        target: Callable | None = None,
    ) -> tf.Tensor:
        """``(n_test, p)`` gradients of the test losses (or of ``target``)."""
        tests = self.test_data(x_test, y_test, batch_size)
        parts, offset = [], 0
        for step, batch in enumerate(tests.batches()):
            grads = self.test_gradients(batch, target, check=step == 0, offset=offset)[1]()
            parts.append(grads)
            offset += int(grads.shape[0])
        return tf.concat(parts, axis=0)

    # -- solves -------------------------------------------------------------------------
    def solve(self, rhs: tf.Tensor, what: str) -> tf.Tensor:
        """``inv(H + damping*I) @ rhs`` for ``(p, k)`` columns; warns if it did not converge."""
        solution, diagnostics = self.solver.solve(self.operator, rhs)
        self.diagnostics = diagnostics = self.described(diagnostics)
        self.warn_if_unconverged(diagnostics, what)
        return solution

    def inverse_hvp_tests(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: int = 0,
        target: Callable | None = None,
    ) -> tf.Tensor:
        """``inv(H) @ grad L(z_test_i)`` for every test point, ``(num_params, n_test)``.

        Solutions are cached per test batch (up to 512 MiB), so explaining the
        same test points again does not solve again.
        """
        tests = self.test_data(x_test, y_test, batch_size)
        solutions, diagnostics = [], []
        progress = Progress(tests.num_batches(), verbose, "Solving for test points")
        offset = 0
        for step, batch in enumerate(tests.batches(), start=1):
            key, gradients = self.test_gradients(batch, target, check=step == 1, offset=offset)
            cache = self.solutions if target is None else self._target_solutions
            cached = cache.get(key)
            if cached is None:
                grads = gradients()
                raise_at_first_nonfinite(
                    np.isfinite(grads.numpy()).all(axis=1),
                    offset,
                    f"The {'loss' if target is None else 'target'} gradient is NaN or inf at "
                    "test example {index} of `x_test`. Check that example and its target.",
                )
                cached = self.solver.solve(self.operator, tf.transpose(grads))
                cache.put(key, *cached)
            solution, diag = cached
            solutions.append(solution)
            diagnostics.append(diag)
            offset += int(solution.shape[1])
            progress.update(step)
        progress.done()
        self.diagnostics = self.described(merge_diagnostics(diagnostics))
        self.warn_if_unconverged(self.diagnostics, "test points")
        return tf.concat(solutions, axis=1)

    @property
    def index_queries(self) -> SolutionCache:
        """The index coordinates of test batches (of the loss), keyed like ``solutions``."""
        key = ("index queries", type(self.solver).__name__, repr(self.solver.get_config()))
        return self.operator.cached(key, SolutionCache)

    def test_queries(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: int = 0,
        target: Callable | None = None,
    ) -> tf.Tensor:
        """What ``score_training`` scores the training examples against, per test point.

        With an influence index, ``inverse @ P^T grad L(z_test_i)`` (``(dim, n_test)``,
        see ``Solver.index``): no solve. Otherwise the solutions ``inv(H) @ grad
        L(z_test_i)`` of ``inverse_hvp_tests`` (``(num_params, n_test)``). Cached per
        test batch.
        """
        if self.index is None:
            return self.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
        cache = self.index_queries if target is None else self._target_solutions
        queries = index_queries(self, x_test, y_test, batch_size, target, cache)
        # No solve: every query is exact in the index's coordinates.
        count = int(queries.shape[1])
        info = {"index_dim": self.index_inverse.projection.dim}
        diagnostics = Diagnostics(self.solver.name, 0, np.zeros(count), np.ones(count, bool), info)
        self.diagnostics = self.described(diagnostics)
        return queries

    def described(self, diagnostics: Diagnostics | None) -> Diagnostics | None:
        """``diagnostics`` with ``info["damping"]`` and ``info["curvature"]`` of this fit."""
        if diagnostics is None:
            return None
        info = {**diagnostics.info, "damping": self.damping, "curvature": self.curvature}
        return dataclasses.replace(diagnostics, info=info)

    def warn_if_unconverged(self, diagnostics: Diagnostics | None, what: str) -> None:
        """One ``RuntimeWarning`` naming the knobs, when some solve did not converge."""
        if diagnostics is None or diagnostics.all_converged:
            return
        bad = int(np.sum(~diagnostics.converged))
        worst = float(np.max(diagnostics.residual_norm))
        warnings.warn(
            f"Solver {self.solver!r} did not converge for {bad} of "
            f"{diagnostics.converged.size} {what} (largest relative residual {worst:.2e} after "
            f"{diagnostics.iterations} iterations). Scores may be inaccurate: raise max_iter "
            "(CG) or recursion_depth (LiSSA), or add damping in `compile`.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    # -- training side ------------------------------------------------------------------
    def batches(self, rows: int | None = None) -> Iterator[tuple]:
        """The training batches ``(x, y)``, in order (``rows`` examples each)."""
        return self.data.batches(rows)

    def rows_per_pass(self, num_tests: int, queries: Sequence[LowRankQueries] = ()) -> int:
        """Training examples per scoring pass (several batches when factored scoring allows)."""
        self._check_factored()
        if self.operator.replicas is not None:
            return self.batch_size  # the global batches of the distributed dataset
        return self.gradients.rows_per_pass(num_tests, self.batch_size, queries)

    def _check_factored(self) -> None:
        """Runs the factored-gradient check on the first training batch, once per compile."""
        if self.gradients.factored_unchecked:
            self.gradients.check_factored(*self.data.first_batch()[:2])

    def training_blocks(
        self,
        solutions: tf.Tensor,
        start: int = 0,
        rows: int | None = None,
        queries: Sequence[LowRankQueries] = (),
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yields ``(offset, scores (k, m), finite (m,))`` over the training set, in order.

        ``scores = -solutions^T grad L(z_j)`` for the ``m`` examples of a pass of
        ``rows`` examples (default: the batch size of ``fit``). On a strategy,
        each replica scores its shard and the columns are put back in the order of
        ``fit``. Passes wholly before ``start`` are skipped (a resumed ``explain``).
        ``queries``: the low-rank factors of compressed layers of ``solutions``
        (``Solver.compress_queries``), multiplied instead of their dense blocks
        where that is cheaper.
        """
        replicas = self.operator.replicas
        if replicas is not None:
            self._check_factored()
            yield from replicas.score_blocks(self.gradients, solutions, start, queries)
            return
        offset = 0
        for batch in self.data.batches(rows):
            size = int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
            if offset + size <= start:
                offset += size
                continue
            block, finite = self.gradients.scores(batch[0], batch[1], solutions, queries)
            block = block.numpy()
            yield offset, block, finite.numpy()
            offset += block.shape[1]

    def score_training(
        self,
        solutions: tf.Tensor,
        verbose: int,
        sink: ScoreSink[_Result],
        divisors: np.ndarray | None = None,
        start: int = 0,
    ) -> _Result:
        """Writes ``-solutions^T grad L(z_j)`` for every training example into ``sink``.

        ``solutions``: what ``test_queries`` returned. With an influence index, the
        ``(dim, k)`` queries, scored against the index rows; otherwise the solutions,
        the solver's compressed queries first (``Solver.compress_queries``; unchanged
        by default), scored in a pass over the training data.
        """
        if self.index is not None:
            return self._score_from_index(solutions, sink, divisors, start)
        solutions, queries = self.solver.compress_queries(self.operator, solutions)
        return self._score_training(solutions, queries, verbose, sink, divisors, start)

    def _score_training(
        self,
        solutions: tf.Tensor,
        queries: Sequence[LowRankQueries],
        verbose: int,
        sink: ScoreSink[_Result],
        divisors: np.ndarray | None = None,
        start: int = 0,
    ) -> _Result:
        rows = self.rows_per_pass(int(solutions.shape[1]), queries)
        progress = Progress(self.data.num_batches(rows), verbose, "Scoring training examples")
        blocks = self.training_blocks(solutions, start, rows, queries)
        for step, (offset, block, finite) in enumerate(blocks, start=1):
            raise_at_first_nonfinite(finite, offset, NONFINITE_TRAINING)
            if divisors is not None:
                block = block / divisors[offset : offset + block.shape[1]]
            sink.write(offset, block)
            progress.update(step)
        progress.done()
        return sink.result()

    def explain_per_layer(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: int = 0,
        target: Callable | None = None,
    ) -> dict[str, np.ndarray]:
        """``explain(per_layer=True)``: ``{layer name: (n_test, n_train) scores}``.

        Raises:
            ValueError: the solver has no layers (``Solver.layers`` is None).
        """
        groups = self.solver.layers(self.operator)
        if groups is None:
            raise ValueError(
                "Argument `per_layer=True` needs a solver that approximates the "
                f"curvature layer by layer. Received: solver={self.solver!r}. Compile "
                'with solver="ekfac" or solver="kfac" to see each layer\'s part.'
            )
        solutions = self.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
        return self.score_per_layer(solutions, groups, verbose)

    def score_per_layer(
        self, solutions: tf.Tensor, groups: list[tuple[str, list[int]]], verbose: int
    ) -> dict[str, np.ndarray]:
        """``{layer: -solutions_layer^T grad_layer L(z_j)}``: each group's part of the scores.

        The solutions (compressed as by ``score_training``) are masked to each group's
        variables, so the parts sum to the scores of ``score_training``. Groups are
        scored together in passes that keep the masked solutions within
        ``PER_LAYER_BYTES``.
        """
        solutions, queries = self.solver.compress_queries(self.operator, solutions)
        p, k = int(solutions.shape[0]), int(solutions.shape[1])
        offsets = np.concatenate([[0], np.cumsum(self.objective.layout.sizes)])
        masks = []
        for _, indices in groups:
            mask = np.zeros(p, solutions.dtype.as_numpy_dtype)
            for i in indices:
                mask[offsets[i] : offsets[i + 1]] = 1
            masks.append(mask)
        per_pass = max(1, PER_LAYER_BYTES // max(1, p * k * solutions.dtype.size))
        dtype = self.objective.dtype.as_numpy_dtype
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(groups), per_pass):
            chosen = range(start, min(start + per_pass, len(groups)))
            masked = tf.concat([solutions * masks[g][:, None] for g in chosen], axis=1)
            # A compressed layer's factors, zero in the columns of the other groups.
            masked_queries = [
                dataclasses.replace(
                    q,
                    left=tf.concat(
                        [
                            q.left if q.kernel in groups[g][1] else tf.zeros_like(q.left)
                            for g in chosen
                        ],
                        axis=0,
                    ),
                    right=tf.concat([q.right] * len(chosen), axis=0),
                )
                for q in queries
            ]
            sink = make_sink(k * len(chosen), self.num_train, dtype, None, None)
            scores = self._score_training(masked, masked_queries, verbose, sink)
            for position, g in enumerate(chosen):
                found[groups[g][0]] = scores[position * k : (position + 1) * k]
        return found

    def _score_from_index(
        self,
        queries: tf.Tensor,
        sink: ScoreSink[_Result],
        divisors: np.ndarray | None,
        first: int = 0,
    ) -> _Result:
        """``-queries^T Phi_j`` for every index row (``queries`` from ``test_queries``)."""
        return score_rows(self.index, queries, sink, divisors, first, NONFINITE_TRAINING)

    def self_influence(self, verbose: int = 0) -> np.ndarray:
        """``grad L(z_j)^T @ inv(H) @ grad L(z_j)`` for every training example, ``(n_train,)``.

        With sample weights, ``w_j * grad L(z_j)^T @ inv(H) @ grad L(z_j)``: the
        training side is ``w_j L_j``, the test side the example's own loss ``L_j``,
        so it equals ``-diag(explain(x_train, y_train))``.
        """
        dtype = self.objective.dtype.as_numpy_dtype
        if self.index is not None:  # Phi_j^T inverse Phi_j
            values = quadratic_rows(self.index, self.index_inverse)
            return unweigh(values, self.data.sample_weights()).astype(dtype)
        values, diagnostics = [], []
        progress = Progress(self.data.num_batches(), verbose, "Self-influence")
        for step, batch in enumerate(self.data.batches(), start=1):
            grads = tf.transpose(self.gradients(batch[0], batch[1]))  # (p, b)
            products, diag = self.solver.self_products(self.operator, grads)
            values.append(products.numpy())
            if diag is not None:
                diagnostics.append(diag)
            progress.update(step)
        progress.done()
        if diagnostics:
            self.diagnostics = self.described(merge_diagnostics(diagnostics))
            self.warn_if_unconverged(self.diagnostics, "training points")
        result = unweigh(np.concatenate(values), self.data.sample_weights()).astype(dtype)
        raise_at_first_nonfinite(
            np.isfinite(result),
            0,
            "Self-influence is NaN or inf at training example {index}. Check that example and "
            "its label, and the damping.",
        )
        return result

    def relative_divisors(self, kind: str, verbose: int = 0) -> np.ndarray:
        """``|inv(H) g_j|`` ("theta") or ``sqrt(g_j^T inv(H) g_j)`` ("loss"), cached."""
        if self._relative is None:
            theta, loss, diagnostics = [], [], []
            progress = Progress(self.data.num_batches(), verbose, "RelatIF normalisers")
            for step, batch in enumerate(self.data.batches(), start=1):
                grads = tf.transpose(self.gradients(batch[0], batch[1]))  # (p, b)
                solution, diag = self.solver.solve(self.operator, grads)
                diagnostics.append(diag)
                theta.append(tf.norm(solution, axis=0).numpy())
                loss.append(tf.reduce_sum(grads * solution, axis=0).numpy())
                progress.update(step)
            progress.done()
            self.warn_if_unconverged(merge_diagnostics(diagnostics), "training points")
            loss = np.concatenate(loss)
            if np.any(loss < 0):
                raise ValueError(
                    "relative='loss' needs g_j^T inv(H) g_j >= 0, but it is negative at "
                    f"training example {int(np.flatnonzero(loss < 0)[0])}: H + damping*I is "
                    "not positive definite. Add damping in `compile`."
                )
            self._relative = {"theta": np.concatenate(theta), "loss": np.sqrt(loss)}
        divisors = self._relative[kind]
        # An example with zero gradient has zero influence: leave its scores at 0.
        return np.where(divisors > 0, divisors, 1.0)

    def feature_index(self, key: Any, make: Callable[[], Any]) -> Any:
        """A nearest-neighbour index of the training data, built once per ``key``."""
        if key not in self._features:
            self._features[key] = make()
        return self._features[key]


def merge_diagnostics(parts: list[Diagnostics]) -> Diagnostics | None:
    """One ``Diagnostics`` for several solves (columns concatenated)."""
    if not parts:
        return None
    return Diagnostics(
        solver=parts[0].solver,
        iterations=max(p.iterations for p in parts),
        residual_norm=np.concatenate([p.residual_norm for p in parts]),
        converged=np.concatenate([p.converged for p in parts]),
        info=parts[-1].info,
    )


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
