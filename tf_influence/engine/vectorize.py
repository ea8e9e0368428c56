"""Vectorising a function over columns or examples inside the graph, or looping.

Every per-column product and per-example gradient of the engine goes through
``vectorized_map``, so that how the vectorisation is done is decided in one place.

By default it is TensorFlow's pfor (``tf.vectorized_map``): one batched graph for
all slices. pfor cannot convert every op: the backward pass of a ``tf.while_loop``
(which every Keras recurrent layer runs: ``LSTM``, ``GRU``, ``SimpleRNN``,
``Bidirectional``) fails in its converter with errors such as
``ValueError: Required handle data not set`` or ``TypeError: dtype variant is not
compatible with 0 of dtype int64``, and the half-converted graph it leaves behind
fails again when it runs. So a failure is never patched over where it happens:
``vectorized_map`` raises ``VectorizationError`` while tracing, and the compiled
function (``GraphFunction`` in ``tf_influence/engine/compile.py``) traces itself
again under ``loop_mode()``, in which ``vectorized_map`` runs an in-graph loop
(``tf.map_fn``) over the slices: the same results, one slice at a time, with no
round trip to Python. ``warn_loop_fallback`` says so once per model, naming the
layers that loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

_LOOPING: contextvars.ContextVar[bool] = contextvars.ContextVar("tfi_loop_mode", default=False)
_MODEL: contextvars.ContextVar[Any] = contextvars.ContextVar("tfi_loop_model", default=None)
# Models already warned about (held weakly: the warning is given once per model).
_WARNED: weakref.WeakSet = weakref.WeakSet()
_WARNED_WITHOUT_MODEL = [False]
# Models on which pfor failed: their other functions loop from the first trace.
_FAILED: weakref.WeakSet = weakref.WeakSet()

# What pfor's converter raises on an op it cannot vectorise (at trace time).
_PFOR_ERRORS = (ValueError, TypeError, NotImplementedError, tf.errors.InvalidArgumentError)
_PFOR_SOURCE = "parallel_for/pfor.py"


class VectorizationError(Exception):
    """Raised while tracing when pfor cannot vectorise a map: trace again in ``loop_mode``.

    The graph being traced already holds the half-converted ops, so only a new trace
    (``GraphFunction`` does it) gives a graph that runs.
    """


def looping() -> bool:
    """Whether ``vectorized_map`` loops (inside ``loop_mode``) instead of using pfor."""
    return _LOOPING.get()


@contextlib.contextmanager
def loop_mode(enabled: bool = True) -> Iterator[None]:
    """Within this context (while tracing), ``vectorized_map`` runs an in-graph loop.

    Args:
        enabled: False leaves the current mode as it is.
    """
    if not enabled:
        yield
        return
    token = _LOOPING.set(True)
    try:
        yield
    finally:
        _LOOPING.reset(token)


@contextlib.contextmanager
def model_scope(model: keras.Model | None) -> Iterator[None]:
    """Names ``model`` as the one being differentiated, for ``warn_loop_fallback``."""
    token = _MODEL.set(None if model is None else weakref.ref(model))
    try:
        yield
    finally:
        _MODEL.reset(token)


def current_model() -> keras.Model | None:
    """The model of the innermost ``model_scope``, or None."""
    ref = _MODEL.get()
    return None if ref is None else ref()


# False: products trace with TensorFlow's own MatMul converter even where
# ``vectorized_map(..., broadcast_matmul=True)`` asks for ``_convert_matmul`` (for
# side-by-side benchmarks: ``benchmarks.products``; a trace already made is kept).
BROADCAST_MATMUL = True
_MATMUL_LOCK = threading.Lock()
_MATMUL_STATE: dict = {"depth": 0, "original": None}


def _pfor_registry() -> dict | None:
    """pfor's table of op converters, or None if this TensorFlow has no such table."""
    try:
        from tensorflow.python.ops.parallel_for import pfor as pfor_lib
    except ImportError:  # pragma: no cover - another TensorFlow layout
        return None
    registry = getattr(pfor_lib, "_pfor_converter_registry", None)
    if not isinstance(registry, dict) or "MatMul" not in registry:
        return None
    return registry


