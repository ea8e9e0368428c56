"""Traces kept on disk, so that a new process runs them without tracing again (opt-in).

Within a process, ``shared_function`` lets every ``InfluenceModel`` on a model reuse
the traces of the first one. A new process (a notebook kernel restarted, a script run
again) starts without them and pays Python tracing again: most of a fresh process's
first answer on a small model. With a cache directory set
(``tf_influence.config.set_trace_cache`` or the environment variable
``TF_INFLUENCE_TRACE_CACHE``), each top-level compiled function is written there
after its first successful call, as the ``FunctionDef`` library TensorFlow built
from it, and a later process registers that library with the eager context and
calls it directly, reading the live weights of its own model.

A trace is only kept when it is safe to reuse from its description alone:

* the model is a ``Sequential`` or functional model made only of built-in Keras
  layers (every ``module`` of its config is Keras's; no ``Lambda`` or ``TFSMLayer``),
  so that its config and the Keras version pin the code the trace ran;
* the shared key (``objective_key`` and the solver's settings) can be written
  without object identities: variables and layers of the model by position,
  built-in Keras losses and regularisers by class and config;
* the graph captures nothing but the model's variables, has no stateful random
  op (its seed would be the tracing process's), and returns only tensors.

The key of an entry also holds the versions of Python, TensorFlow, Keras and this
package, a digest of this package's source, the devices, the Keras float type and
dtype policy, the function's argument signature and its trace mode. Anything else
is traced as usual. An entry that cannot be read is skipped with a warning and
written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import types
import warnings
import weakref
from typing import Any

import keras
import tensorflow as tf

FORMAT = 1
ENVIRONMENT_VARIABLE = "TF_INFLUENCE_TRACE_CACHE"
# Larger libraries are traced as usual (a trace that big embeds constants).
MAX_BYTES = 64 * 2**20
_UNSET = object()
_STATE: dict = {"directory": _UNSET}
# What happened since the process started, for tests and benchmarks ("background":
# kept traces started in a thread of their own by ``compile.in_background``).
stats = {"loaded": 0, "stored": 0, "unsupported": 0, "background": 0}
_LOCAL = threading.local()
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STATEFUL_RANDOM = {
    "RandomUniform",
    "RandomUniformInt",
    "RandomStandardNormal",
    "TruncatedNormal",
    "RandomShuffle",
    "RandomGamma",
    "RandomPoisson",
    "RandomPoissonV2",
    "Multinomial",
    "ParameterizedTruncatedNormal",
    "StatefulUniform",
    "StatefulUniformInt",
    "StatefulUniformFullInt",
    "StatefulStandardNormalV2",
    "StatefulTruncatedNormal",
    "RngSkip",
    "RngReadAndSkip",
}


def set_directory(directory: str | os.PathLike | None) -> None:
    """Keeps traces under ``directory`` (created when first written); None turns it off."""
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "Argument `directory` must be a path (str or os.PathLike) or None. Received: "
            f"directory={directory!r} of type {type(directory).__name__}."
        )
    if directory is not None:
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(
                f"Argument `directory` must name a folder. Received: directory={directory!r}, "
                "which is a file. Pass a folder path (it is created if missing)."
            )
    _STATE["directory"] = directory


def directory() -> str | None:
    """The cache folder in use: the one set, else ``$TF_INFLUENCE_TRACE_CACHE``, else None."""
    value = _STATE["directory"]
    if value is _UNSET:
        value = os.environ.get(ENVIRONMENT_VARIABLE) or None
    return value


# -- what an entry is keyed by -------------------------------------------------------------
class _Unstable(Exception):
    """A key part that only means something in this process."""


def _source_digest() -> str:
    if "source" not in _STATE:
        digest = hashlib.sha256()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for folder, subfolders, files in sorted(os.walk(root)):
            subfolders.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
        _STATE["source"] = digest.hexdigest()
    return _STATE["source"]


def _environment() -> list:
    from tf_influence._version import __version__

    policy = keras.config.dtype_policy()
    return [
        FORMAT,
        sys.version_info[:2],
        tf.__version__,
        keras.__version__,
        __version__,
        _source_digest(),
        sorted(d.name for d in tf.config.list_logical_devices()),
        keras.config.floatx(),
        getattr(policy, "name", str(policy)),
    ]


def _keras_module(module: Any) -> bool:
    return isinstance(module, str) and (module == "keras" or module.startswith("keras."))


def _config_is_builtin(config: Any) -> bool:
    if isinstance(config, dict):
        if "module" in config and config["module"] is not None:
            if not _keras_module(config["module"]):
                return False
        if config.get("class_name") in ("Lambda", "TFSMLayer"):
            return False
        return all(_config_is_builtin(value) for value in config.values())
    if isinstance(config, list):
        return all(_config_is_builtin(value) for value in config)
    return True


def _without_names(config: Any) -> Any:
    """The config without ``name`` entries, which Keras numbers per process ("dense_3").

    Names change no computation; a functional model's wiring still names its layers
    (``keras_history``), so models wired alike but named apart only miss each other.
    """
    if isinstance(config, dict):
        return {k: _without_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, list):
        return [_without_names(v) for v in config]
    return config


class _ModelEntry:
    """A model's digest, and its variables and layers by position (the model held weakly)."""

    def __init__(self, model: keras.Model, digest: str):
        self.digest = digest
        self._model = weakref.ref(model)

    @property
    def variables(self) -> list:
        model = self._model()
        return [] if model is None else list(model.variables)

    @property
    def layers(self) -> list:
        model = self._model()
        return [] if model is None else list(model._flatten_layers(include_self=True))

    def handles(self) -> list:
        from tf_influence.engine.curvature import tf_variable

        return [tf_variable(v).handle for v in self.variables]


