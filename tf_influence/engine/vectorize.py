"""Vectorising a function over columns or examples inside the graph.

Every per-column product and per-example gradient of the engine goes through
``vectorized_map``, so that how the vectorisation is done (TensorFlow's pfor
today) is decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf


def vectorized_map(fn: Callable[[Any], Any], elems: Any) -> Any:
    """``fn`` applied to every slice of ``elems`` along the first axis, results stacked.

    Args:
        fn: a function of one slice (a nest of tensors without the leading axis).
        elems: a nest of tensors sharing the leading axis.

    Returns:
        The nest ``fn`` returns, each tensor with the leading axis added.
    """
    return tf.vectorized_map(fn, elems)
