"""Recycled search directions: what block CG keeps between solves on one operator.

The Hessian does not change between solves until the next ``fit``, so ``CG`` keeps
the search directions a solve explored, with their products, in a
``RecycledSpace`` on the operator; the next solve is deflated by them (see
``krylov.block_cg``). This file holds the space (new directions made orthonormal
to it, Ritz vectors when it overflows), how many directions it keeps
(``recycle_capacity``, with ``recycle="auto"``'s sizing from the forward flops)
and its small helpers, each compiled once per dtype.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tf_influence.solvers.krylov import positive_inverse

if TYPE_CHECKING:
    from tf_influence.solvers.base import CurvatureOperator

# A new direction joins the recycled space only if at least this fraction of its
# norm lies outside the space (bounds how much rounding in A W is amplified).
RECYCLE_NOVELTY = 0.1
# recycle="auto" keeps at most RECYCLE_PER_FLOP * n * F / p directions (F: forward
# flops per example, n examples, p parameters). A product with one column costs about
# 5 n F flops (1.7 gradients of 3 forwards), the projections on m kept directions
# about 8 p m per column and iteration, so this keeps them below 1/7 of a product's
# flops (they are bound by memory bandwidth, so in time about 1/5 on the digits MLP,
# where it gives 258 directions; the CNN gets about 2,200).
RECYCLE_PER_FLOP = 0.09
# recycle="auto" when the forward flops cannot be counted.
RECYCLE_FALLBACK = 256

# model -> {(trace key, example specs): forward flops}, see ``forward_flops``.
_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def recycle_capacity(
    operator: CurvatureOperator, recycle: int | str, budget: int, count: bool = True
) -> int:
    """How many directions to keep on ``operator``.

    Args:
        operator: the curvature operator.
        recycle: the most directions wanted, or ``"auto"`` for
            ``ceil(RECYCLE_PER_FLOP * n * F / p)`` (``F`` from ``forward_flops``;
            ``RECYCLE_FALLBACK`` if it cannot be counted).
        budget: the most values the directions and their products may hold
            together (``2 * p`` per direction).
        count: False gives an upper bound without counting flops (``"auto"`` is
            taken as unbounded).

    Returns:
        ``min(recycle, budget // (2 * p), p // 2)``; 0 or less means no recycling.
    """
    p = operator.num_params
    wanted = recycle
    if wanted == "auto" and not count:
        wanted = p
    elif wanted == "auto":
        flops = forward_flops(operator)
        if flops is None:
            wanted = RECYCLE_FALLBACK
        else:
            wanted = math.ceil(RECYCLE_PER_FLOP * operator.num_examples * flops / p)
    return min(wanted, budget // (2 * p), p // 2)


def forward_flops(operator: CurvatureOperator) -> float | None:
    """Flops of the per-example loss on one training example, or None if not countable.

    Counted by TensorFlow's profiler on the graph of one example (matrix products
    and convolutions; elementwise work is left out). Cached on the operator, and per
    model (weakly) for every operator of the same configuration.
    """

    def count() -> float | None:
        try:
            first = operator.data.first_batch()
            one = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t)[:1], tuple(first))
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), one)
        except Exception:  # noqa: BLE001 - any failure only means "use the fallback"
            return None
        # The same model, configuration and example shapes count the same flops: a
        # new InfluenceModel on the model does not trace the loss again to count them.
        trace_key = getattr(operator, "trace_key", None)
        model = getattr(operator.objective, "model", None)
        if trace_key is None or model is None:
            return count_for(specs)
        try:
            known = _FLOPS.setdefault(model, {})
        except TypeError:  # a model that cannot be weakly referenced
            return count_for(specs)
        key = (trace_key, repr(specs))
        if key not in known:
            known[key] = count_for(specs)
        return known[key]

    def count_for(specs: Any) -> float | None:
        try:
            objective = operator.objective
            y_spec = specs[1] if len(specs) > 1 else None
            graph = (
                tf.function(objective.per_example_loss, autograph=False)
                .get_concrete_function(specs[0], y_spec)
                .graph
            )
            options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
            options["output"] = "none"
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")  # the profiler warns about a deprecated helper it uses
            try:
                total = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops
            finally:
                logger.setLevel(level)
        except Exception:  # noqa: BLE001 - any failure only means "use the fallback"
            return None
        return float(total) if total > 0 else None

    return operator.cached("forward_flops", count)


class RecycledSpace:
    """Directions kept from earlier solves on one operator, and their products.

    Holds an orthonormal ``w`` (p, m), ``aw = A w``, ``e = w^T A w`` and its inverse.
    It lives in the operator's cache, which is cleared when the weights change, so
    the products always belong to the current Hessian.
    """

    def __init__(self, capacity: int | None, bound: int | None = None) -> None:
        """``capacity``: the most directions kept, or None until it is counted (set it
        before the space takes directions in: see ``needs_capacity``); ``bound``: an
        upper bound of it."""
        self.capacity = capacity
        self.bound = capacity if bound is None else int(bound)
        self.w = self.aw = self.e = self.e_inv = None
        self._pending: list[tuple[tf.Tensor, tf.Tensor, int]] = []

    @property
    def needs_capacity(self) -> bool:
        """True when directions wait to be taken in and the capacity is not set."""
        return self.capacity is None and bool(self._pending)

    def room(self, k: int) -> int:
        """Blocks of ``k`` directions a solve should record: enough to fill the space.

        Before the capacity is set (the first solve), its bound: what is recorded
        beyond the capacity is dropped when the directions are taken in.
        """
        if self.capacity is None:
            return math.ceil(self.bound / k)
        return max(0, math.ceil((self.capacity - self.width) / k))

    @property
    def width(self) -> int:
        """How many directions the space holds now."""
        self._settle()
        return 0 if self.w is None else int(self.w.shape[1])

    def tensors(self, operator: CurvatureOperator) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(w, aw, e_inv)``, empty ``(p, 0)``/``(0, 0)`` tensors before any solve."""
        self._settle()
        if self.w is None:
            empty = tf.zeros([operator.num_params, 0], operator.dtype)
            return empty, empty, tf.zeros([0, 0], operator.dtype)
        return self.w, self.aw, self.e_inv

    def extend(self, directions: tf.Tensor, products: tf.Tensor, k: int) -> None:
        """Adds a solve's search directions until the space is full.

        When they would overflow it, the Ritz vectors of the largest values are
        kept. A full space stays as it is: refreshing it would cost about one CG
        iteration per solve. The directions are taken in when a later solve reads
        the space (``width`` or ``tensors``), so the solve that found them returns
        without that work (on the digits MLP, 0.3 s of the first answer). The helpers
        run eagerly: once per solve, on small matrices, a trace would cost more than
        they compute, and the growing space would need one per size.

        Args:
            directions: ``(p, j * k)``, the recorded blocks of a solve's directions.
            products: ``(p, j * k)``, their products.
            k: the width of a block (the solve's number of columns).
        """
        if int(directions.shape[1]) > 0:
            self._pending.append((directions, products, k))

    def _settle(self) -> None:
        if self.needs_capacity:
            raise RuntimeError("RecycledSpace.capacity must be set before it is read.")
        pending, self._pending = self._pending, []
        for directions, products, k in pending:
            self._extend_now(directions, products, k)

    def _extend_now(self, directions: tf.Tensor, products: tf.Tensor, k: int) -> None:
        held = 0 if self.w is None else int(self.w.shape[1])
        if held >= self.capacity:
            return
        # The whole blocks that fill the space (a solve recorded up to ``bound``).
        keep = math.ceil((self.capacity - held) / k) * k
        directions, products = directions[:, :keep], products[:, :keep]
        if self.w is None:
            self.w = tf.zeros_like(directions[:, :0])
            self.aw = self.w
            self.e = tf.zeros([0, 0], tf.float64)
        w, aw, e = append_directions(self.w, self.aw, self.e, directions, products)
        if int(w.shape[1]) > self.capacity:
            w, aw, e = keep_largest(w, aw, e, tf.constant(self.capacity))
        e_inv, ok = inverse_if_positive(e)
        if bool(ok):
            self.w, self.aw, self.e, self.e_inv = w, aw, e, tf.cast(e_inv, w.dtype)
        else:  # not positive definite along the kept space: start afresh next time
            self.w = self.aw = self.e = self.e_inv = None


