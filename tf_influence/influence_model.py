"""``InfluenceModel``: the Keras-style front door (``compile`` / ``fit`` / ``explain``)."""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import solvers as solvers_lib
from tf_influence._cache import SolutionCache, batch_key
from tf_influence._errors import describe, raise_at_first_nonfinite, user_stacklevel
from tf_influence._fingerprint import data_fingerprint, weights_fingerprint
from tf_influence._progress import Progress, resolve_verbose
from tf_influence.distribute import (
    check_replicas_in_sync,
    check_workers_agree,
    resolve_strategy,
    translate_worker_errors,
)
from tf_influence.engine.curvature import HessianOperator, check_hvp_mode
from tf_influence.engine.data import ExampleData
from tf_influence.engine.gradients import PerExampleGradients
from tf_influence.engine.objective import Objective, variable_name
from tf_influence.export import export_model
from tf_influence.groups import predict_removal
from tf_influence.neighbors import score_candidates, top_k_of
from tf_influence.outputs import TopK, check_k, check_sink_args, make_sink
from tf_influence.perturbation import explain_perturbation
from tf_influence.resume import ResumableOutput
from tf_influence.saving import load_state, save_state
from tf_influence.solvers.base import Diagnostics

_NONFINITE_TRAINING = (
    "The loss gradient is NaN or inf at training example {index}. Check that example and "
    "its label, then call `fit` again."
)