def _convert_matmul(pfor_input: Any) -> Any:
    """pfor's ``MatMul`` converter, with a broadcast product when only ``b`` varies.

    TensorFlow's converter moves the loop axis of a varying ``b`` inside with a
    transpose, multiplies once and transposes the product back (its own comment
    asks whether that is the faster way). A broadcast ``BatchMatMulV2`` of the
    fixed ``a`` with every slice of ``b`` needs neither transpose.
    """
    from tensorflow.python.ops.parallel_for import pfor as pfor_lib

    a, a_stacked, _ = pfor_input.input(0)
    b, b_stacked, _ = pfor_input.input(1)
    if b_stacked and not a_stacked:
        product = tf.linalg.matmul(
            a[None],
            b,
            transpose_a=pfor_input.get_attr("transpose_a"),
            transpose_b=pfor_input.get_attr("transpose_b"),
        )
        return pfor_lib.wrap(product, True)
    return _MATMUL_STATE["original"](pfor_input)


@contextlib.contextmanager
def _broadcast_matmul() -> Iterator[None]:
    """While tracing inside, pfor converts ``MatMul`` by ``_convert_matmul``.

    For the vectorised Hessian-vector products: there the tangents are the varying
    ``b`` of most products of the second backward pass (``x @ v`` for a Dense
    kernel's tangent ``v``), and TensorFlow's two transposes per product took 23% of
    the op time of a block-CG solve on the digits MLP (TensorFlow profiler); without
    them an explain took 12-25% less time, with the same results to rounding. The table
    entry is restored on exit; the replacement computes the same product, so
    another thread tracing meanwhile gets the same graph's values.
    """
    registry = _pfor_registry()
    if registry is None:
        yield
        return
    with _MATMUL_LOCK:
        if _MATMUL_STATE["depth"] == 0:
            _MATMUL_STATE["original"] = registry["MatMul"]
            registry["MatMul"] = _convert_matmul
        _MATMUL_STATE["depth"] += 1
    try:
        yield
    finally:
        with _MATMUL_LOCK:
            _MATMUL_STATE["depth"] -= 1
            if _MATMUL_STATE["depth"] == 0:
                registry["MatMul"] = _MATMUL_STATE["original"]


def vectorized_map(fn: Callable[[Any], Any], elems: Any, broadcast_matmul: bool = False) -> Any:
    """``fn`` applied to every slice of ``elems`` along the first axis, results stacked.

    With pfor (the default), or with an in-graph loop inside ``loop_mode``.

    Args:
        fn: a function of one slice (a nest of tensors without the leading axis). It
            may return None in place of a tensor (a gradient that does not exist).
        elems: a nest of tensors sharing the leading axis.
        broadcast_matmul: convert a matrix product whose second factor alone varies
            into a broadcast batched product instead of TensorFlow's two transposes
            around one product (``_broadcast_matmul``): for products whose varying
            factor is the slice, such as Hessian-vector products of a block.

    Returns:
        The nest ``fn`` returns, each tensor with the leading axis added.

    Raises:
        VectorizationError: while tracing a graph, when pfor cannot vectorise ``fn``;
            trace the graph again in ``loop_mode``.
    """
    if looping():
        return _loop_map(fn, elems)
    held = _Held()
    try:
        with _quiet_pfor_logs(held):
            broadcast = broadcast_matmul and BROADCAST_MATMUL
            with _broadcast_matmul() if broadcast else contextlib.nullcontext():
                return tf.vectorized_map(fn, elems)
    except _PFOR_ERRORS as error:
        if not _raised_by_pfor(error):
            raise
        failure = error
    message = (
        f"TensorFlow's pfor cannot vectorise this function: {type(failure).__name__}: "
        f"{_first_line(failure)} (ops: {', '.join(_op_names(held.records, failure))})"
    )
    if tf.executing_eagerly():
        # tf.vectorized_map traced a graph of its own, so nothing of the failed
        # attempt is left behind: loop at once.
        warn_loop_fallback(current_model(), error=message)
        return _loop_map(fn, elems)
    raise VectorizationError(message) from failure