def _model_entry(model: keras.Model | None) -> _ModelEntry | None:
    if model is None:
        return None
    try:
        entry = _MODELS.get(model, _UNSET)
    except TypeError:
        return None
    if entry is not _UNSET:
        return entry
    if not getattr(model, "built", False):
        return None  # not remembered: it may be built by the next call
    entry = None
    from tf_influence.engine.curvature import tf_variable

    layers = list(model._flatten_layers(include_self=True))
    builtin = all(_keras_module(type(layer).__module__) for layer in layers)
    # Mirrored variables have one handle per replica: their traces stay in memory.
    builtin = builtin and not any(
        isinstance(tf_variable(v), tf.distribute.DistributedValues) for v in model.variables
    )
    if builtin:
        try:
            config = json.loads(model.to_json())
        except Exception:  # noqa: BLE001 - a model without a config is traced as usual
            config = None
        if config is not None and _config_is_builtin(config):
            description = [
                _without_names(config),
                [(list(v.shape), str(v.dtype)) for v in model.variables],
                _environment(),
            ]
            digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
            entry = _ModelEntry(model, digest.hexdigest())
    _MODELS[model] = entry
    return entry


def _stable(part: Any, model: Any) -> Any:
    """A key part written without object identities, or ``_Unstable``.

    ``model``: the model's ``variables``, ``layers`` and variable ``paths`` (to positions)."""
    from tf_influence.engine.compile import _Same

    if isinstance(part, str) and part in model.paths:
        return f"variable:{model.paths[part]}"
    if part is None or isinstance(part, (bool, int, float, str)):
        return part
    if isinstance(part, (tuple, list)):
        return [type(part).__name__, [_stable(p, model) for p in part]]
    if isinstance(part, type):
        if _keras_module(part.__module__) or part.__module__.startswith("tf_influence."):
            return f"type:{part.__module__}.{part.__qualname__}"
        raise _Unstable(part)
    if isinstance(part, tf.TensorSpec):
        return repr(part)
    if isinstance(part, _Same):
        obj = None if part._ref is None else part._ref()
        for index, variable in enumerate(model.variables):
            if obj is variable:
                return f"variable:{index}"
        for index, layer in enumerate(model.layers):
            if obj is layer:
                return f"layer:{index}"
        module = getattr(obj, "__module__", None)
        if callable(obj) and (_keras_module(module) or str(module).startswith("tf_influence.")):
            return f"function:{module}.{getattr(obj, '__qualname__', '')}"
        raise _Unstable(obj)
    raise _Unstable(part)


