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
    temporary = f"{path}.partial"
    with open(temporary, "wb") as handle:
        np.savez(handle, **payload)
    os.replace(temporary, path)


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
