"""Exporting an ``InfluenceModel`` as a SavedModel that TF Serving can load.

The SavedModel holds the Keras model's variables and, for scoring, only the
influence index of a solver that keeps one (``Solver.index``): the inverse in the
index's coordinates (``r`` weights of a low-rank eigenbasis, or the ``(dim, dim)``
Cholesky factor of the matrix it inverts, applied by triangular solves), the
projected training gradients ``P^T grad L(z_j)`` (n_train x dim),
and what the projection needs (the ``(p, r)`` basis ``V`` of ``Arnoldi``; the
small seeded factors of ``Projected``, whose dense part is generated from its
seed inside the graph), plus the settings record
(``InfluenceModel.get_compile_config``) in ``assets.extra/compile_config.json``.
No raw training example is stored. Signatures:

* ``serving_default``: the model's own prediction, ``model(x, training=False)``.
* ``explain``: inputs as the model's plus ``labels``; outputs
  ``top_helpful_indices``, ``top_helpful_scores``, ``top_harmful_indices``,
  ``top_harmful_scores`` (each ``(batch, top_k)``), and ``scores``
  (``(batch, n_train)``) with ``include_scores=True``.
* ``explain_prediction``: the same without labels, explaining the model's own
  predicted class (classification losses).

Scores follow ``InfluenceModel.explain``: ``-grad L(z_test)^T inv(H) grad L(z_j)``
with ``inv(H) ~= P inverse P^T`` (``V diag(1/lambda) V^T`` for ``Arnoldi``,
``P inv(F) P^T`` for ``Projected``).
"""

from __future__ import annotations

import inspect
import json
import os

import keras
import tensorflow as tf

from tf_influence.engine.index import rows_tensor
from tf_influence.solvers.base import IndexInverse

# File name of the settings record in the SavedModel's ``assets.extra`` folder.
COMPILE_CONFIG = "compile_config.json"


def _input_specs(model):
    inputs = model.inputs
    if not inputs:
        raise ValueError(
            "Cannot export: the model has no symbolic inputs (a subclassed model never "
            "called on keras.Input). Build it as a Functional or Sequential model with "
            "keras.Input, or call it once on a keras.Input."
        )
    specs = [
        tf.TensorSpec([None] + list(t.shape[1:]), t.dtype, name=_name(t, i))
        for i, t in enumerate(inputs)
    ]
    return specs


def _name(tensor, i):
    name = getattr(tensor, "name", None) or f"input_{i}"
    return name.replace(":", "_").replace("/", "_")