@contextlib.contextmanager
def identity(model: weakref.ref | None, key: Any) -> Any:
    """The shared function being called: what the trace of a compiled call is keyed by.

    ``model``: a weak reference to its Keras model (None: nothing is kept).
    """
    previous = getattr(_LOCAL, "identity", None)
    _LOCAL.identity = (model, key)
    try:
        yield
    finally:
        _LOCAL.identity = previous


# -- entries ------------------------------------------------------------------------------
def slot(signature: Any, flags: Any) -> Slot | None:
    """Where the trace of the current shared function's call is kept, if it may be.

    ``signature``: the argument specs (repr-able); ``flags``: the trace mode
    (autograph, loops). None when the cache is off, the call is not inside a shared
    function, or its model or key cannot be written down (see the module docstring).
    """
    folder = directory()
    current = getattr(_LOCAL, "identity", None)
    if folder is None or current is None or current[0] is None:
        return None
    if tf.distribute.has_strategy():
        stats["unsupported"] += 1
        return None
    model = _model_entry(current[0]())
    if model is None:
        stats["unsupported"] += 1
        return None
    variables = model.variables
    # Paths name the model ("sequential_1/dense/kernel"): keyed by position instead.
    view = types.SimpleNamespace(
        variables=variables,
        layers=model.layers,
        paths={getattr(v, "path", v.name): i for i, v in enumerate(variables)},
    )
    try:
        key = _stable(current[1], view)
    except _Unstable:
        stats["unsupported"] += 1
        return None
    text = json.dumps([model.digest, key, repr(signature), repr(flags)], sort_keys=True)
    return Slot(folder, hashlib.sha256(text.encode()).hexdigest(), model)


def _rename(library, suffix: str) -> dict:
    """Gives every function of ``library`` a name unique to its entry, references included."""
    names = {f.signature.name: f"{f.signature.name}_tfi{suffix}" for f in library.function}

    def fix_attr(value):
        if value.HasField("func") and value.func.name in names:
            value.func.name = names[value.func.name]
        for func in value.list.func:
            if func.name in names:
                func.name = names[func.name]

    for function in library.function:
        function.signature.name = names[function.signature.name]
        for value in function.attr.values():
            fix_attr(value)
        for node in function.node_def:
            if node.op in names:
                node.op = names[node.op]
            for value in node.attr.values():
                fix_attr(value)
    return names


def _template(structure: Any) -> Any:
    """The output structure with tensors as None, JSON-able; ``_Unstable`` otherwise."""
    if isinstance(structure, tf.Tensor):
        return None
    if isinstance(structure, (tuple, list)) and not hasattr(structure, "_fields"):
        return {"kind": type(structure).__name__, "items": [_template(s) for s in structure]}
    if isinstance(structure, dict) and all(isinstance(k, str) for k in structure):
        return {"kind": "dict", "items": {k: _template(v) for k, v in structure.items()}}
    raise _Unstable(structure)


def _pack(template: Any, flat: list) -> Any:
    if template is None:
        return flat.pop(0)
    if template["kind"] == "dict":
        return {k: _pack(v, flat) for k, v in template["items"].items()}
    items = [_pack(t, flat) for t in template["items"]]
    return tuple(items) if template["kind"] == "tuple" else items


