"""``InfluenceModel``'s analyses beyond a score matrix, and its saved forms.

``inverse_hvp_tests``, ``self_influence``, ``top_k`` (through ``explain``),
``predict_removal`` (groups), ``explain_perturbation``, ``export`` (TF Serving)
and ``save``. ``InfluenceModel`` inherits them, as a Keras ``Model`` inherits
``fit`` from its trainer; each checks its arguments and hands the fitted state to
the module that does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._progress import resolve_verbose
from tf_influence.distribute import translate_worker_errors
from tf_influence.engine.state import FittedState
from tf_influence.export import export_model
from tf_influence.groups import predict_removal
from tf_influence.outputs import TopK, check_k
from tf_influence.perturbation import explain_perturbation
from tf_influence.saving import save_state


class Analyses:
    """Methods of ``InfluenceModel`` beyond ``explain`` (see ``InfluenceModel``)."""

    def _current(self, what: str) -> FittedState:  # InfluenceModel's
        raise NotImplementedError

    def get_compile_config(self) -> dict[str, Any]:  # InfluenceModel's
        raise NotImplementedError

    def explain(self, *args: Any, **kwargs: Any) -> Any:  # InfluenceModel's
        raise NotImplementedError

    @translate_worker_errors
    def inverse_hvp_tests(
        self,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        target: Callable | None = None,
    ) -> tf.Tensor:
        """``inv(H) @ grad L(z_test_i)`` for every test point, shape ``(num_params, n_test)``.

        ``y_test=None`` uses the model's predicted class as the target. With
        ``target=fn``, ``grad fn(model, x_test_i)`` replaces the loss gradient (see
        ``explain``). Solutions are cached per test batch (up to 512 MiB), so
        explaining the same test points again does not solve again; the cache is
        dropped when the weights change, and shared with other ``InfluenceModel``s
        on the same model, configuration, data, damping and weights.
        """
        state = self._current("explain")
        return state.inverse_hvp_tests(x_test, y_test, batch_size, resolve_verbose(verbose), target)

    @translate_worker_errors
    def self_influence(self, verbose: str | int = "auto") -> np.ndarray:
        """``grad L(z_j)^T @ inv(H) @ grad L(z_j)`` for every training example.

        Non-negative for a positive-definite H; equals ``-diag(explain(x_train, y_train))``.
        High values flag examples the model finds surprising (often mislabelled).

        Returns:
            ``np.ndarray`` of shape ``(n_train,)``.
        """
        return self._current("self_influence").self_influence(resolve_verbose(verbose))

    def top_k(
        self,
        x_test: Any,
        y_test: Any = None,
        k: int = 10,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        target: Callable | None = None,
        relative: str | None = None,
        candidates: int | None = None,
        feature_layer: Any = None,
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

    @translate_worker_errors
    def explain_perturbation(
        self,
        x_train_indices: Sequence[int] | np.ndarray,
        x_test: Any,
        y_test: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        target: Callable | None = None,
    ) -> np.ndarray | dict[str, np.ndarray] | tuple[np.ndarray, ...]:
        """How each test loss responds to moving chosen training inputs (I_pert,loss).

        ``result[i, r] = -grad L(z_test_i)^T @ inv(H) @ grad_x grad_theta L(z_j)`` for
        ``j = x_train_indices[r]``, shaped like ``x_j``: perturbing training input
        ``x_j`` by a small ``delta`` (keeping its label) and refitting changes test
        loss ``i`` by about ``sum(result[i, r] * delta) / n_train``. Its sign shows
        which pixels/features of a training example to change to raise (or lower)
        a test loss: the training-set attack of Koh & Liang (2017, section 5.2).

        Args:
            x_train_indices: training indices (as in ``fit``'s order) to perturb.
            x_test: test inputs.
            y_test: test targets (None: the predicted class).
            batch_size: test points per batch, as in ``explain``.
            verbose: "auto", 0, 1 or 2.
            target: optional ``fn(model, x)`` replacing the test loss (see ``explain``).

        Returns:
            ``np.ndarray`` of shape ``(n_test, len(x_train_indices), *input_shape)``
            (a matching dict/tuple of them for several inputs).
        """
        state = self._current("explain_perturbation")
        return explain_perturbation(
            state, x_train_indices, x_test, y_test, batch_size, resolve_verbose(verbose), target
        )

    @translate_worker_errors
    def predict_removal(
        self,
        groups: Sequence[Sequence[int] | np.ndarray],
        x_test: Any,
        y_test: Any = None,
        order: int = 1,
        renormalize: bool = False,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        target: Callable | None = None,
    ) -> np.ndarray:
        """Predicted change of each test loss when each group is removed and the model refit.

        Order 1 is the sum of single-point influences (Koh et al. 2019): for a
        group of one it is ``-explain(...)[:, j] / n``. Order 2 adds the correction
        of Basu, You & Feizi (2020) for interactions inside the group, which matters
        for large groups. ``tf_influence.groups`` gives the derivation and what
        ``renormalize`` adds.

        Args:
            groups: a list of groups, each a list/array of training indices (as in
                ``fit``'s order); groups may overlap.
            x_test: test inputs.
            y_test: test targets (None: the predicted class).
            order: 1 or 2.
            renormalize: also account for ``model.fit`` averaging over the ``n - m``
                remaining examples; False predicts refitting with the removed
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
        state = self._current("predict_removal")
        resolve_verbose(verbose)  # checked; the work is a few passes, no bar
        return predict_removal(
            state, groups, x_test, y_test, order, renormalize, batch_size, target
        )

    def export(self, path: str, top_k: int = 10, include_scores: bool = False) -> None:
        """Writes a SavedModel for TF Serving: the model plus an ``explain`` signature.

        Needs a solver that keeps an influence index (``tfi.solvers.Projected(...)``,
        ``tfi.solvers.Arnoldi(...)``, or any solver whose ``index`` or ``low_rank``
        hook returns one): the SavedModel stores the model's variables and the index
        (the projected training gradients and the inverse in their coordinates, with
        the basis of a low-rank solver), never a raw training example, plus the
        settings record (``get_compile_config``, as ``assets.extra/compile_config.json``).
        An ensemble (``Projected(checkpoints=...)``) is not served.
        Signatures: ``serving_default``
        (the model's output), ``explain`` (inputs as the model's plus ``labels``;
        outputs ``top_helpful_indices``, ``top_helpful_scores``,
        ``top_harmful_indices``, ``top_harmful_scores`` of shape ``(batch, top_k)``,
        and ``scores`` of shape ``(batch, n_train)`` with ``include_scores=True``)
        and, for classification losses, ``explain_prediction`` (no labels: the
        predicted class). Scores are those of ``explain`` with this solver.

        Args:
            path: a new or empty directory, e.g. ``models/name/1`` for TF Serving.
            top_k: examples per list.
            include_scores: also output every training example's score.
        """
        export_model(
            self._current("export"), self.get_compile_config(), path, top_k, include_scores
        )

    def save(self, path: str, include_data: bool = False) -> None:
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
        save_state(self._current("save"), self.get_compile_config(), path, include_data)
