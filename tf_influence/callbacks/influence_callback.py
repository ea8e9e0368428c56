"""``InfluenceCallback``: influence analysis attached to ``model.fit``."""

from __future__ import annotations

import os
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tf_influence import solvers as solvers_lib
from tf_influence._validation import check_positive_int
from tf_influence.callbacks._checks import check_every_n_epochs
from tf_influence.engine.data import ExampleData
from tf_influence.engine.objective import LossLike, ParamsLike
from tf_influence.engine.settings import check_damping, resolve_curvature
from tf_influence.influence_model import InfluenceModel
from tf_influence.solvers.base import CurvatureError


class InfluenceCallback(keras.callbacks.Callback):
    """Fits an ``InfluenceModel`` at the end of training (and every N epochs).

    On each analysed epoch it computes the self-influence of every training
    example, ``grad L(z_j)^T @ inv(H) @ grad L(z_j)``, and records the ``top_k``
    highest (the most suspicious: often mislabelled) in ``history`` and, with
    ``log_dir``, as TensorBoard summaries. After ``model.fit``,
    ``influence_model`` is fitted on the final weights, ready for ``explain``.
    Only epoch-level hooks are used, so Keras's asynchronous dispatch is kept.

    Args:
        x: the training inputs, as for ``InfluenceModel.fit`` (the same examples
            and order as given to ``model.fit``, so indices match).
        y: the training targets (None when ``x`` is a dataset).
        solver: as for ``InfluenceModel.compile``.
        damping: as for ``InfluenceModel.compile``: ``"auto"`` (the default) is
            chosen again at every analysis, from the curvature at that epoch.
        every_n_epochs: also analyse at epochs N, 2N, ... (1-based); None: only
            at the end of training.
        top_k: how many suspicious indices to record per analysis.
        log_dir: if given, write ``tf.summary`` histograms/scalars/text there
            (the same directory as ``keras.callbacks.TensorBoard`` works).
        batch_size: batch size of the analysis (default 32).
        loss: as for ``InfluenceModel``.
        params: as for ``InfluenceModel``.
        loss_weights: as for ``InfluenceModel``.
        verbose: 0 (silent) or 1 (one line per analysis).
        curvature: ``"hessian"`` or ``"gauss_newton"``, as for
            ``InfluenceModel.compile``; None (the default) takes ``"gauss_newton"``
            with ``damping="auto"`` (so a model in the middle of training is
            analysed with no damping to tune) and ``"hessian"`` with a number.
        sample_weight: the ``sample_weight`` given to ``model.fit``, as for
            ``InfluenceModel.fit`` (``(n,)`` weights; None: all 1).
        class_weight: the ``class_weight`` given to ``model.fit``, as for
            ``InfluenceModel.fit``.

    Attributes:
        influence_model: the ``InfluenceModel`` of the last analysis (None before).
        self_influence_: ``(n_train,)`` self-influence of the last analysis.
        history: dict of lists, one entry per analysis: ``epoch`` (1-based),
            ``suspicious_indices`` and ``suspicious_scores`` (``(top_k,)`` arrays,
            highest first), ``seconds``, and ``error`` (None, or the message of a
            ``CurvatureError``, which is warned about instead of stopping training).

    Example:
        >>> cb = tfi.callbacks.InfluenceCallback(x_train, y_train)
        >>> model.fit(x_train, y_train, epochs=10, callbacks=[cb])
        >>> cb.history["suspicious_indices"][-1]      # likely mislabelled
        >>> cb.influence_model.explain(x_test[:3], y_test[:3])
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        solver: str | solvers_lib.Solver = "cg",
        damping: float | str = "auto",
        every_n_epochs: int | None = None,
        top_k: int = 10,
        log_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        loss: LossLike | None = None,
        params: ParamsLike | None = None,
        verbose: int = 0,
        curvature: str | None = None,
        sample_weight: Any = None,
        class_weight: dict[int, float] | None = None,
        loss_weights: Any = None,
    ):
        super().__init__()
        # Check everything now, before training starts, so no work is lost later.
        # A clear error now, before training starts, rather than at the first analysis.
        data = ExampleData(x, y, batch_size, "x", "y", True, sample_weight, class_weight)
        self._data_batch_size = data.batch_size
        self._x, self._y, self._batch_size = x, y, batch_size
        self._weights = {"sample_weight": sample_weight, "class_weight": class_weight}
        self.solver = solvers_lib.get(solver)
        self.damping = check_damping(damping)
        self.curvature = resolve_curvature(curvature, self.damping, self.solver)
        self.every_n_epochs = check_every_n_epochs(every_n_epochs)
        self.top_k = check_positive_int("top_k", top_k)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(
                f"Argument `log_dir` must be a path or None. Received: log_dir={log_dir!r}"
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        if verbose not in (0, 1):
            raise ValueError(f"Argument `verbose` must be 0 or 1. Received: verbose={verbose!r}")
        self.verbose = verbose
        self._loss = loss
        self._loss_weights = loss_weights
        self._params = params  # `params` is Keras's own attribute of callbacks
        self.influence_model: InfluenceModel | None = None
        self.self_influence_: np.ndarray | None = None
        self.history: dict[str, list] = _empty_history()
        self._writer = None
        self._im: InfluenceModel | None = None
        self._last_epoch = 0
        self._analysed_epoch = None

    def get_config(self) -> dict[str, Any]:
        """Everything but the data (and ``loss``/``params``, which may be objects)."""
        return {
            "solver": solvers_lib.serialize(self.solver),
            "damping": self.damping,
            "every_n_epochs": self.every_n_epochs,
            "top_k": self.top_k,
            "log_dir": self.log_dir,
            "batch_size": self._data_batch_size,
            "verbose": self.verbose,
            "curvature": self.curvature,
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        x: Any = None,
        y: Any = None,
        loss: LossLike | None = None,
        params: ParamsLike | None = None,
        sample_weight: Any = None,
        class_weight: dict[int, float] | None = None,
        loss_weights: Any = None,
    ) -> InfluenceCallback:
        """Rebuilds the callback; the training data (``x``, ``y``, weights) must be given again."""
        if x is None:
            raise ValueError(
                "InfluenceCallback.from_config needs the training data. Received: x=None. "
                "Call `InfluenceCallback.from_config(config, x_train, y_train)`."
            )
        config = dict(config)
        config["solver"] = solvers_lib.deserialize(config["solver"])
        return cls(
            x,
            y,
            loss=loss,
            params=params,
            sample_weight=sample_weight,
            class_weight=class_weight,
            loss_weights=loss_weights,
            **config,
        )

    # -- hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._analysed_epoch = None
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "influence"))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._last_epoch = epoch + 1
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._analyse(epoch + 1)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._analysed_epoch != self._last_epoch:
            self._analyse(self._last_epoch)
        if self._writer is not None:
            self._writer.flush()

    # -- analysis -----------------------------------------------------------------------
    def _analyse(self, epoch: int) -> None:
        start = tf.timestamp()
        entry = {"epoch": epoch, "suspicious_indices": None, "suspicious_scores": None}
        entry["error"] = None
        try:
            im = self._influence_model()
            values = im.self_influence(verbose=0)
        except CurvatureError as error:
            entry["error"] = str(error)
            warnings.warn(
                f"InfluenceCallback: no influence analysis at epoch {epoch}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            self.influence_model = None
        else:
            order = np.argsort(-values, kind="stable")[: self.top_k]
            entry["suspicious_indices"] = order
            entry["suspicious_scores"] = values[order]
            self.influence_model = im
            self.self_influence_ = values
            self._log(epoch, values, order)
        entry["seconds"] = float(tf.timestamp() - start)
        for key, value in entry.items():
            self.history[key].append(value)
        self._analysed_epoch = epoch
        if self.verbose:
            found = entry["suspicious_indices"]
            print(
                f"InfluenceCallback epoch {epoch}: "
                + (f"most suspicious {found.tolist()}" if found is not None else "failed")
                + f" ({entry['seconds']:.1f} s)"
            )

    def _influence_model(self) -> InfluenceModel:
        """The InfluenceModel fitted on the current weights (traced functions kept)."""
        if self._im is None or self._im.model is not self.model or not self._im.num_train:
            im = InfluenceModel(
                self.model, loss=self._loss, params=self._params, loss_weights=self._loss_weights
            )
            im.compile(solver=self.solver, damping=self.damping, curvature=self.curvature)
            self._im = im
            im.fit(self._x, self._y, batch_size=self._batch_size, verbose=0, **self._weights)
        else:
            self._im.state.refresh()
        return self._im

    def _log(self, epoch: int, values: np.ndarray, order: np.ndarray) -> None:
        if self._writer is None:
            return
        rows = "\n".join(f"| {i} | {values[i]:.4g} |" for i in order)
        with self._writer.as_default(step=epoch):
            _write("self_influence", _histogram(values), "histograms")
            _write("self_influence/max", float(values.max()), "scalars")
            _write("self_influence/mean", float(values.mean()), "scalars")
            _write("suspicious_examples", f"| index | self-influence |\n|---|---|\n{rows}", "text")


def _write(tag: str, value: Any, plugin: str) -> None:
    """``tf.summary.write`` with the metadata TensorBoard's plugins read.

    The same records ``tf.summary.scalar`` / ``histogram`` / ``text`` write, without
    needing the ``tensorboard`` package installed to write them.
    """
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    )
    tf.summary.write(tag, tf.constant(value), metadata=metadata)


def _histogram(values: np.ndarray, bins: int = 30) -> np.ndarray:
    """``(bins, 3)`` rows ``[left, right, count]``, TensorBoard's histogram layout."""
    counts, edges = np.histogram(values, bins=bins)
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def _empty_history() -> dict[str, list]:
    return {
        "epoch": [],
        "suspicious_indices": [],
        "suspicious_scores": [],
        "seconds": [],
        "error": [],
    }
