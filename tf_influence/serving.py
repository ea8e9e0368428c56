"""Analysing a model that is only at hand as a SavedModel laid out for TF Serving."""

from __future__ import annotations

import os

import keras
import tensorflow as tf


def resolve_version_dir(path: str | os.PathLike) -> str:
    """``models/name/`` -> its highest numeric version ``models/name/<v>/``, as TF Serving
    picks; a directory holding ``saved_model.pb`` is returned as it is."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            "Argument `path` must be a SavedModel directory (or a TF Serving model directory "
            f"of numbered versions). Received: path={path!r}, which does not exist."
        )
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    if not versions:
        raise ValueError(
            "Argument `path` holds no saved_model.pb and no numbered version directory. "
            f"Received: path={path!r} with {sorted(os.listdir(path))[:10]}. Point it at a "
            "directory written by `model.export(...)` (e.g. models/name/1)."
        )
    return resolve_version_dir(os.path.join(path, max(versions, key=int)))


def load_served_model(path: str | os.PathLike, endpoint: str = "serve") -> keras.Model:
    """A ``keras.Model`` over a SavedModel's endpoint, with its variables trainable.

    For a model exported with ``model.export(path)`` (TF Serving layout, e.g.
    ``models/name/1``; a directory of numbered versions takes the highest) when the
    ``.keras`` file is not at hand. Give the result to ``InfluenceModel`` with
    ``loss=``: a SavedModel stores no loss. It stores no weight regularizers
    either, so ``Omega`` is 0 for the loaded model: give the ``damping`` that makes
    ``H`` positive definite (an L2 penalty ``l2 * |w|^2`` on every weight is
    ``damping = 2 * l2``). Forward-mode scoring cannot see through a restored
    function, so ``scoring="auto"`` uses per-example gradients for it.

    Args:
        path: the SavedModel directory, or a TF Serving model directory.
        endpoint: the function that returns the model's output: ``"serve"`` as
            written by ``model.export``.

    Raises:
        ValueError: no SavedModel there, no variables, no such endpoint, or an
            endpoint without a flat input signature.
    """
    path = resolve_version_dir(path)
    variables = os.path.join(path, "variables")
    if not os.path.isdir(variables) or not os.listdir(variables):
        raise ValueError(
            f"The SavedModel at {path!r} has no variables (no variables/ directory with a "
            "checkpoint): there are no weights to take influence over. Export the trained "
            "model with `model.export(path)`."
        )
    loaded = tf.saved_model.load(path)
    function = getattr(loaded, endpoint, None)
    if function is None:
        names = [n for n in dir(loaded) if not n.startswith("_")]
        raise ValueError(
            f"The SavedModel at {path!r} has no endpoint {endpoint!r}. Received: endpoint="
            f"{endpoint!r}; it has {names} and signatures {list(loaded.signatures)}. Pass "
            "`endpoint=` with the function that returns the model's output."
        )
    specs = getattr(function, "input_signature", None)
    if not specs or not all(isinstance(s, tf.TensorSpec) for s in specs):
        raise ValueError(
            f"The endpoint {endpoint!r} of {path!r} has no flat input signature of tensors. "
            f"Received: {specs!r}. Export the model with `model.export(path)`."
        )
    dtype = next((s.dtype for s in specs if s.dtype.is_floating), tf.float32)
    layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint, trainable=True, dtype=dtype.name)
    if not layer.trainable_weights:
        raise ValueError(
            f"The endpoint {endpoint!r} of {path!r} uses no trainable variable: there is "
            "nothing to take influence over."
        )
    inputs = [keras.Input(tuple(s.shape[1:]), dtype=s.dtype.name) for s in specs]
    outputs = layer(inputs[0] if len(inputs) == 1 else inputs)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs)