def export_model(state, compile_config, path, top_k: int = 10, include_scores=False) -> None:
    """``InfluenceModel.export`` (see its docstring), from a ``FittedState``."""
    spec = state.index_inverse
    if spec is None or state.index is None:
        raise ValueError(
            "`export` needs the influence index of a solver that keeps one, so that "
            f"serving stores no training data. Received: solver={state.solver!r}. Call "
            "`compile(solver=tfi.solvers.Projected(dim=...))` (or `Arnoldi(rank=...)`) and "
            "`fit` again, then export."
        )
    if spec.projection.project is None:
        raise ValueError(
            "`export` serves one model's gradients. Received: solver="
            f"{state.solver!r}, whose index averages several models. Export the index of "
            "one model, or explain the ensemble in Python with `explain` / `top_k`."
        )
    path = os.fspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise ValueError(
            f"Argument `path` must be a new or empty directory. Received: path={path!r}, "
            "which holds files. Export each version to its own directory (e.g. models/name/2)."
        )
    top_k = min(int(top_k), state.num_train)
    objective = state.objective
    model = objective.model
    matrix = spec.projection.matrix
    rows = tf.cast(rows_tensor(state.index), objective.dtype)  # a store holds float16/32
    index = InfluenceIndex(spec, rows, matrix)
    if matrix is None:  # reads the matrices of `projection.weights` (tracked below)
        project = spec.projection.project
    else:  # a basis: one more variable of the SavedModel

        def project(vectors):
            return tf.matmul(index.basis, vectors, transpose_a=True)

    specs = _input_specs(model)
    single = len(specs) == 1
    label_spec = _label_spec(model, objective)

    def as_model_input(args):
        return args[0] if single else list(args)

    def scores_of(x, y):
        grads = state.gradients.graph_gradients(x, y)  # (b, p)
        coordinates = project(tf.transpose(grads))  # (dim, b)
        queries = index.index_inverse(spec.projection).apply(coordinates)
        return -tf.matmul(queries, index.projections, transpose_a=True, transpose_b=True)

    def outputs(scores):
        harmful = tf.math.top_k(scores, k=top_k)
        helpful = tf.math.top_k(-scores, k=top_k)
        result = {
            "top_harmful_indices": harmful.indices,
            "top_harmful_scores": harmful.values,
            "top_helpful_indices": helpful.indices,
            "top_helpful_scores": -helpful.values,
        }
        if include_scores:
            result["scores"] = scores
        return result

    # Keras's own export archive: it tracks the variables the way TF Serving's
    # loader (and `saved_model_cli run`) restores them.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(index)
    if spec.projection.weights is not None:  # the matrices `project` reads
        archive.track(spec.projection.weights)
    archive.add_endpoint(
        "serving_default",
        lambda *args: {"outputs": model(as_model_input(args), training=False)},
        input_signature=specs,
    )
    archive.add_endpoint(
        "explain",
        lambda *args: outputs(scores_of(as_model_input(args[:-1]), args[-1])),
        input_signature=[*specs, label_spec],
    )
    try:
        probe = [tf.zeros([1] + s.shape[1:], s.dtype) for s in specs]
        objective.predicted_labels(as_model_input(probe))
    except ValueError:
        pass  # a regression loss: no predicted-class signature
    else:

        def explain_prediction(*args):
            x = as_model_input(args)
            return outputs(scores_of(x, objective.predicted_labels(x)))

        archive.add_endpoint("explain_prediction", explain_prediction, input_signature=specs)
    # Keras < 3.5 has no `verbose` (and prints nothing extra).
    quiet = "verbose" in inspect.signature(archive.write_out).parameters
    archive.write_out(path, **({"verbose": False} if quiet else {}))
    # The settings record beside the graph, where TF Serving keeps extra files;
    # `InfluenceModel.compile_from_config` takes it as it is.
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, COMPILE_CONFIG), "w") as handle:
        # The damping that was used (``"auto"`` resolved at ``fit``).
        json.dump({**compile_config, "damping": state.damping}, handle, indent=1, sort_keys=True)


class InfluenceIndex(keras.layers.Layer):
    """The exported scoring state: the inverse in index coordinates (as it is, or its
    Cholesky factor), and the index, in the model's dtype."""

    def __init__(self, spec, projections, basis=None):
        super().__init__(name="influence_index", dtype=projections.dtype.name)
        self.inverse = self.cholesky = None
        if spec.cholesky is not None:
            self.cholesky = self._constant("cholesky", tf.cast(spec.cholesky, projections.dtype))
        else:
            self.inverse = self._constant("inverse", tf.cast(spec.inverse, projections.dtype))
        self.projections = self._constant("projections", projections)
        self.basis = None if basis is None else self._constant("basis", basis)
        self.built = True

    def index_inverse(self, projection):
        """The ``IndexInverse`` of the stored weights, in ``projection``'s coordinates."""
        return IndexInverse(projection, self.inverse, self.cholesky)

    def _constant(self, name, value):
        weight = self.add_weight(
            name=name, shape=tuple(value.shape), initializer="zeros", trainable=False
        )
        weight.assign(value)
        return weight


def _label_spec(model, objective):
    """The labels' spec: class indices for sparse losses, else shaped like the output."""
    outputs = getattr(model, "outputs", None) or []
    if objective.output_losses is not None or len(outputs) > 1:
        raise ValueError(
            "`export` serves models with one output. Received: a model with "
            f"{len(outputs)} outputs (loss {objective.loss_name!r}). Export an InfluenceModel "
            "of a one-output model, e.g. `keras.Model(model.inputs, model.outputs[0])` with "
            "that output's loss, or explain the several outputs in Python with `explain`."
        )
    output = outputs[0] if outputs else None
    name = objective.loss_name
    if name.startswith("sparse_"):
        return tf.TensorSpec([None], tf.int32, name="labels")
    if output is None:
        raise ValueError("Cannot export: the model has no symbolic output to shape the labels.")
    return tf.TensorSpec([None] + list(output.shape[1:]), objective.dtype, name="labels")
