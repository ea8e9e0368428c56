"""Saving and loading the fitted state of an ``InfluenceModel`` (no pickle).

One ``.npz`` file (a zip of ``.npy`` arrays, read with ``allow_pickle=False``):

* ``config.json``: format version, the settings record
  (``InfluenceModel.get_compile_config``, with ``damping="auto"`` replaced by the
  float ``fit`` chose, so ``load`` does not estimate it again), batch size, the analysed variables
  (by path), the loss name, and sha256 fingerprints of the model's weights and of
  the training data;
* ``data/<i>``: the training arrays (when ``fit`` got arrays and
  ``include_data=True``), with their nesting (dicts, lists, the sample weights
  of weighted data) in the config; ``sample_weight``: the weights alone when the
  arrays are not stored (``load`` takes ``x, y`` again and these weights);
* ``cache/<i>/...``: the cached inverse-HVP vectors and their diagnostics;
* ``solver/<name>``: the arrays the solver keeps (``Solver.get_state``: the
  Cholesky factor of ``Exact``, the eigenpairs of ``Arnoldi``, ...).

Loading checks the fingerprints: a state is only ever used with the weights and
the data it was computed from.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tf_influence._files import atomic_write
from tf_influence._fingerprint import data_fingerprint, weights_fingerprint
from tf_influence.engine.data import ExampleData
from tf_influence.engine.losses import WeightedTargets
from tf_influence.engine.objective import variable_name

FORMAT = "tf_influence.InfluenceModel"
VERSION = 2


def encode_structure(tree, leaves: list) -> object:
    """JSON description of a nest of arrays; appends the arrays to ``leaves``."""
    if isinstance(tree, WeightedTargets):
        return {"weighted": [encode_structure(v, leaves) for v in tree]}
    if isinstance(tree, dict):
        return {"dict": {str(k): encode_structure(v, leaves) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [encode_structure(v, leaves) for v in tree]}
    leaves.append(np.asarray(tree.numpy() if hasattr(tree, "numpy") else tree))
    return {"leaf": len(leaves) - 1}


def decode_structure(spec, leaves):
    if "weighted" in spec:
        return WeightedTargets(*(decode_structure(v, leaves) for v in spec["weighted"]))
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


def save_state(state, compile_config: dict, path, include_data: bool) -> None:
    """``InfluenceModel.save`` (see its docstring): a ``FittedState`` and its settings."""
    objective = state.objective
    config = {
        "format": FORMAT,
        "version": VERSION,
        # The damping that was used: "auto" is resolved once, at `fit`.
        "compile": {**compile_config, "damping": state.damping},
        "batch_size": state.batch_size,
        "num_train": state.num_train,
        "num_params": state.num_params,
        "params": state.param_indices(),
        "param_names": [variable_name(v) for v in objective.variables],
        "param_shapes": [list(v.shape) for v in objective.variables],
        "loss": objective.loss_name,
        "weights_fingerprint": state.weights_fingerprint,
        "data_fingerprint": state.training_fingerprint(),
        "data": None,
    }
    arrays = {}
    if include_data and state.data.in_memory:
        leaves = []
        config["data"] = encode_structure(state.data.elements, leaves)
        arrays.update({f"data/{i}": leaf for i, leaf in enumerate(leaves)})
    elif state.data.weighted and state.data.in_memory:
        # The data is given again at `load`; its weights are kept (n numbers).
        arrays["sample_weight"] = state.data.sample_weights()
    config["cache"], cached = cache_arrays(state.solutions.items())
    arrays.update(cached)
    solver_arrays = state.solver_state()
    config["solver_state"] = sorted(solver_arrays)
    arrays.update({f"solver/{name}": np.asarray(a) for name, a in solver_arrays.items()})
    write(path, config, arrays)


class SavedState:
    """A file written by ``save_state``, read and checked piece by piece by ``load``.

    Attributes:
        config: the JSON part of the file.
        compile_config: the settings record (``InfluenceModel.get_compile_config``).
        data_fingerprint: sha256 of the training data the state was computed for.
        solver_state: the arrays of ``Solver.get_state``.
    """

    def __init__(self, path, config: dict, arrays: dict):
        self.path, self.config, self.arrays = path, config, arrays
        self.compile_config = config["compile"]
        self.data_fingerprint = config["data_fingerprint"]
        self.solver_state = {
            name: arrays[f"solver/{name}"] for name in config.get("solver_state", [])
        }

    def variables(self, model) -> list:
        """The analysed variables of ``model``, refusing a model of other shapes."""
        config, variables = self.config, list(model.trainable_variables)
        shapes = [list(v.shape) for v in variables]
        if (
            max(config["params"]) >= len(variables)
            or [shapes[i] for i in config["params"]] != config["param_shapes"]
        ):
            raise ValueError(
                f"Argument `model` does not match the saved state in {self.path!r}: the state "
                f"is for parameters {config['param_names']} of shapes "
                f"{config['param_shapes']}. Received: a model with trainable variables "
                f"{[variable_name(v) for v in variables]} of shapes {shapes}. Load the "
                "model the state was saved for."
            )
        return [variables[i] for i in config["params"]]

    def check_objective(self, objective) -> None:
        """Refuses another loss, or weights other than the ones the state was computed for."""
        if objective.loss_name != self.config["loss"]:
            raise ValueError(
                f"The saved state in {self.path!r} was computed with loss "
                f"{self.config['loss']!r}. Received: loss {objective.loss_name!r}. Pass "
                "`loss=` to `load`."
            )
        if weights_fingerprint(objective.model.weights) != self.config["weights_fingerprint"]:
            raise ValueError(
                f"Argument `model` does not match the saved state in {self.path!r}: its "
                "weights differ from the ones the state was computed for. Load the same "
                "weights (model.load_weights / keras.load_model), or fit a new InfluenceModel."
            )

    def training_data(self, x, y) -> ExampleData:
        """The training data: ``x, y`` if given (checked), else the stored arrays."""
        config = self.config
        if x is not None:
            dataset = isinstance(x, tf.data.Dataset)
            data = ExampleData(
                x,
                y,
                None if dataset else config["batch_size"],
                sample_weight=None if dataset else self.arrays.get("sample_weight"),
            )
        elif config["data"] is not None:
            count = sum(name.startswith("data/") for name in self.arrays)
            leaves = [self.arrays[f"data/{i}"] for i in range(count)]
            elements = decode_structure(config["data"], leaves)
            data = ExampleData(*elements, batch_size=config["batch_size"])
        else:
            raise ValueError(
                f"The saved state in {self.path!r} holds no training data (it was a dataset, "
                "or saved with include_data=False). Received: x=None. Pass the training data "
                "as `x` (and `y`)."
            )
        if data_fingerprint(data) != self.data_fingerprint:
            raise ValueError(
                f"Argument `x` does not match the saved state in {self.path!r}: the training "
                f"examples differ from the {config['num_train']} the state was computed for "
                "(values or order). Pass the same data, in the same order."
            )
        return data

    def restore_solutions(self, state) -> None:
        """Puts the saved inverse-HVP vectors back into the fitted state's cache."""
        dtype = state.objective.dtype
        for key, solution, diagnostics in cache_entries(self.config["cache"], self.arrays, dtype):
            state.solutions.put(key, solution, diagnostics)


def read_state(path) -> SavedState:
    """Reads and checks a file written by ``InfluenceModel.save``."""
    config, arrays = read(path)
    return SavedState(os.fspath(path), config, arrays)
