"""Compiling functions once per input structure, and sharing traces between owners.

Every ``InfluenceModel`` builds its own operator and gradients, but on the same
Keras model with the same configuration they would trace the same graphs. The
functions compiled here are keyed by the model (weakly: a model that is no longer
used is freed with its traces) and by everything else the trace depends on
(``objective_key``), and bound to their caller only for the duration of a call.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import queue
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_influence.engine import trace_cache, vectorize


def _relaxed_spec(tensor) -> tf.TensorSpec:
    tensor = tf.convert_to_tensor(tensor)
    shape = tensor.shape
    if shape.rank is None or shape.rank == 0:
        return tf.TensorSpec(shape, tensor.dtype)
    return tf.TensorSpec([None] + shape.as_list()[1:], tensor.dtype)


_CODE_IDS = itertools.count()


def _grappler_arithmetic_bug(error: tf.errors.AlreadyExistsError) -> bool:
    """True for the temporary-variable clash of Grappler's arithmetic optimizer."""
    return "ArithmeticOptimizer" in str(error) and "tmp_var" in str(error)


_OPTIONS: dict = {}


@contextlib.contextmanager
def call_options(arithmetic: bool = True) -> Any:
    """Function calls of this thread with our Grappler settings; the process's are left alone.

    Grappler runs its optimizers over a new function twice by default; we run them
    once. On the digits MLP's block-CG graph (about 1,300 nodes) the second round
    took about 0.1 s of the first call (0.41 s for both, logged with
    ``TF_CPP_VMODULE=meta_optimizer=1``) and removed 2% of the nodes.

    ``arithmetic=False`` also turns off the arithmetic optimizer: Grappler's
    ``AddOpsRewrite`` can turn a sum inside nested while loops into an accumulator
    with a temporary variable whose name is not unique across the iterations that
    run in parallel; execution then fails with ``AlreadyExistsError: Resource
    __per_step_.../ArithmeticOptimizer/AddOpsRewrite_add/tmp_var``. Seen on block
    products of a digits CNN's Hessian at batch size 256 and 64 columns, where pfor
    runs ``Conv2DBackpropFilter`` in a while loop. The graph is re-optimised once
    under these options and kept.
    """
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context as eager_context

    ctx = eager_context.context()
    previous = ctx.function_call_options
    key = (previous.config_proto_serialized, previous.executor_type, arithmetic)
    options = _OPTIONS.get(key)
    if options is None:
        config = config_pb2.ConfigProto()
        config.ParseFromString(previous.config_proto_serialized)
        rewrites = config.graph_options.rewrite_options
        iterations = rewriter_config_pb2.RewriterConfig
        if rewrites.meta_optimizer_iterations == iterations.DEFAULT_NUM_ITERS:
            rewrites.meta_optimizer_iterations = iterations.ONE
        if not arithmetic:
            rewrites.arithmetic_optimization = rewriter_config_pb2.RewriterConfig.OFF
        options = eager_context.FunctionCallOptions(
            executor_type=previous.executor_type, config_proto=config
        )
        if len(_OPTIONS) > 16:
            _OPTIONS.clear()
        _OPTIONS[key] = options
    ctx.function_call_options = options
    try:
        yield
    finally:
        ctx.function_call_options = previous


_BACKGROUND = threading.local()
# False: calls inside ``in_background`` are skipped instead of queued (for
# side-by-side benchmarks: ``benchmarks.first_answer``).
BACKGROUND_BUILDS = True