def _op_names(records: list[logging.LogRecord], error: BaseException) -> list[str]:
    """The names of the ops pfor failed on, from its log records and its error."""
    texts = [record.getMessage() for record in records] + [str(error)]
    names: list[str] = []
    for text in texts:
        for name in re.findall(r'name: "([^"]+)"|\'([^\' ]+):\d+\'', text):
            name = name[0] or name[1]
            if name not in names:
                names.append(name)
    return names[:8]


def _layers_named_in(model: keras.Model, text: str) -> list[keras.layers.Layer]:
    """Layers of ``model`` whose name scope appears in ``text`` (op names of an error)."""
    parts = set(re.findall(r"[A-Za-z0-9_.\-]+", text))
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.Model):
            continue  # a nested model only contains the layer at fault
        scope = re.compile(rf"{re.escape(layer.name)}(_\d+)?")
        if any(scope.fullmatch(part) for part in parts):
            found.append(layer)
    return found


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if line != "in user code:"]
    return (useful or [""])[-1][:300]


def _raised_by_pfor(error: BaseException) -> bool:
    """True if ``error`` (or an exception it was raised from) came out of pfor's converter.

    An error of ``fn`` itself (a wrong shape in the loss, say) is raised while pfor
    traces ``fn`` once, outside its converter, and is not a reason to loop.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code.co_filename.replace("\\", "/").endswith(_PFOR_SOURCE):
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False


class _Held(logging.Filter):
    """Holds TensorFlow's log records back while pfor tries a conversion."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _quiet_pfor_logs(held: _Held) -> Iterator[None]:
    """pfor logs every op it fails on (pages of ERROR lines) before it raises.

    A failure that ``vectorized_map`` handles is not an error for the user: its
    records are dropped. Any other outcome (success, or an error passed on) logs
    them as they were.
    """
    logger = tf.get_logger()
    logger.addFilter(held)
    handled = False
    try:
        yield
    except _PFOR_ERRORS as error:
        handled = _raised_by_pfor(error)
        raise
    finally:
        logger.removeFilter(held)
        if not handled:
            for record in held.records:
                logger.handle(record)


def _loop_map(fn: Callable[[Any], Any], elems: Any) -> Any:
    """``vectorized_map`` as a ``tf.map_fn`` loop, ``fn`` traced exactly once.

    ``fn`` is traced into a concrete function first (its outputs give the loop's
    output signature), so it runs once while tracing, as under pfor: a
    non-persistent ``GradientTape`` used inside it is used once.
    """
    elems = tf.nest.map_structure(tf.convert_to_tensor, elems)
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), elems)
    layout: dict[str, Any] = {}

    def flat_fn(elem):
        result = fn(elem)
        leaves = tf.nest.flatten(result)
        layout["structure"] = result
        layout["missing"] = [leaf is None for leaf in leaves]
        # An embedding's gradient comes as IndexedSlices; stack it dense, as pfor does.
        return [tf.convert_to_tensor(leaf) for leaf in leaves if leaf is not None]

    concrete = tf.function(flat_fn, autograph=False).get_concrete_function(specs)
    signature = [tf.TensorSpec(t.shape, t.dtype) for t in concrete.outputs]
    if signature:
        stacked = tf.map_fn(lambda elem: concrete(elem), elems, fn_output_signature=signature)
    else:
        stacked = []
    stacked = list(stacked)
    leaves = [None if missing else stacked.pop(0) for missing in layout["missing"]]
    return tf.nest.pack_sequence_as(layout["structure"], leaves)


def loop_layers(model: keras.Model | None) -> list[keras.layers.Layer]:
    """The layers of ``model`` that run a ``tf.while_loop`` (recurrent layers and wrappers).

    A ``Bidirectional`` layer is named rather than the two layers it wraps.
    """
    if model is None:
        return []
    found: list[keras.layers.Layer] = []
    inside: set[int] = set()
    loops = (keras.layers.RNN, keras.layers.Bidirectional)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) in inside or not isinstance(layer, loops):
            continue
        # An unrolled RNN has no loop, nor a Bidirectional whose two RNNs are unrolled.
        runs = [layer]
        if isinstance(layer, keras.layers.Bidirectional):
            runs = [layer.forward_layer, layer.backward_layer]
        if all(getattr(run, "unroll", False) for run in runs):
            continue
        found.append(layer)
        inside.update(id(sub) for sub in layer._flatten_layers(include_self=False))
    return found


