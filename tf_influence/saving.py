"""Saving and loading the fitted state of an ``InfluenceModel`` (no pickle).

One ``.npz`` file (a zip of ``.npy`` arrays, read with ``allow_pickle=False``):

* ``config.json``: format version, solver (class name and config), damping, hvp,
  scoring, jit_compile, batch size, the analysed variables (by path), the loss
  name, and sha256 fingerprints of the model's weights and of the training data;
* ``data/<i>``: the training arrays (when ``fit`` got arrays and
  ``include_data=True``), with their nesting (dicts, lists) in the config;
* ``cache/<i>/...``: the cached inverse-HVP vectors and their diagnostics;
* ``exact/cholesky``: the Cholesky factor of ``H + damping*I`` for ``Exact``.

Loading checks the fingerprints: a state is only ever used with the weights and
the data it was computed from.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tf_influence import solvers as solvers_lib
from tf_influence._files import atomic_write
from tf_influence._fingerprint import data_fingerprint, weights_fingerprint
from tf_influence._progress import resolve_verbose
from tf_influence.engine.data import ExampleData
from tf_influence.engine.objective import variable_name

FORMAT = "tf_influence.InfluenceModel"
VERSION = 1


def encode_structure(tree, leaves: list) -> object:
    """JSON description of a nest of arrays; appends the arrays to ``leaves``."""
    if isinstance(tree, dict):
        return {"dict": {str(k): encode_structure(v, leaves) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [encode_structure(v, leaves) for v in tree]}
    leaves.append(np.asarray(tree.numpy() if hasattr(tree, "numpy") else tree))
    return {"leaf": len(leaves) - 1}


def decode_structure(spec, leaves):
    if "dict" in spec:
        return {k: decode_structure(v, leaves) for k, v in spec["dict"].items()}
    if "list" in spec:
        return [decode_structure(v, leaves) for v in spec["list"]]
    if "tuple" in spec:
        return tuple(decode_structure(v, leaves) for v in spec["tuple"])
    return leaves[spec["leaf"]]


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return None


def write(path, config: dict, arrays: dict) -> None:
    """Writes ``config`` and ``arrays`` to ``path`` atomically (a crash leaves no half file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(
            f"Argument `path` must be in an existing directory. Received: path={path!r} "
            f"(directory {directory!r} does not exist). Create it first."
        )
    payload = {"config.json": np.asarray(json.dumps(config))}
    payload.update(arrays)
    atomic_write(path, lambda handle: np.savez(handle, **payload))


def read(path) -> tuple[dict, dict]:
    """``(config, arrays)`` from a file written by ``write``; refuses other files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Argument `path` must be a file written by `InfluenceModel.save`. Received: "
            f"path={path!r}, which does not exist."
        )
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
        config = json.loads(str(arrays.pop("config.json")))
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"Argument `path` must be a file written by `InfluenceModel.save`. Received: "
            f"path={path!r}, which cannot be read as one ({error})."
        ) from error
    if config.get("format") != FORMAT:
        raise ValueError(
            f"Argument `path` must be a file written by `InfluenceModel.save`. Received: "
            f"path={path!r} with format {config.get('format')!r}."
        )
    if config.get("version") != VERSION:
        raise ValueError(
            f"The file {path!r} has format version {config.get('version')!r}; this version of "
            f"tf_influence reads version {VERSION}. Save it again with this version."
        )
    return config, arrays


def cache_arrays(entries) -> tuple[list, dict]:
    """Config entries and arrays for the cached ``key -> (solution, diagnostics)`` pairs."""
    described, arrays = [], {}
    for i, (key, (solution, diagnostics)) in enumerate(entries):
        arrays[f"cache/{i}/solution"] = np.asarray(solution.numpy())
        arrays[f"cache/{i}/residual_norm"] = np.asarray(diagnostics.residual_norm)
        arrays[f"cache/{i}/converged"] = np.asarray(diagnostics.converged)
        described.append(
            {
                "key": key,
                "solver": diagnostics.solver,
                "iterations": int(diagnostics.iterations),
                "info": {k: _jsonable(v) for k, v in diagnostics.info.items()},
            }
        )
    return described, arrays


def cache_entries(described, arrays, dtype):
    from tf_influence.solvers.base import Diagnostics

    for i, entry in enumerate(described):
        diagnostics = Diagnostics(
            solver=entry["solver"],
            iterations=entry["iterations"],
            residual_norm=arrays[f"cache/{i}/residual_norm"],
            converged=arrays[f"cache/{i}/converged"],
            info=entry["info"],
        )
        yield entry["key"], tf.constant(arrays[f"cache/{i}/solution"], dtype), diagnostics


def save_state(im, path, include_data: bool) -> None:
    """``InfluenceModel.save`` (see its docstring)."""
    im._require_current("save")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "solver": solvers_lib.serialize(im.solver),
        "damping": im.damping,
        "hvp": im.hvp,
        "scoring": im._gradients.scoring,
        "jit_compile": im.jit_compile,
        "batch_size": im._data.batch_size,
        "num_train": im.num_train,
        "num_params": im.num_params,
        "params": im._param_indices(),
        "param_names": [variable_name(v) for v in im.objective.variables],
        "param_shapes": [list(v.shape) for v in im.objective.variables],
        "loss": im.objective.loss_name,
        "weights_fingerprint": im._weights_fingerprint,
        "data_fingerprint": im.training_fingerprint(),
        "data": None,
    }
    arrays = {}
    if include_data and im._data.in_memory:
        leaves = []
        config["data"] = encode_structure(im._data._tensors, leaves)
        arrays.update({f"data/{i}": leaf for i, leaf in enumerate(leaves)})
    config["cache"], cached = cache_arrays(im._solution_cache.items())
    arrays.update(cached)
    if isinstance(im.solver, solvers_lib.Exact):
        arrays["exact/cholesky"] = im._operator.cached("exact.cholesky", None).numpy()
    write(path, config, arrays)


def load_state(cls, path, model, x, y, loss, verbose):
    """``InfluenceModel.load`` (see its docstring)."""
    config, arrays = read(path)
    variables = list(model.trainable_variables)
    shapes = [list(v.shape) for v in variables]
    if (
        max(config["params"]) >= len(variables)
        or [shapes[i] for i in config["params"]] != config["param_shapes"]
    ):
        raise ValueError(
            f"Argument `model` does not match the saved state in {path!r}: the state "
            f"is for parameters {config['param_names']} of shapes "
            f"{config['param_shapes']}. Received: a model with trainable variables "
            f"{[variable_name(v) for v in variables]} of shapes {shapes}. Load the "
            "model the state was saved for."
        )
    im = cls(model, loss=loss, params=[variables[i] for i in config["params"]])
    if im.objective.loss_name != config["loss"]:
        raise ValueError(
            f"The saved state in {path!r} was computed with loss {config['loss']!r}. "
            f"Received: loss {im.objective.loss_name!r}. Pass `loss=` to `load`."
        )
    if weights_fingerprint(model.weights) != config["weights_fingerprint"]:
        raise ValueError(
            f"Argument `model` does not match the saved state in {path!r}: its weights "
            "differ from the ones the state was computed for. Load the same weights "
            "(model.load_weights / keras.load_model), or fit a new InfluenceModel."
        )
    im.compile(
        solver=solvers_lib.deserialize(config["solver"]),
        damping=config["damping"],
        hvp=config["hvp"],
        scoring=config["scoring"],
        jit_compile=config["jit_compile"],
    )
    if x is not None:
        data = ExampleData(x, y, None if isinstance(x, tf.data.Dataset) else config["batch_size"])
    elif config["data"] is not None:
        count = sum(name.startswith("data/") for name in arrays)
        leaves = [arrays[f"data/{i}"] for i in range(count)]
        elements = decode_structure(config["data"], leaves)
        data = ExampleData(*elements, batch_size=config["batch_size"])
    else:
        raise ValueError(
            f"The saved state in {path!r} holds no training data (it was a dataset, or "
            "saved with include_data=False). Received: x=None. Pass the training data "
            "as `x` (and `y`)."
        )
    if data_fingerprint(data) != config["data_fingerprint"]:
        raise ValueError(
            f"Argument `x` does not match the saved state in {path!r}: the training "
            f"examples differ from the {config['num_train']} the state was computed for "
            "(values or order). Pass the same data, in the same order."
        )
    im._data, im._data_fingerprint = data, config["data_fingerprint"]
    cholesky = arrays.get("exact/cholesky")
    if cholesky is not None:
        cholesky = tf.constant(cholesky)
    im._build_operator(resolve_verbose(verbose), cholesky=cholesky)
    dtype = im.objective.dtype
    for key, solution, diagnostics in cache_entries(config["cache"], arrays, dtype):
        im._solution_cache.put(key, solution, diagnostics)
    return im
