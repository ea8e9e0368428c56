"""Compiling per-batch functions once per input structure, with a free batch axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf


def _relaxed_spec(tensor) -> tf.TensorSpec:
    tensor = tf.convert_to_tensor(tensor)
    shape = tensor.shape
    if shape.rank is None or shape.rank == 0:
        return tf.TensorSpec(shape, tensor.dtype)
    return tf.TensorSpec([None] + shape.as_list()[1:], tensor.dtype)


class GraphFunction:
    """``tf.function(fn)`` without autograph, retraced with it if the code needs it.

    Our own functions write their loops with ``tf.while_loop`` / ``tf.cond``, and
    Keras 3 runs models and losses without autograph in ``fit``, so conversion is
    usually wasted: it took about 0.7 s of ``fit`` and 1.2 s of the first
    ``explain`` on the digits MLP (``benchmarks/first_call.py``). A loss that
    branches in Python on a tensor (which only works in a ``tf.function`` with
    autograph) raises ``OperatorNotAllowedInGraphError`` while tracing; the
    function is then compiled again with autograph, once, and keeps it.
    ``autograph=True`` converts from the start (a loop over a distributed dataset
    needs it).
    """

    def __init__(self, fn: Callable, autograph=False, **kwargs):
        self._fn = fn
        self._kwargs = kwargs
        self.autograph = bool(autograph)
        self._function = tf.function(fn, autograph=self.autograph, **kwargs)

    def __call__(self, *args, **kwargs):
        try:
            return self._function(*args, **kwargs)
        except tf.errors.OperatorNotAllowedInGraphError:
            if self.autograph:
                raise
            self.autograph = True
            self._function = tf.function(self._fn, autograph=True, **self._kwargs)
            return self._function(*args, **kwargs)

    def experimental_get_tracing_count(self) -> int:
        return self._function.experimental_get_tracing_count()


class BatchFunction:
    """A ``tf.function`` of ``(x, y, *extra)`` traced once per structure, rank and dtype.

    The leading (batch) axis of every leaf of ``x`` and ``y`` is left unknown, so a
    short last batch or a different number of test points does not retrace, while
    ranks stay known (Keras losses need them). ``extra`` arguments get the given
    fixed specs. Each structure gets a ``GraphFunction``: no autograph unless
    tracing shows the code needs it.

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
                input_signature=[specs[0], specs[1], *self._extra_specs],
                jit_compile=self._jit_compile or None,
            )
        return self._compiled[key](x, y, *extra)

    def tracing_count(self) -> int:
        """Total traces over every input structure seen so far."""
        return sum(f.experimental_get_tracing_count() for f in self._compiled.values())
