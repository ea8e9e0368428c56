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


class BatchFunction:
    """A ``tf.function`` of ``(x, y, *extra)`` traced once per structure, rank and dtype.

    The leading (batch) axis of every leaf of ``x`` and ``y`` is left unknown, so a
    short last batch or a different number of test points does not retrace, while
    ranks stay known (Keras losses need them). ``extra`` arguments get the given
    fixed specs.

    Args:
        fn: the Python function to compile.
        extra_specs: ``tf.TensorSpec`` for each argument after ``x, y``.
        jit_compile: compile with XLA.
    """

    def __init__(self, fn: Callable, extra_specs: Sequence[tf.TensorSpec] = (), jit_compile=False):
        self._fn = fn
        self._extra_specs = list(extra_specs)
        self._jit_compile = bool(jit_compile)
        self._compiled: dict[str, tf.types.experimental.GenericFunction] = {}

    def __call__(self, x, y, *extra):
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        y = tf.nest.map_structure(tf.convert_to_tensor, y)
        specs = tf.nest.map_structure(_relaxed_spec, (x, y))
        key = repr(specs)
        if key not in self._compiled:
            signature = [specs[0], specs[1], *self._extra_specs]
            self._compiled[key] = tf.function(
                self._fn, input_signature=signature, jit_compile=self._jit_compile or None
            )
        return self._compiled[key](x, y, *extra)

    def tracing_count(self) -> int:
        """Total traces over every input structure seen so far."""
        return sum(f.experimental_get_tracing_count() for f in self._compiled.values())