class _Worker:
    """One daemon thread that runs the calls of ``in_background`` blocks in order.

    One thread, not one per call: on a machine with few cores, calls built side by
    side slow each other down, and the first one started (the solve, at the start
    of ``fit``) is the one ``explain`` needs first. At exit, calls not yet started
    are dropped and the running one is waited for: a thread still inside
    TensorFlow when the interpreter shuts down would crash it.
    """

    def __init__(self):
        self._waiting: set = set()  # the events of jobs not yet run
        self._reset()
        self.closing = False
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        # A forked child has no thread: the jobs the parent queued are dropped (their
        # calls then run as usual, instead of waiting for ever) and the next job
        # starts a thread of the child's own.
        for done in list(self._waiting):
            done.set()
        self._waiting.clear()
        self._reset()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Queues ``job``; the event is set once it has run (or been dropped)."""
        done = threading.Event()
        self._waiting.add(done)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._jobs,),
                    name="tf_influence-background",
                    daemon=True,
                )
                self._thread.start()
        self._jobs.put((job, done))
        return done

    def _run(self, jobs: queue.Queue) -> None:
        while True:
            job, done = jobs.get()
            try:
                if not self.closing:
                    job()
            except Exception:  # noqa: BLE001 - the call that needs the result reports it
                pass
            finally:
                done.set()
                self._waiting.discard(done)
                jobs.task_done()

    def close(self) -> None:
        self.closing = True
        if self._thread is not None:
            self._jobs.join()


_WORKER = _Worker()
atexit.register(_WORKER.close)


@contextlib.contextmanager
def in_background() -> Any:
    """Compiled calls in this block only get their function ready; they return None.

    For calls whose result does not matter, such as a solve of zero right-hand
    sides (``Solver.warm_up``). TensorFlow optimises and builds a function's graph
    on its first call: about 0.45 s of the first explain for the digits MLP's
    block CG, most of what remains of the first answer of a new process that loads
    its traces from disk (``trace_cache``). A call whose trace is kept on disk is
    queued to a background thread (``_Worker``), which does that work outside the
    interpreter lock while this thread goes on; the next call of the same function
    waits for it. A call that would need tracing is skipped: tracing holds the
    interpreter lock, so it would only slow this thread down.
    """
    previous = getattr(_BACKGROUND, "on", False)
    _BACKGROUND.on = True
    try:
        yield
    finally:
        _BACKGROUND.on = previous


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (a plain Python function only).

    TensorFlow's warning "N out of the last M calls to <function> triggered
    tf.function retracing" counts the traces of every ``tf.function`` whose Python
    function shares a code object. We compile many functions from one closure (a
    ``SharedFunction`` per method, model and configuration), each traced once per
    shape, which it would report as retracing. A renamed copy of the code counts
    alone, so the warning keeps its meaning: one function traced again and again.
    """
    if not isinstance(fn, types.FunctionType) or hasattr(fn, "__wrapped__"):
        return fn
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_CODE_IDS)}")
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return copy


