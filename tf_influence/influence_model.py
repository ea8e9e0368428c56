"""``InfluenceModel``: the Keras-style front door (``compile`` / ``fit`` / ``explain``).

It checks arguments and delegates: the settings record is ``engine.settings``,
everything ``fit`` prepares lives in ``engine.state.FittedState``, and the
features (groups, neighbours, perturbation, export, saving, resume) are their
own modules working through the fitted state's public methods. The methods
beyond a score matrix (``predict_removal``, ``explain_perturbation``, ``export``,
``save``) are in ``tf_influence.analyses``, as Keras keeps ``fit`` in its trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_influence import solvers as solvers_lib
from tf_influence._progress import resolve_verbose
from tf_influence.analyses import Analyses
from tf_influence.distribute import resolve_strategy, translate_worker_errors
from tf_influence.engine.checks import check_explain_options
from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData
from tf_influence.engine.objective import LossLike, Objective, ParamsLike
from tf_influence.engine.settings import Settings, check_damping
from tf_influence.engine.state import FittedState
from tf_influence.neighbors import Candidates, score_candidates, top_k_of
from tf_influence.outputs import TopK, make_sink
from tf_influence.resume import describe_function, explain_to_file
from tf_influence.saving import read_state
from tf_influence.solvers.base import Diagnostics

__all__ = ["InfluenceModel", "check_damping"]


class InfluenceModel(Analyses):
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
        loss: a keras loss object, a loss name or a callable ``(y_true, y_pred)``,
            or a list / dict of them, one per output (None for an output without
            a loss), as ``model.compile`` takes; None uses the model's compiled loss
            (and its ``loss_weights``).
        params: None for all trainable weights, or layers / layer names / variables
            (the influence is then taken with the other weights held fixed).
        strategy: a ``tf.distribute.Strategy`` to run on, or None for the one the
            model was built under (``model.distribute_strategy``), as ``model.fit``
            does. Training-set products and scores are then sharded over its
            replicas and all-reduced (see ``tf_influence.distribute``).
        loss_weights: weights of the outputs' losses with a ``loss=`` list or dict
            (a float, list or dict, as ``model.compile`` takes).

    Example:
        >>> im = tfi.InfluenceModel(model)
        >>> im.compile(solver="cg", damping=1e-3)
        >>> im.fit(x_train, y_train)
        >>> scores = im.explain(x_test[:5], y_test[:5])     # (5, n_train)

    References:
        Koh & Liang, "Understanding Black-box Predictions via Influence Functions",
        ICML 2017.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: LossLike | None = None,
        params: ParamsLike | None = None,
        strategy: tf.distribute.Strategy | None = None,
        loss_weights: Any = None,
    ):
        self.model = model
        self.strategy = resolve_strategy(model, strategy)
        self.objective = Objective(model, loss=loss, params=params, loss_weights=loss_weights)
        self.settings = Settings()
        self._state: FittedState | None = None

    # -- configuration ----------------------------------------------------------------
    def compile(
        self,
        solver: str | solvers_lib.Solver = "cg",
        damping: float | str = "auto",
        hvp: str = "auto",
        scoring: str = "auto",
        jit_compile: bool = False,
        curvature: str | None = None,
    ) -> None:
        """Chooses the inverse-HVP solver, the curvature, the damping and how products are formed.

        Optional: without it, ``fit`` uses ``solver="cg", damping="auto",
        curvature="gauss_newton"``, which answers on a network in the middle of
        training (its Hessian is indefinite) with no damping to tune. A damping
        given as a number keeps the Hessian, the classical influence function
        (``curvature=None`` resolves to it). A model whose outputs are linear in its
        parameters (linear or logistic regression) has a Gauss-Newton matrix equal
        to its Hessian, so it gets the Hessian either way; pass ``damping=0.0``
        there for the undamped influence. The measurements behind these defaults
        are in ``docs/solvers.md`` ("The defaults").

        Args:
            solver: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"`` or a
                ``tfi.solvers`` instance.
            damping: non-negative number added to the curvature's diagonal
                (``H + damping*I``); needed when H is not positive definite
                (non-convex models, or parameters the loss does not constrain).
                ``"auto"`` (the default) chooses it at ``fit`` from the curvature's
                spectrum: ten times the mean eigenvalue, or for an indefinite
                Hessian ``-2 * smallest + 10 * mean``, estimated cheaply (see
                ``tf_influence.engine.damping``); ``damping`` then returns the float
                used.
            hvp: Hessian-vector products by ``"reverse_over_reverse"`` (nested
                tapes) or ``"forward_over_reverse"``; ``"auto"`` takes nested tapes
                (the same speed in our benchmarks, and twice as fast to trace).
            scoring: training scores by ``"jvp"`` (forward mode, no gradients kept)
                or ``"jacobian"`` (vectorised per-example gradients); ``"auto"``
                picks by the number of test points.
            jit_compile: compile the per-batch products and gradients with XLA, as
                ``keras.Model.compile(jit_compile=True)`` does.
            curvature: ``"hessian"`` (the exact Hessian of the training objective)
                or ``"gauss_newton"``: the generalised Gauss-Newton matrix
                ``(1/n) sum_j J_j^T H_L,j J_j + hessian(Omega)`` (``J_j`` the
                Jacobian of the model's outputs, ``H_L,j`` the loss Hessian on
                them), positive semi-definite for a loss convex in the outputs and
                equal to the Hessian for models whose outputs are linear in the
                parameters; the choice for networks in the middle of training,
                whose Hessian is indefinite. None (the default): ``"gauss_newton"``
                with ``damping="auto"``, ``"hessian"`` with a number.

        Raises:
            ValueError: an unknown ``solver``, ``hvp``, ``scoring`` or ``curvature``
                name, or a negative ``damping``.
        """
        self.settings = Settings(solver, damping, hvp, scoring, jit_compile, curvature)
        if self._state is not None:
            self._attach(self._state.data, 0, self._state.known_fingerprint)

    def get_compile_config(self) -> dict[str, Any]:
        """The arguments of ``compile`` as plain JSON values, as in Keras.

        The one settings record: ``save`` stores it, a resumed ``explain(output=)``
        fingerprints it and ``export`` writes it into the SavedModel.

        Returns:
            ``{"solver": {"class_name", "config"}, "damping", "hvp", "scoring",
            "jit_compile"}``, and ``"curvature"`` when it is not ``"hessian"``.
        """
        return self.settings.to_config()

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compiles with the settings ``get_compile_config`` returned (another model's too).

        Args:
            config: the dict from ``get_compile_config``.
        """
        settings = Settings.from_config(config)
        self.compile(
            settings.solver,
            settings.damping,
            settings.hvp,
            settings.scoring,
            settings.jit_compile,
            settings.curvature,
        )

    @property
    def solver(self) -> solvers_lib.Solver:
        """The inverse-HVP solver of ``compile``."""
        return self.settings.solver

    @property
    def damping(self) -> float | str:
        """The damping added to the curvature's diagonal.

        After ``fit``, the float used (``damping="auto"`` resolved); before, what
        ``compile`` received.
        """
        return self.settings.damping if self._state is None else self._state.damping

    @property
    def curvature(self) -> str:
        """The curvature of ``compile``: ``"hessian"`` or ``"gauss_newton"``."""
        return self.settings.curvature

    @property
    def hvp(self) -> str:
        """How Hessian-vector products are formed (``compile``'s ``hvp``)."""
        return self.settings.hvp

    @property
    def jit_compile(self) -> bool:
        """Whether per-batch functions are compiled with XLA."""
        return self.settings.jit_compile

    @property
    def num_params(self) -> int:
        """Number of parameters influence is computed over."""
        return self.objective.num_params

    @property
    def num_train(self) -> int:
        """Number of training examples seen by ``fit`` (0 before it)."""
        return self._state.num_train if self._state is not None else 0

    @property
    def state(self) -> FittedState:
        """The ``FittedState`` of ``fit``: data, curvature, gradients, caches, fingerprints."""
        self._require_fit("state")
        return self._state

    @property
    def operator(self) -> HessianOperator:
        """The ``v -> (H + damping*I) v`` operator over the training data."""
        return self.state.operator

    @property
    def diagnostics(self) -> Diagnostics | None:
        """The ``Diagnostics`` of the last solve (None before one)."""
        return None if self._state is None else self._state.diagnostics

    # -- fit ---------------------------------------------------------------------------
    @translate_worker_errors
    def fit(
        self,
        x: Any,
        y: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        sample_weight: Any = None,
        class_weight: dict[int, float] | None = None,
    ) -> InfluenceModel:
        """Takes the training data and prepares the curvature.

        With weights the objective is ``(1/n) sum_j w_j L_j + Omega``, as
        ``model.fit`` minimises it, and training example j enters every score as
        ``w_j L_j``: ``scores[i, j] = -grad L(z_test_i)^T @ inv(H) @ (w_j grad L(z_j))``
        (see docs/keras.md, "Several outputs, sample and class weights").

        Args:
            x: training inputs (array, tensor, list/dict of them) or a batched
                ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` in a fixed
                order; column ``j`` of every score matrix is its ``j``-th example.
            y: training targets (None when ``x`` is a dataset); a list or dict (keyed by
                output name) for a model with several outputs.
            batch_size: examples per batch for Hessian-vector products and gradients
                (default 32); must be None for a dataset.
            verbose: "auto", 0, 1 or 2, as in Keras.
            sample_weight: ``(n,)`` non-negative weights ``w_j`` of the training
                examples, as in ``keras.Model.fit`` (None: all 1).
            class_weight: ``{class index: weight}``: ``w_j`` is the weight of example
                j's class (1 for classes not listed), as in ``keras.Model.fit``.

        Returns:
            self, so that ``im.fit(x, y).explain(...)`` chains.
        """
        verbose = resolve_verbose(verbose)
        data = ExampleData(x, y, batch_size, "x", "y", True, sample_weight, class_weight)
        return self._attach(data, verbose)

    def _attach(self, data, verbose, fingerprint=None, solver_state=None) -> InfluenceModel:
        """The one path to a fitted state (``fit``, ``load``, ``compile`` after ``fit``)."""
        self._state = None  # a failed check leaves the model unfitted, never half-fitted
        self._state = FittedState(
            self.objective, self.settings, data, self.strategy, verbose, fingerprint, solver_state
        )
        return self

    def training_fingerprint(self) -> str:
        """sha256 of the training examples of ``fit``, in order (one pass, then cached)."""
        return self.state.training_fingerprint()

    def _require_fit(self, what: str) -> None:
        if self._state is None:
            raise RuntimeError(
                f"`{what}` needs the training data. Call `fit(x_train, y_train)` on the "
                "InfluenceModel first."
            )

    def _current(self, what: str) -> FittedState:
        """The fitted state, refusing weights that changed since ``fit``."""
        self._require_fit(what)
        self._state.require_current(what)
        return self._state

    # -- solves and scores -------------------------------------------------------------
    @translate_worker_errors
    def explain(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        top_k: int | None = None,
        output: str | None = None,
        target: Callable | None = None,
        relative: str | None = None,
        candidates: int | None = None,
        feature_layer: Any = None,
        per_layer: bool = False,
    ) -> np.ndarray | TopK | Candidates | dict[str, np.ndarray]:
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
            per_layer: return ``{layer name: (n_test, n_train) scores}``, each
                layer's part of the scores (they sum to the matrix ``explain``
                returns), for solvers with layers (``KFAC``, ``EKFAC``).

        Returns:
            ``np.ndarray`` of shape ``(n_test, n_train)`` (a memmap with ``output``),
            or ``TopK`` with arrays of shape ``(n_test, top_k)`` when ``top_k`` is set.
        """
        check_explain_options(top_k, output, relative, candidates, feature_layer, per_layer)
        state = self._current("explain")
        verbose = resolve_verbose(verbose)
        if per_layer:
            return state.explain_per_layer(x_test, y_test, batch_size, verbose, target)
        if output is not None:
            options = {"relative": relative, "target": describe_function(target)}
            return explain_to_file(
                state, output, x_test, y_test, batch_size, verbose, target, relative, options
            )
        if candidates is not None:
            solutions = state.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
            divisors = None if relative is None else state.relative_divisors(relative, verbose)
            found = score_candidates(
                state,
                self.model,
                solutions,
                x_test,
                batch_size,
                candidates,
                feature_layer,
                divisors,
            )
            return found if top_k is None else top_k_of(found, top_k)
        queries = state.test_queries(x_test, y_test, batch_size, verbose, target)
        divisors = None if relative is None else state.relative_divisors(relative, verbose)
        dtype = self.objective.dtype.as_numpy_dtype
        sink = make_sink(int(queries.shape[1]), state.num_train, dtype, top_k, output)
        return state.score_training(queries, verbose, sink, divisors)

    # -- saved state ------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str,
        model: keras.Model,
        x: Any = None,
        y: Any = None,
        loss: LossLike | None = None,
        verbose: str | int = "auto",
    ) -> InfluenceModel:
        """Rebuilds an ``InfluenceModel`` saved by ``save``, for ``model``.

        Args:
            path: the file ``save`` wrote.
            model: the Keras model the state was computed for (same weights).
            x: the training inputs, needed when they were not stored (a dataset,
                or ``include_data=False``); if given, they must be those of ``fit``.
            y: the training targets, with ``x``.
            loss: the loss, if the model was not compiled with the same one.
            verbose: "auto", 0, 1 or 2.

        Raises:
            ValueError: the file is not a saved state; the model's weights, the
                parameters, the loss or the training data differ from the ones the
                state was computed for.
        """
        saved = read_state(path)
        im = cls(model, loss=loss, params=saved.variables(model))
        saved.check_objective(im.objective)
        im.compile_from_config(saved.compile_config)
        data = saved.training_data(x, y)
        im._attach(data, resolve_verbose(verbose), saved.data_fingerprint, saved.solver_state)
        saved.restore_solutions(im.state)
        return im