def fallback_message(model: keras.Model | None, error: str = "") -> str:
    """The warning text for ``model``, naming its looping layers.

    Args:
        model: the model whose maps loop, or None.
        error: the text of pfor's error; the layers in its op names are named when the
            model has no recurrent layer.
    """
    tail = (
        "products and scores for this model loop over columns and examples instead "
        "(slower, same results)."
    )
    layers = loop_layers(model)
    if not layers and model is not None and error:
        layers = _layers_named_in(model, error)
    if not layers:
        name = "the model" if model is None else f"model '{model.name}'"
        return f"An op of {name} cannot be vectorised by TensorFlow's pfor; {tail}"
    names = ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in layers)
    noun = "Layer" if len(layers) == 1 else "Layers"
    return f"{noun} {names} cannot be vectorised by TensorFlow's pfor; {tail}"


def check_forward_mode(model: keras.Model | None, hvp: str) -> None:
    """Refuses ``hvp="forward_over_reverse"`` on a model with loop layers (``loop_layers``).

    TensorFlow's forward mode (``tf.autodiff.ForwardAccumulator``) cannot push a
    tangent through the ``tf.while_loop`` of a recurrent layer: the layer's own call
    fails inside TensorFlow (``TypeError: dtype variant is not compatible with 1 of
    dtype int64``), for Hessian and Gauss-Newton products alike and with or without
    the loop over columns. Nested reverse-mode tapes differentiate the loop.

    Args:
        model: the model whose products are formed (None: nothing to check).
        hvp: the ``hvp`` of ``compile``.

    Raises:
        ValueError: ``hvp`` is ``"forward_over_reverse"`` and ``model`` has a layer
            that runs a ``tf.while_loop``; the message names the layers and the fix.
    """
    if hvp != "forward_over_reverse":
        return
    layers = loop_layers(model)
    if not layers:
        return
    names = ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in layers)
    noun, verb = ("layer", "runs") if len(layers) == 1 else ("layers", "run")
    raise ValueError(
        f"Argument `hvp` cannot be \"forward_over_reverse\" for model '{model.name}': its "
        f"{noun} {names} {verb} a tf.while_loop, which TensorFlow's forward mode "
        "(tf.autodiff.ForwardAccumulator) cannot differentiate. Received: "
        'hvp="forward_over_reverse". Pass hvp="reverse_over_reverse" (or "auto", which '
        "takes it) to `compile`, or build the recurrent layer with unroll=True."
    )


def needs_loop(model: keras.Model | None) -> bool:
    """Whether ``model``'s maps should loop from the first trace, without trying pfor.

    True when the model has a recurrent layer (``loop_layers``), whose gradients pfor
    cannot vectorise and takes long to fail on, or when pfor already failed on it.
    """
    if model is None:
        return False
    try:
        if model in _FAILED:
            return True
    except TypeError:
        return False
    return bool(loop_layers(model))


def warn_loop_fallback(
    model: keras.Model | None = None, failed: bool = True, error: str = ""
) -> None:
    """A ``RuntimeWarning`` that the model's maps now loop, once per model.

    Args:
        model: the model whose maps loop (None: not known).
        failed: pfor failed on it (the model's other functions then loop from the
            start, see ``needs_loop``).
        error: the text of pfor's error, if it failed (see ``fallback_message``).
    """
    if model is not None and failed:
        with contextlib.suppress(TypeError):
            _FAILED.add(model)
    if model is None:
        if _WARNED_WITHOUT_MODEL[0]:
            return
        _WARNED_WITHOUT_MODEL[0] = True
    else:
        try:
            if model in _WARNED:
                return
            _WARNED.add(model)
        except TypeError:
            pass
    warnings.warn(fallback_message(model, error), RuntimeWarning, stacklevel=_outside_stacklevel())


def _outside_stacklevel() -> int:
    """The stack level of the first caller outside tf_influence and TensorFlow."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        inside = name.startswith(package) or f"{os.sep}tensorflow{os.sep}" in name
        if not inside and not name.startswith("<"):
            return level
        frame, level = frame.f_back, level + 1
    return 2