class GraphFunction:
    """``tf.function(fn)`` without autograph, retraced with it, or with loops, if needed.

    Our own functions write their loops with ``tf.while_loop`` / ``tf.cond``, and
    Keras 3 runs models and losses without autograph in ``fit``, so conversion is
    usually wasted: it took about 0.7 s of ``fit`` and 1.2 s of the first
    ``explain`` on the digits MLP (``benchmarks/first_call.py``). A loss that
    branches in Python on a tensor (which only works in a ``tf.function`` with
    autograph) raises ``OperatorNotAllowedInGraphError`` while tracing; the
    function is then compiled again with autograph, once, and keeps it.
    ``autograph=True`` converts from the start (a loop over a distributed dataset
    needs it).

    In the same way, when TensorFlow's pfor cannot vectorise a map of the function
    (the gradients of a recurrent layer's ``tf.while_loop``), ``vectorized_map``
    raises ``VectorizationError`` while tracing; the function is compiled again in
    loop mode (``tf_influence/engine/vectorize.py``), once, keeps it, and warns
    once per model. pfor can take long to fail (34 s on the backward pass of a
    3-unit LSTM), so a model known to need loops (``vectorize.needs_loop``: it has a
    recurrent layer, or pfor already failed on it) loops from the first trace.
    ``loop=True`` loops from the start.

    Args:
        fn: the Python function to compile.
        autograph: convert with autograph from the start.
        loop: trace in loop mode from the start.
        model: the Keras model ``fn`` differentiates, named by the loop warning
            (default: the model of the enclosing ``vectorize.model_scope``).
        **kwargs: passed to ``tf.function`` (``input_signature``, ``jit_compile``).
    """

    def __init__(
        self,
        fn: Callable,
        autograph: bool = False,
        loop: bool = False,
        model: keras.Model | None = None,
        **kwargs: Any,
    ):
        self._fn = fn
        self._kwargs = kwargs
        self.autograph = bool(autograph)
        self.loop = bool(loop)
        self._model = _weak(model)
        self._earlier_traces = 0  # traces of the functions replaced by a retrace
        self._started = False
        # Set after Grappler's arithmetic optimizer broke a call (see
        # ``call_options``): every later call runs without it.
        self.rewrites_off = False
        # A trace kept on disk (``trace_cache``): None until the first call looks,
        # then the loaded function or False; the slot to write after a traced call.
        self._kept: trace_cache.Loaded | bool | None = None
        self._storing: trace_cache.Slot | None = None
        self._background: threading.Event | None = None  # see `in_background`
        self._function = self._compile()

    def _compile(self):
        fn = self._fn
        if self.loop:
            inner = fn

            def fn(*args, **kwargs):
                with vectorize.loop_mode():
                    return inner(*args, **kwargs)

        return tf.function(own_code(fn), autograph=self.autograph, **self._kwargs)

    def _model_now(self) -> keras.Model | None:
        model = None if self._model is None else self._model()
        return vectorize.current_model() if model is None else model

    def _start_looping(self, error: vectorize.VectorizationError | None = None) -> None:
        self.loop = True
        model = self._model_now()
        vectorize.warn_loop_fallback(model, failed=error is not None, error=str(error or ""))
        self._earlier_traces += self._function.experimental_get_tracing_count()
        self._function = self._compile()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._started:
            self._started = True
            if not self.loop and vectorize.needs_loop(self._model_now()):
                self._start_looping()
        slot = self._kept is None and not kwargs and self._slot(args)
        if slot:
            self._kept = slot.load() or False
            if not self._kept:
                self._storing = slot
        eager = tf.executing_eagerly()
        if getattr(_BACKGROUND, "on", False):
            if self._kept and eager and not kwargs and self._background is None:
                if BACKGROUND_BUILDS:
                    self._start_background(args)
            return None
        if self._background is not None:
            self._background.wait()
            self._background = None
        while True:
            try:
                if self._kept and eager:
                    call = functools.partial(self._kept, args)
                else:
                    call = functools.partial(self._function, *args, **kwargs)
                if eager:
                    with call_options(arithmetic=not self.rewrites_off):
                        result = call()
                else:
                    result = call()
                self._store(args)
                return result
            except tf.errors.AlreadyExistsError as error:
                if self.rewrites_off or not _grappler_arithmetic_bug(error):
                    raise
                self.rewrites_off = True
                continue
            except tf.errors.OperatorNotAllowedInGraphError:
                if self.autograph:
                    raise
                self.autograph = True
            except vectorize.VectorizationError as error:
                if self.loop:
                    raise
                self._start_looping(error)
                continue
            self._earlier_traces += self._function.experimental_get_tracing_count()
            self._function = self._compile()

    def _start_background(self, args: tuple) -> None:
        """Queues the kept trace's call on ``args`` to the background thread."""
        from tensorflow.python.eager import context

        kept, arithmetic = self._kept, not self.rewrites_off
        # This thread's device and call options, so that the call prepares the same
        # function the next call here will run.
        ctx = context.context()
        device, options = ctx.device_name, ctx.function_call_options

        def run():
            ctx.function_call_options = options
            with tf.device(device) if device else contextlib.nullcontext():
                with call_options(arithmetic=arithmetic):
                    kept(args)

        trace_cache.stats["background"] += 1
        self._background = _WORKER.submit(run)

    def _slot(self, args: tuple) -> trace_cache.Slot | None:
        """Where this call's trace is kept on disk (``trace_cache``), if anywhere.

        Only top-level (eager) calls of functions with a fixed signature, not compiled
        with XLA, are kept.
        """
        signature = self._kwargs.get("input_signature")
        if trace_cache.directory() is None or signature is None or self._kwargs.get("jit_compile"):
            return None
        if not tf.executing_eagerly() or any(
            isinstance(a, tf.data.Dataset) for a in tf.nest.flatten(args)
        ):
            return None
        return trace_cache.slot(signature, (self.autograph, self.loop))

    def _store(self, args: tuple) -> None:
        if self._storing is None:
            return
        # Keyed again: the flags may have changed while tracing (autograph, loops).
        self._storing, slot = None, self._slot(args)
        if slot is not None:
            slot.store(self._function.get_concrete_function(*args))

    def experimental_get_tracing_count(self) -> int:
        """Traces so far, counting those of a replaced (non-looping) function."""
        return self._earlier_traces + self._function.experimental_get_tracing_count()