def check_damping(damping) -> float:
    """``damping`` as a float, or a ValueError that says what is allowed."""
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(damping, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(
            "Argument `damping` must be a finite number >= 0. Received: "
            f"damping={damping!r}. Use 0.0 for a convex model, or a small positive value "
            "such as 1e-3 otherwise."
        )
    return value


class InfluenceModel:
    """Influence functions for a trained Keras model (Koh & Liang, 2017).

    The objective is the one ``model.fit`` minimised,
    ``R(theta) = (1/n) sum_j L(z_j, theta) + Omega(theta)``, with
    ``H = hessian(R)(theta_hat) + damping*I``. Every score this class returns is
    ``I_up,loss``::

        scores[i, j] = -grad L(z_test_i)^T @ inv(H) @ grad L(z_j)

    ``scores[i, j] > 0``: up-weighting training example j raises test loss i
    (harmful); ``< 0``: it lowers it (helpful). Removing example j changes test
    loss i by about ``-scores[i, j] / n_train``.

    Args:
        model: a built ``keras.Model`` (Sequential, Functional or subclassed) on the
            TensorFlow backend.
        loss: a keras loss object, a loss name or a callable ``(y_true, y_pred)``;
            None uses the loss the model was compiled with.
        params: None for all trainable weights, or layers / layer names / variables
            (the influence is then taken with the other weights held fixed).
        strategy: a ``tf.distribute.Strategy`` to run on, or None for the one the
            model was built under (``model.distribute_strategy``), as ``model.fit``
            does. Training-set products and scores are then sharded over its
            replicas and all-reduced (see ``tf_influence.distribute``).

    Example:
        >>> im = tfi.InfluenceModel(model)
        >>> im.compile(solver="cg", damping=1e-3)
        >>> im.fit(x_train, y_train)
        >>> scores = im.explain(x_test[:5], y_test[:5])     # (5, n_train)

    References:
        Koh & Liang, "Understanding Black-box Predictions via Influence Functions",
        ICML 2017.
    """

    def __init__(self, model, loss=None, params=None, strategy=None):
        self.model = model
        self.strategy = resolve_strategy(model, strategy)
        self.objective = Objective(model, loss=loss, params=params)
        self.solver: solvers_lib.Solver = solvers_lib.CG()
        self.damping = 0.0
        self.hvp = "auto"
        self.jit_compile = False
        self._gradients = PerExampleGradients(self.objective)
        self._data: ExampleData | None = None
        self._operator: HessianOperator | None = None
        self._solution_cache = SolutionCache()
        self._weights_fingerprint: str | None = None
        self._data_fingerprint: str | None = None
        self._relative_cache: dict | None = None
        self._feature_indexes: dict = {}
        self._index: tf.Tensor | None = None
        self._num_outputs_cache: int | None = None
        self.diagnostics: Diagnostics | None = None

    # -- configuration ----------------------------------------------------------------
    def compile(
        self,
        solver="cg",
        damping: float = 0.0,
        hvp: str = "auto",
        scoring: str = "auto",
        jit_compile: bool = False,
    ) -> None:
        """Chooses the inverse-HVP solver, the damping and how products are computed.

        Optional: without it, ``fit`` uses ``solver="cg", damping=0.0``.

        Args:
            solver: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"`` or a
                ``tfi.solvers`` instance.
            damping: non-negative number added to the Hessian's diagonal
                (``H + damping*I``); needed when H is not positive definite
                (non-convex models, or parameters the loss does not constrain).
            hvp: Hessian-vector products by ``"reverse_over_reverse"`` (nested
                tapes) or ``"forward_over_reverse"``; ``"auto"`` takes nested tapes
                (the same speed in our benchmarks, and twice as fast to trace).
            scoring: training scores by ``"jvp"`` (forward mode, no gradients kept)
                or ``"jacobian"`` (vectorised per-example gradients); ``"auto"``
                picks by the number of test points.
            jit_compile: compile the per-batch products and gradients with XLA, as
                ``keras.Model.compile(jit_compile=True)`` does.
        """
        value = check_damping(damping)
        check_hvp_mode(hvp)
        if not isinstance(jit_compile, bool):
            raise ValueError(
                "Argument `jit_compile` must be True or False. Received: "
                f"jit_compile={jit_compile!r}"
            )
        self._gradients = PerExampleGradients(self.objective, scoring, jit_compile)
        self.solver = solvers_lib.get(solver)
        self.damping = value
        self.hvp = hvp
        self.jit_compile = jit_compile
        self._solution_cache.clear()
        if self._data is not None:
            self._build_operator()

    @property
    def num_params(self) -> int:
        """Number of parameters influence is computed over."""
        return self.objective.num_params

    @property
    def num_train(self) -> int:
        """Number of training examples seen by ``fit`` (0 before it)."""
        return self._data.num_examples if self._data is not None else 0

    @property
    def operator(self) -> HessianOperator:
        """The ``v -> (H + damping*I) v`` operator over the training data."""
        self._require_fit("operator")
        return self._operator

    # -- fit ---------------------------------------------------------------------------
    @translate_worker_errors
    def fit(self, x, y=None, batch_size: int | None = None, verbose="auto") -> InfluenceModel:
        """Takes the training data and prepares the curvature.

        Args:
            x: training inputs (array, tensor, list/dict of them) or a batched
                ``tf.data.Dataset`` of ``(x, y)`` in a fixed order; column ``j`` of every
                score matrix is its ``j``-th example.
            y: training targets (None when ``x`` is a dataset).
            batch_size: examples per batch for Hessian-vector products and gradients
                (default 32); must be None for a dataset.
            verbose: "auto", 0, 1 or 2, as in Keras.

        Returns:
            self, so that ``im.fit(x, y).explain(...)`` chains.
        """
        verbose = resolve_verbose(verbose)
        data = ExampleData(x, y, batch_size, x_name="x", y_name="y")
        self._check_weights()
        self._check_targets(data, "y")
        self._check_batch(data.first_batch(), "x", "y", check_gradients=True)
        self._gradients.check_factored(*data.first_batch()[:2])
        fingerprint = None
        if self.strategy is not None:
            fingerprint = data_fingerprint(data)
            check_workers_agree(
                self.strategy,
                {"weights": weights_fingerprint(self.model.weights), "training data": fingerprint},
            )
        self._data, self._data_fingerprint = data, fingerprint
        self._build_operator(verbose)
        return self

    def _build_operator(self, verbose=0, cholesky=None, reuse=False):
        """(Re)builds the curvature for the current weights.

        ``reuse=True`` keeps the operator (and its traced functions) and only drops
        what it computed from the old weights: for repeated analyses of one
        training run (``InfluenceCallback``).
        """
        if reuse and self._operator is not None:
            self._operator.clear_cache()
        else:
            self._operator = HessianOperator(
                self.objective, self._data, self.damping, self.hvp, self.jit_compile, self.strategy
            )
        self._solution_cache.clear()
        self._relative_cache = None
        self._feature_indexes = {}
        self._weights_fingerprint = weights_fingerprint(self.model.weights)
        if cholesky is not None:  # restored by `load`: no Hessian to build
            self._operator.cached("exact.cholesky", lambda: cholesky)
        elif isinstance(self.solver, solvers_lib.Exact):
            total = self._operator.num_dense_chunks
            progress = Progress(
                total, verbose, f"Building the {self.num_params}x{self.num_params} Hessian"
            )
            self._operator.dense(progress=progress.update)
            progress.done()
        self.solver.prepare(self._operator)
        self._index = None
        if isinstance(self.solver, solvers_lib.Arnoldi):
            self._index = self._build_index(verbose)

    def _build_index(self, verbose):
        """The influence index of a low-rank solver: ``V^T grad L(z_j)`` for every example.

        ``(n_train, rank)``, one pass of per-example gradients at ``fit``; then
        ``score_ij = -(V^T s_i) . (V^T g_j)`` for any solution ``s_i`` in the span of
        ``V`` (which every low-rank solution is): one small product per query.
        """
        _, vectors = self.solver.eigenpairs(self._operator)
        progress = Progress(self._data.num_batches(), verbose, "Influence index")
        rows = []
        for step, (_, block, _) in enumerate(self._training_blocks(vectors), start=1):
            rows.append(-tf.transpose(block))  # block = -(V^T g), (r, b)
            progress.update(step)
        progress.done()
        return tf.concat(rows, axis=0)

    def _rows_per_pass(self, num_tests: int) -> int:
        """Training examples per scoring pass (several batches when factored scoring allows)."""
        self._check_factored()
        if self._operator.replicas is not None:
            return self._data.batch_size  # the global batches of the distributed dataset
        return self._gradients.rows_per_pass(num_tests, self._data.batch_size)

    def _check_factored(self) -> None:
        """Runs the factored-gradient check on the first training batch, once per compile."""
        if self._gradients.factored_unchecked:
            self._gradients.check_factored(*self._data.first_batch()[:2])

    def _training_blocks(self, solutions, start: int = 0, rows: int | None = None):
        """Yields ``(start, scores (k, m), finite (m,))`` over the training set, in order.

        ``rows`` examples per pass (default: the batch size of ``fit``). On a strategy,
        each replica scores its shard and the columns are put back in the order of
        ``fit`` by their global indices. Passes wholly before ``start`` are skipped
        without being scored (a resumed ``explain``).
        """
        replicas = self._operator.replicas
        if replicas is not None:
            self._check_factored()
            yield from replicas.score_blocks(self._gradients, solutions, start)
            return
        offset = 0
        for batch in self._data.batches(rows):
            size = int(tf.shape(tf.nest.flatten(batch[1])[0])[0])
            if offset + size <= start:
                offset += size
                continue
            block, finite = self._gradients.scores(batch[0], batch[1], solutions)
            block = block.numpy()
            yield offset, block, finite.numpy()
            offset += block.shape[1]

    def training_fingerprint(self) -> str:
        """sha256 of the training examples of ``fit``, in order (one pass, then cached)."""
        self._require_fit("training_fingerprint")
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self._data)
        return self._data_fingerprint

    def _require_fit(self, what):
        if self._data is None:
            raise RuntimeError(
                f"`{what}` needs the training data. Call `fit(x_train, y_train)` on the "
                "InfluenceModel first."
            )

    def _require_current(self, what):
        """Refuses to mix the curvature of ``fit`` with weights that changed since."""
        self._require_fit(what)
        if weights_fingerprint(self.model.weights) != self._weights_fingerprint:
            raise RuntimeError(
                f"`{what}` refused: the model's weights changed since `fit` (training went on, "
                "or weights were loaded), so the stored curvature and cached solutions "
                "describe another model. Call `fit(x_train, y_train)` again."
            )

    def _check_weights(self):
        for variable in self.objective.variables:
            value = np.asarray(variable.numpy())
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"Model weight {variable_name(variable)!r} holds NaN or inf. Received: "
                    f"{int(np.sum(~np.isfinite(value)))} non-finite values. Influence needs a "
                    "trained model with finite weights: retrain it (lower learning rate, "
                    "gradient clipping) or restore a good checkpoint."
                )
        if self.strategy is not None:
            check_replicas_in_sync(self.objective.variables, variable_name)

    def _num_outputs(self, x) -> int | None:
        """Size of the model output's last axis (classes) on a batch ``x``, if one output."""
        if self._num_outputs_cache is None:
            y_pred = self.objective.predict(x)
            self._num_outputs_cache = (
                int(y_pred.shape[-1]) if isinstance(y_pred, tf.Tensor) and y_pred.shape.rank else 0
            )
        return self._num_outputs_cache or None

    def _check_targets(self, data, y_name):
        """Every target of ``data`` in the range its loss accepts (one pass, numpy)."""
        if not data.has_targets:
            return
        offset = 0
        for batch in data.batches(max(data.batch_size, 4096) if data.in_memory else None):
            x, y = batch[0], batch[1]
            y = tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, y)
            self.objective.check_targets(y, self._num_outputs(x), y_name, offset)
            offset += len(tf.nest.flatten(y)[0])

    def _check_batch(self, batch, x_name, y_name, check_gradients=False):
        """Evaluates the loss on one batch to turn shape problems into clear errors."""
        x, y = batch[0], batch[1]
        y_pred = self.objective.predict(x)
        try:
            with tf.GradientTape() as tape:
                losses = self.objective.per_example_loss(x, y)
                total = tf.reduce_sum(losses) + self.objective.regularization()
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"The loss {self.objective.loss_name!r} cannot be computed on the targets "
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
            grads = tape.gradient(total, self.objective.variables)
            missing = [
                variable_name(v)
                for v, g in zip(self.objective.variables, grads, strict=True)
                if g is None
            ]
            if missing:
                raise ValueError(
                    f"These parameters get no gradient from the loss: {missing}. Received: "
                    "params including variables the loss does not depend on. Exclude them "
                    "with `params=` (layers, layer names or variables to analyse)."
                )

    # -- solves ------------------------------------------------------------------------
    def _test_data(self, x_test, y_test, batch_size):
        return ExampleData(
            x_test, y_test, batch_size, x_name="x_test", y_name="y_test", require_y=False
        )

    def _targets(self, batch):
        x = batch[0]
        if len(batch) > 1:
            return x, batch[1]
        return x, self.objective.predicted_labels(x)

    @translate_worker_errors
    def inverse_hvp_tests(self, x_test, y_test=None, batch_size=None, verbose="auto", target=None):
        """``inv(H) @ grad L(z_test_i)`` for every test point, shape ``(num_params, n_test)``.

        ``y_test=None`` uses the model's predicted class as the target. With
        ``target=fn``, ``grad fn(model, x_test_i)`` replaces the loss gradient (see
        ``explain``). Solutions are cached per test batch (up to 512 MiB), so
        explaining the same test points again does not solve again; ``compile`` and
        ``fit`` clear the cache.
        """
        self._require_current("explain")
        verbose = resolve_verbose(verbose)
        tests = self._test_data(x_test, y_test, batch_size)
        solutions, diagnostics = [], []
        progress = Progress(tests.num_batches(), verbose, "Solving for test points")
        offset = 0
        for step, batch in enumerate(tests.batches(), start=1):
            key, gradients = self._test_gradients(batch, target, check=step == 1, offset=offset)
            cached = self._solution_cache.get(key)
            if cached is None:
                grads = gradients()
                raise_at_first_nonfinite(
                    np.isfinite(grads.numpy()).all(axis=1),
                    offset,
                    f"The {'loss' if target is None else 'target'} gradient is NaN or inf at "
                    "test example {index} of `x_test`. Check that example and its target.",
                )
                cached = self.solver.solve(self._operator, tf.transpose(grads))
                self._solution_cache.put(key, *cached)
            solution, diag = cached
            solutions.append(solution)
            diagnostics.append(diag)
            offset += int(solution.shape[1])
            progress.update(step)
        progress.done()
        self.diagnostics = _merge(diagnostics)
        self._warn_if_unconverged(self.diagnostics, "test points")
        return tf.concat(solutions, axis=1)

    def _test_gradients(self, batch, target, check=False, offset=0):
        """``(cache key, () -> (b, p) gradients)`` of the test loss, or of ``target``."""
        if target is None:
            x, y = self._targets(batch)
            if len(batch) > 1:
                arrays = tf.nest.map_structure(lambda t: t.numpy(), y)
                self.objective.check_targets(arrays, self._num_outputs(x), "y_test", offset)
            if check:
                self._check_batch((x, y), "x_test", "y_test")
            return batch_key(x, y), lambda: self._gradients(x, y)
        x = batch[0]
        if check:
            _check_target(target, self.objective, x)
        key = f"{batch_key(x, ())}|target:{id(target)}"
        return key, lambda: self._gradients.target_gradients(target, x)

    def _warn_if_unconverged(self, diagnostics, what):
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

    # -- scores ------------------------------------------------------------------------
    def _score_training(self, solutions, verbose, sink, divisors=None, start=0):
        if self._index is not None:
            return self._score_from_index(solutions, sink, divisors, start)
        rows = self._rows_per_pass(int(solutions.shape[1]))
        progress = Progress(self._data.num_batches(rows), verbose, "Scoring training examples")
        blocks = self._training_blocks(solutions, start, rows)
        for step, (offset, block, finite) in enumerate(blocks, start=1):
            raise_at_first_nonfinite(finite, offset, _NONFINITE_TRAINING)
            if divisors is not None:
                block = block / divisors[offset : offset + block.shape[1]]
            sink.write(offset, block)
            progress.update(step)
        progress.done()
        return sink.result()

    def _score_from_index(self, solutions, sink, divisors, first=0):
        _, vectors = self.solver.eigenpairs(self._operator)
        coefficients = tf.matmul(vectors, solutions, transpose_a=True)  # (r, k)
        step = self._data.batch_size
        for start in range(first - first % step, self.num_train, step):
            rows = self._index[start : start + step]  # (b, r)
            block = -tf.matmul(coefficients, rows, transpose_a=True, transpose_b=True).numpy()
            raise_at_first_nonfinite(np.isfinite(block).all(axis=0), start, _NONFINITE_TRAINING)
            if divisors is not None:
                block = block / divisors[start : start + block.shape[1]]
            sink.write(start, block)
        return sink.result()

    @translate_worker_errors
    def explain(
        self,
        x_test,
        y_test=None,
        batch_size=None,
        verbose="auto",
        top_k: int | None = None,
        output=None,
        target=None,
        relative=None,
        candidates: int | None = None,
        feature_layer=None,
    ):
        """Influence of every training example on the loss of every test point.

        Returns ``I_up,loss``: ``scores[i, j] = -grad L(z_test_i)^T @ inv(H) @ grad L(z_j)``.
        Positive: up-weighting training example j raises test loss i (harmful);
        negative: helpful. Removing example j changes test loss i by about
        ``-scores[i, j] / n_train``.

        Args:
            x_test: test inputs (array, tensor, list/dict, or a batched dataset).
            y_test: test targets; None explains the model's own predicted class
                (classification losses only).
            batch_size: test points solved together (default 32).
            verbose: "auto", 0, 1 or 2, as in Keras.
            top_k: if given, keep only the ``top_k`` most helpful and most harmful
                training examples per test point while streaming over the training
                data, and return a ``TopK`` instead of the matrix.
            output: path of a ``.npy`` file; the matrix is written there block by
                block (memory-mapped) and returned opened read-only with
                ``mmap_mode="r"``. Resumable: if the run stops (Ctrl-C, a killed
                process), calling ``explain`` again with the same arguments goes on
                from the first unwritten block, after checking that weights, data,
                solver settings and test points are the same (see
                ``tf_influence.resume``).
            target: optional ``fn(model, x) -> (batch,)`` tensor, one scalar per test
                example (a class logit, a margin, a predicted value), built from
                TensorFlow/Keras ops. It replaces the test loss: ``scores[i, j] =
                -grad fn(z_test_i)^T @ inv(H) @ grad L(z_j)``, so positive means
                up-weighting example j raises ``fn`` at test point i, and removing it
                changes ``fn`` by about ``-scores[i, j] / n_train``. ``y_test`` is not
                used then.
            relative: None, ``"theta"`` or ``"loss"`` (RelatIF, Barshan et al. 2020):
                divide column j by ``|inv(H) @ grad L(z_j)|`` (``"theta"``: how far
                the example moves the parameters) or by ``sqrt(self_influence()[j])``
                (``"loss"``), so that a few high-loss outliers with large global
                influence do not top every ranking. Needs one solve per training
                example, once per ``fit`` (then cached).
            candidates: if given, score only the ``candidates`` training examples
                nearest to each test point in the feature space of ``feature_layer``
                (FastIF, Guo et al. 2021; exact Euclidean search by matrix products)
                and return ``Candidates(indices, scores, distances)`` of shape
                ``(n_test, candidates)``, nearest first (or ``TopK`` among them with
                ``top_k``).
            feature_layer: a layer of the model, its name, or ``fn(model, x) ->
                features``; needed with ``candidates``.

        Returns:
            ``np.ndarray`` of shape ``(n_test, n_train)`` (a memmap with ``output``),
            or ``TopK`` with arrays of shape ``(n_test, top_k)`` when ``top_k`` is set.
        """
        check_sink_args(top_k, output)
        if relative not in (None, "theta", "loss"):
            raise ValueError(
                'Argument `relative` must be None, "theta" or "loss". Received: '
                f"relative={relative!r}"
            )
        if candidates is not None:
            check_k(candidates, "candidates")
            if feature_layer is None or output is not None:
                raise ValueError(
                    "Argument `candidates` needs `feature_layer` (the layer whose outputs "
                    "define the neighbours) and cannot be combined with `output`. Received: "
                    f"feature_layer={feature_layer!r}, output={output!r}."
                )
        if output is not None:
            return self._explain_to_file(
                output, x_test, y_test, batch_size, verbose, target, relative
            )
        solutions = self.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
        divisors = None if relative is None else self._relative_divisors(relative, verbose)
        if candidates is not None:
            found = score_candidates(
                self, solutions, x_test, batch_size, candidates, feature_layer, divisors
            )
            return found if top_k is None else top_k_of(found, top_k)
        dtype = self.objective.dtype.as_numpy_dtype
        sink = make_sink(int(solutions.shape[1]), self.num_train, dtype, top_k, output)
        return self._score_training(solutions, resolve_verbose(verbose), sink, divisors)

    def _explain_to_file(self, output, x_test, y_test, batch_size, verbose, target, relative):
        """``explain`` into a resumable ``.npy`` (see ``tf_influence.resume``)."""
        self._require_current("explain")
        tests = self._test_data(x_test, y_test, batch_size)
        files = ResumableOutput(
            output,
            self._run_fingerprints(tests, target, relative),
            (tests.num_examples, self.num_train),
            self.objective.dtype.as_numpy_dtype,
        )
        saved = files.load_solutions()
        if saved is None:
            solutions = self.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
            files.save_solutions(solutions.numpy())
        else:
            solutions = tf.constant(saved)
        divisors = None if relative is None else self._relative_divisors(relative, verbose)
        sink = files.open()
        try:
            return self._score_training(
                solutions, resolve_verbose(verbose), sink, divisors, start=files.done
            )
        except BaseException:  # Ctrl-C, an error: keep what is done for the next call
            if sink.scores is not None:
                sink.checkpoint(force=True)
            raise

    def _run_fingerprints(self, tests, target, relative) -> dict[str, str]:
        """Digests of everything a score matrix depends on, for resuming it safely."""
        settings = {
            "solver": solvers_lib.serialize(self.solver),
            "damping": self.damping,
            "hvp": self.hvp,
            "scoring": self._gradients.scoring,
            "jit_compile": self.jit_compile,
            "batch_size": self._data.batch_size,
            "params": self._param_indices(),
            "loss": self.objective.loss_name,
        }
        options = {"relative": relative, "target": _describe_function(target)}

        def digest(value) -> str:
            text = json.dumps(value, sort_keys=True, default=str)
            return hashlib.sha256(text.encode()).hexdigest()

        return {
            "weights": self._weights_fingerprint,
            "training data": self.training_fingerprint(),
            "solver settings": digest(settings),
            "test points": data_fingerprint(tests),
            "options": digest(options),
        }

    def _relative_divisors(self, kind, verbose) -> np.ndarray:
        """``|inv(H) g_j|`` ("theta") or ``sqrt(g_j^T inv(H) g_j)`` ("loss"), cached per fit."""
        if self._relative_cache is None:
            theta, loss, diagnostics = [], [], []
            progress = Progress(
                self._data.num_batches(), resolve_verbose(verbose), "RelatIF normalisers"
            )
            for step, batch in enumerate(self._data.batches(), start=1):
                grads = tf.transpose(self._gradients(batch[0], batch[1]))  # (p, b)
                solution, diag = self.solver.solve(self._operator, grads)
                diagnostics.append(diag)
                theta.append(tf.norm(solution, axis=0).numpy())
                loss.append(tf.reduce_sum(grads * solution, axis=0).numpy())
                progress.update(step)
            progress.done()
            self._warn_if_unconverged(_merge(diagnostics), "training points")
            loss = np.concatenate(loss)
            if np.any(loss < 0):
                raise ValueError(
                    "relative='loss' needs g_j^T inv(H) g_j >= 0, but it is negative at "
                    f"training example {int(np.flatnonzero(loss < 0)[0])}: H + damping*I is "
                    "not positive definite. Add damping in `compile`."
                )
            self._relative_cache = {"theta": np.concatenate(theta), "loss": np.sqrt(loss)}
        divisors = self._relative_cache[kind]
        # An example with zero gradient has zero influence: leave its scores at 0.
        return np.where(divisors > 0, divisors, 1.0)

    @translate_worker_errors
    def self_influence(self, verbose="auto") -> np.ndarray:
        """``grad L(z_j)^T @ inv(H) @ grad L(z_j)`` for every training example.

        Non-negative for a positive-definite H; equals ``-diag(explain(x_train, y_train))``.
        High values flag examples the model finds surprising (often mislabelled).

        Returns:
            ``np.ndarray`` of shape ``(n_train,)``.
        """
        self._require_current("self_influence")
        verbose = resolve_verbose(verbose)
        if self._index is not None:  # low-rank: sum_r (V^T g_j)_r^2 / lambda_r
            values, _ = self.solver.eigenpairs(self._operator)
            result = tf.reduce_sum(self._index**2 / values[None, :], axis=1).numpy()
            return result.astype(self.objective.dtype.as_numpy_dtype)
        values, diagnostics = [], []
        progress = Progress(self._data.num_batches(), verbose, "Self-influence")
        exact = isinstance(self.solver, solvers_lib.Exact)
        for step, batch in enumerate(self._data.batches(), start=1):
            grads = tf.transpose(self._gradients(batch[0], batch[1]))  # (p, b)
            if exact:
                values.append(self.solver.self_products(self._operator, grads).numpy())
            else:
                solution, diag = self.solver.solve(self._operator, grads)
                diagnostics.append(diag)
                values.append(tf.reduce_sum(grads * solution, axis=0).numpy())
            progress.update(step)
        progress.done()
        if diagnostics:
            self.diagnostics = _merge(diagnostics)
            self._warn_if_unconverged(self.diagnostics, "training points")
        result = np.concatenate(values).astype(self.objective.dtype.as_numpy_dtype)
        raise_at_first_nonfinite(
            np.isfinite(result),
            0,
            "Self-influence is NaN or inf at training example {index}. Check that example and "
            "its label, and the damping.",
        )
        return result

    def top_k(
        self,
        x_test,
        y_test=None,
        k: int = 10,
        batch_size=None,
        verbose="auto",
        target=None,
        relative=None,
        candidates: int | None = None,
        feature_layer=None,
    ) -> TopK:
        """The ``k`` most helpful and most harmful training examples per test point.

        Ranks ``I_up,loss`` scores (see ``explain``): helpful = most negative,
        harmful = most positive. Streams over the training data, keeping only the
        top ``k`` per test point. ``k`` larger than the training set is cut to it.

        Returns:
            ``TopK(helpful_indices, helpful_scores, harmful_indices, harmful_scores)``,
            each of shape ``(n_test, k)``.
        """
        check_k(k, "k")
        return self.explain(
            x_test,
            y_test,
            batch_size=batch_size,
            verbose=verbose,
            top_k=k,
            target=target,
            relative=relative,
            candidates=candidates,
            feature_layer=feature_layer,
        )

    # -- perturbation ------------------------------------------------------------------
    @translate_worker_errors
    def explain_perturbation(
        self, x_train_indices, x_test, y_test=None, batch_size=None, verbose="auto", target=None
    ):
        """How each test loss responds to moving chosen training inputs (I_pert,loss).

        ``result[i, r] = -grad L(z_test_i)^T @ inv(H) @ grad_x grad_theta L(z_j)`` for
        ``j = x_train_indices[r]``, shaped like ``x_j``: perturbing training input
        ``x_j`` by a small ``delta`` (keeping its label) and refitting changes test
        loss ``i`` by about ``sum(result[i, r] * delta) / n_train``. Its sign shows
        which pixels/features of a training example to change to raise (or lower)
        a test loss: the training-set attack of Koh & Liang (2017, section 5.2).

        Args:
            x_train_indices: training indices (as in ``fit``'s order) to perturb.
            x_test, y_test: test points (``y_test=None``: the predicted class).
            batch_size, verbose: as in ``explain``.
            target: optional ``fn(model, x)`` replacing the test loss (see ``explain``).

        Returns:
            ``np.ndarray`` of shape ``(n_test, len(x_train_indices), *input_shape)``
            (a matching dict/tuple of them for several inputs).
        """
        return explain_perturbation(
            self, x_train_indices, x_test, y_test, batch_size, verbose, target
        )

    # -- groups ------------------------------------------------------------------------
    @translate_worker_errors
    def predict_removal(
        self,
        groups,
        x_test,
        y_test=None,
        order: int = 1,
        renormalize: bool = False,
        batch_size=None,
        verbose="auto",
        target=None,
    ) -> np.ndarray:
        """Predicted change of each test loss when each group is removed and the model refit.

        For a group ``U`` of ``m`` of the ``n`` training examples (see
        ``tf_influence.groups`` for the derivation), the parameters move by

            order 1:  d1 = inv(H) [(1/n) sum_{j in U} grad L(z_j)]
            order 2:  d2 = d1 + inv(H) [(1/n) sum_{j in U} hessian(L(z_j))] d1

        and test loss ``i`` changes by ``grad L(z_test_i)^T d``. Order 1 is the sum
        of single-point influences (Koh et al. 2019): for a group of one it is
        ``-explain(...)[:, j] / n``. Order 2 adds the correction of Basu, You & Feizi
        (2020) for interactions inside the group, which matters for large groups.
        ``renormalize=True`` also accounts for ``model.fit`` averaging the loss over the
        ``n - m`` remaining examples (which weighs ``Omega`` by ``n / (n - m)`` more):
        it adds ``(m/n) grad Omega`` to the bracket of order 1 and
        ``(m/n) hessian(Omega)`` to that of order 2.

        Args:
            groups: a list of groups, each a list/array of training indices (as in
                ``fit``'s order); groups may overlap.
            x_test, y_test: test points (``y_test=None``: the predicted class).
            order: 1 or 2.
            renormalize: see above; False predicts refitting with the removed
                examples' weights set to zero and everything else unchanged.
            batch_size: test points per batch.
            verbose: "auto", 0, 1 or 2.
            target: optional ``fn(model, x)``, predicted instead of the test loss
                (see ``explain``).

        Returns:
            ``np.ndarray`` of shape ``(n_test, n_groups)``: positive means removing
            the group raises that test loss (or ``target``).

        References:
            Koh, Ang, Teo & Liang, "On the Accuracy of Influence Functions for
            Measuring Group Effects", NeurIPS 2019. Basu, You & Feizi, "On
            Second-Order Group Influence Functions for Black-Box Predictions",
            ICML 2020.
        """
        return predict_removal(
            self, groups, x_test, y_test, order, renormalize, batch_size, verbose, target
        )

    # -- serving -----------------------------------------------------------------------
    def export(self, path, top_k: int = 10, include_scores: bool = False) -> None:
        """Writes a SavedModel for TF Serving: the model plus an ``explain`` signature.

        Needs ``solver=tfi.solvers.Arnoldi(...)``: the SavedModel stores the model's
        variables and the low-rank influence index (eigenvectors, eigenvalues and
        projected training gradients), never a raw training example. Signatures:
        ``serving_default`` (the model's output), ``explain`` (inputs as the model's
        plus ``labels``; outputs ``top_helpful_indices``, ``top_helpful_scores``,
        ``top_harmful_indices``, ``top_harmful_scores`` of shape ``(batch, top_k)``,
        and ``scores`` of shape ``(batch, n_train)`` with ``include_scores=True``)
        and, for classification losses, ``explain_prediction`` (no labels: the
        predicted class). Scores are those of ``explain`` with this solver.

        Args:
            path: a new or empty directory, e.g. ``models/name/1`` for TF Serving.
            top_k: examples per list.
            include_scores: also output every training example's score.
        """
        export_model(self, path, top_k, include_scores)

    # -- saved state -------------------------------------------------------------------
    def _param_indices(self) -> list[int]:
        position = {id(v): i for i, v in enumerate(self.model.trainable_variables)}
        return [position[id(v)] for v in self.objective.variables]

    def save(self, path, include_data: bool = False) -> None:
        """Writes the fitted state to one ``.npz`` file (no pickle), atomically.

        Saved: the solver and its config, damping, hvp, scoring, jit_compile, the
        batch size, which parameters, the cached inverse-HVP vectors (so explaining
        the same test points after ``load`` does not solve again), the Exact
        solver's Cholesky factor, fingerprints of the weights and the training data,
        and, only if asked (``include_data=True``, arrays only), the training data. The
        Keras model is not saved: save it with ``model.save`` as usual.

        Args:
            path: file to write (replaced if it exists).
            include_data: store the training arrays, so that ``load(path, model)``
                needs no data. A ``tf.data.Dataset`` is never stored: pass it to
                ``load`` again.
        """
        save_state(self, path, include_data)

    @classmethod
    def load(cls, path, model, x=None, y=None, loss=None, verbose="auto") -> InfluenceModel:
        """Rebuilds an ``InfluenceModel`` saved by ``save``, for ``model``.

        Args:
            path: the file ``save`` wrote.
            model: the Keras model the state was computed for (same weights).
            x, y: the training data, needed when it was not stored (a dataset, or
                ``include_data=False``); if given, it must be the data of ``fit``.
            loss: the loss, if the model was not compiled with the same one.
            verbose: "auto", 0, 1 or 2.

        Raises:
            ValueError: the file is not a saved state; the model's weights, the
                parameters, the loss or the training data differ from the ones the
                state was computed for.
        """
        return load_state(cls, path, model, x, y, loss, verbose)


def _is_dataset(x) -> bool:
    return isinstance(x, tf.data.Dataset)


def _check_target(target, objective, x):
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


def _describe_function(fn) -> str | None:
    """A description of a ``target`` function that is the same in another process."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    body = "" if code is None else hashlib.sha256(code.co_code + repr(code.co_consts).encode())
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}:" + (
        body.hexdigest() if body else ""
    )


def _merge(parts: list[Diagnostics]) -> Diagnostics | None:
    if not parts:
        return None
    return Diagnostics(
        solver=parts[0].solver,
        iterations=max(p.iterations for p in parts),
        residual_norm=np.concatenate([p.residual_norm for p in parts]),
        converged=np.concatenate([p.converged for p in parts]),
        info=parts[-1].info,
    )