class Loaded:
    """A kept trace registered with the eager context: ``loaded(args)`` runs it."""

    def __init__(self, name: str, num_inputs: int, num_outputs: int, captures, template, model):
        self.name = name.encode()
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs
        self.captures = captures
        self.template = template
        self._model = model

    def __call__(self, args: tuple) -> Any:
        from tensorflow.python.eager import context

        flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(args, expand_composites=True)]
        if len(flat) != self.num_inputs:
            raise ValueError(f"Kept trace {self.name!r}: {len(flat)} inputs for {self.num_inputs}.")
        handles = self._model.handles()
        flat += [handles[i] for i in self.captures]
        outputs = context.context().call_function(self.name, flat, self.num_outputs)
        return _pack(self.template, list(outputs))


class Slot:
    """One entry of the cache folder: ``load()`` it, or ``store()`` a concrete function."""

    def __init__(self, folder: str, digest: str, model: _ModelEntry):
        self.folder = folder
        self.digest = digest
        self.model = model
        self.path = os.path.join(folder, f"{digest}.json")

    def load(self) -> Loaded | None:
        """The kept trace registered and ready, or None (no entry, or an unreadable one)."""
        if not os.path.exists(self.path):
            return None
        from tensorflow.core.framework import function_pb2
        from tensorflow.python.eager import context

        try:
            with open(self.path) as handle:
                meta = json.load(handle)
            with open(os.path.join(self.folder, f"{self.digest}.pb"), "rb") as handle:
                library = function_pb2.FunctionDefLibrary.FromString(handle.read())
            ctx = context.context()
            for function in library.function:
                if not ctx.has_function(function.signature.name):
                    ctx.add_function_def(function)
            if not ctx.has_function(meta["name"]):
                raise ValueError(f"the library has no function {meta['name']!r}")
            if max(meta["captures"], default=-1) >= len(self.model.variables):
                raise ValueError("it captures more variables than the model has")
        except Exception as error:  # noqa: BLE001 - a bad entry is traced again, not fatal
            warnings.warn(
                f"Skipping the kept trace {self.path!r}, which cannot be read ({error}); "
                "the function is traced again and the entry rewritten. Delete the folder "
                f"{self.folder!r} if this repeats.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        stats["loaded"] += 1
        return Loaded(
            meta["name"],
            meta["inputs"],
            meta["outputs"],
            meta["captures"],
            meta["template"],
            self.model,
        )

    def store(self, concrete: Any) -> bool:
        """Writes ``concrete`` (a ``ConcreteFunction``) if it may be kept; True if written."""
        handles = {id(h): i for i, h in enumerate(self.model.handles())}
        captures = [handles.get(id(c)) for c in concrete.captured_inputs]
        outputs = list(concrete.outputs)
        try:
            template = _template(concrete.structured_outputs)
        except _Unstable:
            template = _UNSET
        if (
            None in captures
            or template is _UNSET
            or len(tf.nest.flatten(concrete.structured_outputs)) != len(outputs)
        ):
            stats["unsupported"] += 1
            return False
        library = concrete.graph.as_graph_def().library
        main = library.function.add()
        main.CopyFrom(concrete.function_def)
        del library.gradient[:]
        for function in library.function:
            if any(node.op in _STATEFUL_RANDOM for node in function.node_def):
                stats["unsupported"] += 1
                return False
        names = _rename(library, self.digest[:16])
        data = library.SerializeToString()
        if len(data) > MAX_BYTES:
            stats["unsupported"] += 1
            return False
        num_inputs = len(concrete.inputs) - len(captures)
        meta = {
            "name": names[concrete.function_def.signature.name],
            "inputs": num_inputs,
            "outputs": len(outputs),
            "captures": captures,
            "template": template,
        }
        os.makedirs(self.folder, exist_ok=True)
        _write(os.path.join(self.folder, f"{self.digest}.pb"), data)
        _write(self.path, json.dumps(meta).encode())  # last: its presence marks the entry
        stats["stored"] += 1
        return True


def _write(path: str, data: bytes) -> None:
    """Writes atomically: a reader sees the whole file or none (processes may race)."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