class BatchFunction:
    """A ``tf.function`` of ``(x, y, *extra)`` traced once per structure, rank and dtype.

    The leading (batch) axis of every leaf of ``x`` and ``y`` is left unknown, so a
    short last batch or a different number of test points does not retrace, while
    ranks stay known (Keras losses need them). ``extra`` arguments get the given
    fixed specs. Each structure gets a ``GraphFunction``: no autograph unless
    tracing shows the code needs it, and no loops unless pfor failed (once one
    structure loops, the next ones loop from the start).

    Args:
        fn: the Python function to compile.
        extra_specs: ``tf.TensorSpec`` for each argument after ``x, y``.
        jit_compile: compile with XLA.
    """

    def __init__(self, fn: Callable, extra_specs: Sequence[tf.TensorSpec] = (), jit_compile=False):
        self._fn = fn
        self._extra_specs = list(extra_specs)
        self._jit_compile = bool(jit_compile)
        self._compiled: dict[str, GraphFunction] = {}

    def __call__(self, x, y, *extra):
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        y = tf.nest.map_structure(tf.convert_to_tensor, y)
        specs = tf.nest.map_structure(_relaxed_spec, (x, y))
        key = repr(specs)
        if key not in self._compiled:
            self._compiled[key] = GraphFunction(
                self._fn,
                loop=self.loop,
                input_signature=[specs[0], specs[1], *self._extra_specs],
                jit_compile=self._jit_compile or None,
            )
        return self._compiled[key](x, y, *extra)

    @property
    def loop(self) -> bool:
        """Whether the function loops where pfor cannot vectorise (see ``GraphFunction``)."""
        return any(f.loop for f in self._compiled.values())

    def tracing_count(self) -> int:
        """Total traces over every input structure seen so far."""
        return sum(f.experimental_get_tracing_count() for f in self._compiled.values())


# -- traces shared between owners of the same configuration -----------------------------
class _Same:
    """A key part equal only for the very same live object, held by a weak reference.

    An object that cannot be weakly referenced is equal only to this key part itself,
    so nothing keyed on it is ever shared (never wrong, never kept alive).
    """

    __slots__ = ("_id", "_ref")

    def __init__(self, obj):
        self._id = id(obj)
        try:
            self._ref = weakref.ref(obj)
        except TypeError:
            self._ref = None

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, _Same) or self._ref is None or other._ref is None:
            return False
        target = self._ref()
        return target is not None and target is other._ref()

    def __hash__(self):
        return self._id


def _config_key(obj):
    """``(class, config)`` of a built-in Keras object, else the object's identity.

    A built-in loss or regulariser rebuilt from the same config computes the same
    thing; anything else (a custom class, a plain function) is only itself.
    """
    kind = type(obj)
    if kind.__module__.startswith("keras.") and hasattr(obj, "get_config"):
        try:
            config = repr(sorted(obj.get_config().items()))
        except Exception:  # noqa: BLE001 - an unreadable config only means "not shared"
            return _Same(obj)
        inner = getattr(obj, "fn", None)
        extra = repr(getattr(obj, "_fn_kwargs", None)), repr(getattr(obj, "dtype", None))
        return (kind, config, extra, None if inner is None else _Same(inner))
    return _Same(obj)