def append_directions(
    w: tf.Tensor, aw: tf.Tensor, e: tf.Tensor, directions: tf.Tensor, products: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``[w, new]``, ``[aw, A new]`` and ``[w, new]^T A [w, new]`` (float64).

    New directions are made orthogonal to ``w`` and orthonormal; any with less than
    ``RECYCLE_NOVELTY`` of its norm outside ``w`` is dropped, so that rounding in the
    products is amplified at most ``1 / RECYCLE_NOVELTY`` times.
    """
    c = tf.matmul(w, directions, transpose_a=True)
    d = directions - tf.matmul(w, c)
    ad = products - tf.matmul(aw, c)
    d64 = tf.cast(d, tf.float64)
    values, vectors = tf.linalg.eigh(tf.matmul(d64, d64, transpose_a=True))
    keep = values > RECYCLE_NOVELTY**2
    scale = tf.boolean_mask(vectors, keep, axis=1) / tf.sqrt(tf.boolean_mask(values, keep))
    scale = tf.cast(scale, w.dtype)
    new, a_new = tf.matmul(d, scale), tf.matmul(ad, scale)
    cross = tf.cast(tf.matmul(aw, new, transpose_a=True), tf.float64)  # w^T A new
    corner = _symmetric64(tf.matmul(new, a_new, transpose_a=True))
    e = tf.concat(
        [tf.concat([e, cross], axis=1), tf.concat([tf.transpose(cross), corner], axis=1)],
        axis=0,
    )
    return tf.concat([w, new], axis=1), tf.concat([aw, a_new], axis=1), e


def keep_largest(
    w: tf.Tensor, aw: tf.Tensor, e: tf.Tensor, capacity: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Rayleigh-Ritz: the ``capacity`` Ritz vectors of ``w`` with the largest values."""
    ritz, rotation = tf.linalg.eigh(e)  # ascending
    ritz, rotation = ritz[-capacity:], tf.cast(rotation[:, -capacity:], w.dtype)
    return tf.matmul(w, rotation), tf.matmul(aw, rotation), tf.linalg.diag(ritz)


def inverse_if_positive(e: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(inv(e), ok)``: ``ok`` is False unless ``e`` is positive definite."""
    values, vectors = tf.linalg.eigh(e)
    ok = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(values)),
        tf.reduce_min(tf.concat([values, tf.ones([1], tf.float64)], 0)) > 0,
    )
    return positive_inverse(values, vectors), ok


def _symmetric64(matrix: tf.Tensor) -> tf.Tensor:
    matrix = tf.cast(matrix, tf.float64)
    return 0.5 * (matrix + tf.transpose(matrix))