def objective_key(objective) -> tuple:
    """What a trace of ``objective``'s loss, regularisation and parameters depends on.

    Never the ``Objective`` instance (every ``InfluenceModel`` makes its own): the
    chosen variables, the loss (class and config of a built-in Keras loss, else the
    very function), every regulariser of a trainable variable, and the layers run in
    full precision. Weights are read live from the variables, so they are not part
    of it. Only meaningful together with the model (see ``shared_function``).
    """
    model = objective.model
    variables = tuple(
        (_Same(v), tuple(v.shape), str(v.dtype), getattr(v, "path", None) or v.name)
        for v in objective.variables
    )
    regularizers = tuple(
        (_Same(v), _config_key(v.regularizer))
        for v in model.trainable_variables
        if getattr(v, "regularizer", None) is not None
    )
    precision = tuple(
        (_Same(layer), str(getattr(layer.dtype_policy, "name", layer.dtype_policy)))
        for layer in getattr(objective, "_low_precision_layers", ())
    )
    return (variables, _config_key(objective.loss_fn), regularizers, precision)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weak(obj) -> weakref.ref | None:
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


_TRACES = [0]


def tracing_count() -> int:
    """How many times a shared function's Python body ran (traces, in this process)."""
    return _TRACES[0]


class SharedFunction:
    """A compiled method, traced once for every owner with the same configuration.

    ``compile(body)`` builds the compiled callable (a ``GraphFunction``,
    ``BatchFunction`` or ``SpecFunction``) of ``body``, a Python function that runs
    the method ``name`` of whichever owner is calling. The owner is bound only for
    the duration of a call, so the function keeps no reference to it (or to its
    model) and can live in a cache keyed weakly by the model.

    Args:
        name: the owner's method that the traced body runs.
        compile: ``body -> compiled callable``.
        model: the Keras model the body differentiates (held weakly), named by the
            warning if pfor cannot vectorise it (``tf_influence/engine/vectorize.py``).
        method: instead of the method ``name``, a function ``method(owner, *args)``
            (it must hold no owner itself).
        key: the configuration it is shared under (``shared_function``); with the
            name, what a trace kept on disk is keyed by (``trace_cache``).
    """

    def __init__(
        self,
        name: str,
        compile: Callable,
        model: keras.Model | None = None,
        method: Callable | None = None,
        key: Any = None,
    ):
        self.name = name
        self.key = key
        self._owner = None
        self._model = _weak(model)

        def body(*args):
            _TRACES[0] += 1
            if method is not None:
                return method(self._owner, *args)
            return getattr(self._owner, name)(*args)

        self.function = compile(body)

    def __call__(self, owner, *args):
        previous, self._owner = self._owner, owner
        model = None if self._model is None else self._model()
        kept = (
            trace_cache.identity(self._model, (self.name, self.key))
            if self.key is not None and trace_cache.directory() is not None
            else contextlib.nullcontext()
        )
        try:
            with vectorize.model_scope(model), kept:
                return self.function(*args)
        finally:
            self._owner = previous

    @property
    def loop(self) -> bool:
        """Whether the compiled function loops where pfor cannot vectorise."""
        return bool(getattr(self.function, "loop", False))

    def tracing_count(self) -> int:
        counter = getattr(self.function, "tracing_count", None)
        if counter is None:
            counter = self.function.experimental_get_tracing_count
        return counter()


class BoundFunction:
    """A ``SharedFunction`` called on one owner: ``f(*args)`` is ``shared(owner, *args)``."""

    def __init__(self, shared: SharedFunction, owner):
        self.shared = shared
        self._owner = weakref.ref(owner)

    def __call__(self, *args):
        return self.shared(self._owner(), *args)

    @property
    def autograph(self) -> bool:
        """Whether the compiled function converts with autograph (see ``GraphFunction``)."""
        return bool(getattr(self.shared.function, "autograph", False))

    @property
    def loop(self) -> bool:
        """Whether the compiled function loops where pfor cannot vectorise (``GraphFunction``)."""
        return self.shared.loop

    def tracing_count(self) -> int:
        """Traces of the shared function, by this owner and every other one."""
        return self.shared.tracing_count()

    experimental_get_tracing_count = tracing_count


def shared_function(
    owner, model, key, name: str, compile: Callable, method: Callable | None = None
) -> BoundFunction:
    """``owner``'s method ``name`` compiled once per ``(model, key)`` and bound to ``owner``.

    The cache is keyed weakly by the model: once the model is garbage, so are its
    traces. ``key`` must hold everything the trace depends on besides the argument
    shapes (see ``objective_key``); ``key=None`` compiles for ``owner`` alone.

    Args:
        owner: the object whose method the trace runs (an operator, gradients).
        model: the Keras model the trace reads the variables of.
        key: hashable configuration, or None not to share.
        name: the method of ``owner`` to compile.
        compile: ``body -> compiled callable`` (e.g. ``lambda f: GraphFunction(f)``).
        method: a function ``method(owner, *args)`` to compile instead of the method
            ``name`` (``name`` then only keys the cache).
    """
    if key is None:
        return BoundFunction(SharedFunction(name, compile, model, method), owner)
    try:
        entries = _SHARED.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: traces of its own
        return BoundFunction(SharedFunction(name, compile, model, method), owner)
    full_key = (name, key)
    shared = entries.get(full_key)
    if shared is None:
        shared = entries[full_key] = SharedFunction(name, compile, model, method, key)
    return BoundFunction(shared, owner)


def _spec(value, relaxed: bool, free: bool = False):
    if isinstance(value, tf.data.Dataset):
        return tf.type_spec_from_value(value)
    if free:
        return tf.TensorSpec([None] * value.shape.rank, value.dtype)
    return _relaxed_spec(value) if relaxed else tf.TensorSpec.from_tensor(value)


class SpecFunction:
    """A ``GraphFunction`` per argument structure, shape and dtype, some axes left free.

    Arguments at the positions in ``relaxed`` get an unknown leading axis on every
    tensor leaf (so a training set of another size reuses the trace), those in
    ``free`` unknown sizes on every axis; the others keep their static shapes.
    Datasets pass as they are (their ``element_spec`` keys it).

    Args:
        fn: the Python function to compile.
        relaxed: positions of the arguments whose leading axis is free.
        autograph, jit_compile: as for ``GraphFunction``.
        free: positions of the arguments whose every axis is free.
    """

    def __init__(self, fn: Callable, relaxed=(), autograph=False, jit_compile=False, free=()):
        self._fn = fn
        self._relaxed = set(relaxed)
        self._free = set(free)
        self._autograph = bool(autograph)
        self._jit_compile = bool(jit_compile)
        self._compiled: dict[str, GraphFunction] = {}

    def __call__(self, *args):
        args = [
            tf.nest.map_structure(
                lambda t: t if isinstance(t, tf.data.Dataset) else tf.convert_to_tensor(t), a
            )
            for a in args
        ]
        specs = [
            tf.nest.map_structure(
                lambda t, r=i in self._relaxed, f=i in self._free: _spec(t, r, f), a
            )
            for i, a in enumerate(args)
        ]
        key = repr(specs)
        if key not in self._compiled:
            self._compiled[key] = GraphFunction(
                self._fn,
                autograph=self._autograph,
                loop=self.loop,
                input_signature=specs,
                jit_compile=self._jit_compile or None,
            )
        return self._compiled[key](*args)

    @property
    def autograph(self) -> bool:
        return self._autograph or any(f.autograph for f in self._compiled.values())

    @property
    def loop(self) -> bool:
        """Whether the function loops where pfor cannot vectorise (see ``GraphFunction``)."""
        return any(f.loop for f in self._compiled.values())

    def tracing_count(self) -> int:
        return sum(f.experimental_get_tracing_count() for f in self._compiled.values())
