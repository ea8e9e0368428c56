"""Conjugate gradients, matrix-free, for several right-hand sides at once."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_influence.solvers.base import (
    CurvatureError,
    Diagnostics,
    Solver,
    check_positive_float,
    check_positive_int,
    nice_ceil,
)

# Most values a recycled space holds (its directions W and their products A W), per
# operator: 2**26 is 256 MiB in float32.
RECYCLE_BUDGET = 2**26
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


class CG(Solver):
    """Conjugate gradients on ``(H + damping*I) x = b`` inside one ``tf.function``.

    With several right-hand sides, ``block=True`` (the default) runs block CG:
    the columns share one Krylov space, so each iteration searches along all of
    their residuals at once and every column converges in fewer iterations (on
    the digits MLP, 10 instead of 20 for 20 test points). ``block=False`` runs
    one independent CG recursion per column, all sharing one batched
    Hessian-vector product per iteration. Either way a column stops changing
    once ``|r| <= tol * |b|``, and nothing leaves the graph until the end.
    Blocks hold at most ``MAX_BLOCK`` columns; wider right-hand sides are
    solved block by block.

    Recycling (``recycle > 0``, block CG only): the Hessian does not change
    between solves until the next ``fit``, so solves keep the search directions
    they explored, with their products, on the operator, until ``recycle`` are
    kept. A later solve starts from the best solution in their span and
    searches only directions conjugate to it (deflated CG), which costs no
    extra Hessian-vector product. When more directions come than fit, the Ritz
    vectors of the largest eigenvalues are kept, the ones that slow CG down.
    A full space is not refreshed. On the digits MLP, 20 new
    test points then take 5 iterations instead of 10; on the digits CNN 3
    instead of 9. Results still meet ``tol``;
    they depend on earlier solves only within it. ``recycle=0`` makes every
    solve independent of the ones before. ``diagnostics.info["recycled_directions"]``
    is how many directions the (last block's) solve started from.

    Args:
        tol: relative residual at which a column has converged.
        max_iter: most iterations; None means ``min(num_params, 1000)``.
        hessian_sample_size: if given, H is estimated on a fixed random subset of
            this many training examples (drawn with ``seed``), so each iteration
            costs a pass over the subset instead of the whole training set. The
            subset stays fixed during the solve (CG needs a fixed matrix); the
            residual is measured against that subsampled H.
        seed: seed of the subset.
        block: block CG (shared Krylov space) for several right-hand sides.
        recycle: most directions kept from earlier solves on the same fitted
            model (0 turns recycling off). ``"auto"`` (default) keeps as many as
            cost at most about a seventh of a Hessian-vector product's flops to
            project on (``RECYCLE_PER_FLOP * n * F / p``, with ``F`` the forward
            flops per example, counted by TensorFlow's profiler; 258 on the digits
            MLP, about 2,200 on the digits CNN, whose products cost more per
            parameter; ``RECYCLE_FALLBACK`` if they cannot be counted). Always
            capped so that the directions and their products take at most
            ``RECYCLE_BUDGET`` values, and at half the number of parameters.

    Raises:
        CurvatureError: a direction of non-positive curvature ``p^T H p <= 0``
            was met (H + damping*I is not positive definite); the message
            suggests a damping.

    References:
        Hestenes & Stiefel (1952); O'Leary, "The block conjugate gradient
        algorithm and related methods" (1980); Dubrulle, "Retooling the method of
        block conjugate gradients" (2001); Saad, Yeung, Erhel & Guyomarc'h, "A
        deflated version of the conjugate gradient algorithm" (2000); Parks, de
        Sturler et al., "Recycling Krylov subspaces for sequences of linear
        systems" (2006); Martens, "Deep learning via Hessian-free optimization"
        (ICML 2010); Koh & Liang (ICML 2017).
    """

    name = "cg"
    MAX_BLOCK = 64

    def __init__(
        self,
        tol: float = 1e-6,
        max_iter: int | None = None,
        hessian_sample_size: int | None = None,
        seed: int = 0,
        block: bool = True,
        recycle: int | str = "auto",
    ):
        self.tol = check_positive_float("tol", tol)
        self.max_iter = check_positive_int("max_iter", max_iter, allow_none=True)
        self.hessian_sample_size = check_positive_int(
            "hessian_sample_size", hessian_sample_size, allow_none=True
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Argument `seed` must be an integer. Received: seed={seed!r}")
        self.seed = seed
        if not isinstance(block, bool):
            raise ValueError(f"Argument `block` must be True or False. Received: block={block!r}")
        self.block = block
        if recycle != "auto" and (
            isinstance(recycle, bool) or not isinstance(recycle, (int, np.integer)) or recycle < 0
        ):
            raise ValueError(
                'Argument `recycle` must be "auto" or a non-negative integer (0 turns '
                f"recycling off). Received: recycle={recycle!r}"
            )
        self.recycle = recycle if recycle == "auto" else int(recycle)

    def get_config(self):
        return {
            "tol": self.tol,
            "max_iter": self.max_iter,
            "hessian_sample_size": self.hessian_sample_size,
            "seed": self.seed,
            "block": self.block,
            "recycle": self.recycle,
        }

    def _max_iter(self, operator):
        return self.max_iter or min(operator.num_params, 1000)

    def _graph(self, operator):
        max_iter = self._max_iter(operator)
        tol = self.tol

        def run(rhs):
            # Block CG needs as many independent directions as columns.
            k = rhs.shape[1]
            if self.block and k is not None and 1 < k <= operator.num_params:
                return block_cg(operator, rhs, tol, max_iter)
            return column_cg(operator, rhs, tol, max_iter)

        # Traced per number of right-hand sides, so that one column takes the cheaper
        # single-vector product. The solvers use tf.while_loop / tf.cond explicitly, so
        # autograph is off: converting them cost about 1 s of the first explain.
        return tf.function(run, autograph=False)

    def _recycle_capacity(self, operator) -> int:
        p = operator.num_params
        wanted = self.recycle
        if wanted == "auto":
            flops = forward_flops(operator)
            if flops is None:
                wanted = RECYCLE_FALLBACK
            else:
                wanted = math.ceil(RECYCLE_PER_FLOP * operator.num_examples * flops / p)
        return min(wanted, RECYCLE_BUDGET // (2 * p), p // 2)

    def _recycling_graph(self, operator, k, capacity):
        """Deflated block CG for ``k`` columns, traced once for any recycled width."""
        max_iter = self._max_iter(operator)
        tol = self.tol
        p = operator.num_params
        dtype = operator.dtype
        wide = tf.TensorSpec([p, None], dtype)

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec([p, k], dtype),
                wide,
                wide,
                tf.TensorSpec([None, None], dtype),
                tf.TensorSpec([], tf.int32),
            ],
        )
        def run(rhs, w, aw, e_inv, record):
            return block_cg(operator, rhs, tol, max_iter, space=(w, aw, e_inv), record=record)

        return run

    def _recycled(self, operator, k):
        """The operator's recycled space, or None if this solve does not recycle."""
        capacity = self._recycle_capacity(operator)
        if not self.block or capacity < 1 or k > operator.num_params - capacity:
            return None
        return operator.cached(("cg.recycled", capacity), lambda: RecycledSpace(capacity))

    def solve(self, operator, rhs):
        if self.hessian_sample_size is not None:
            operator = operator.subsample(self.hessian_sample_size, self.seed)
        rhs = tf.convert_to_tensor(rhs, operator.dtype)
        parts, recycled = [], 0
        for start in range(0, max(int(rhs.shape[1]), 1), self.MAX_BLOCK):
            chunk = rhs[:, start : start + self.MAX_BLOCK]
            k = int(chunk.shape[1])
            space = self._recycled(operator, k)
            if space is None:
                graph = operator.cached(
                    ("cg",) + tuple(self.get_config().values()), lambda: self._graph(operator)
                )
                parts.append(graph(chunk))
                continue
            graph = operator.cached(
                ("cg.recycling", k, space.capacity) + tuple(self.get_config().values()),
                lambda k=k, c=space.capacity: self._recycling_graph(operator, k, c),
            )
            recycled = space.width
            # Record no more blocks of directions than the space has room for.
            record = math.ceil((space.capacity - space.width) / k)
            *out, directions, products = graph(chunk, *space.tensors(operator), record)
            if not out[3].numpy().any():
                space.extend(directions, products)
            parts.append(out)
        x = tf.concat([part[0] for part in parts], axis=1)
        iterations = max(int(part[1]) for part in parts)
        residual, bad, rayleigh = (
            np.concatenate([part[i].numpy() for part in parts]) for i in (2, 3, 4)
        )
        if bad.any():
            quotient = float(rayleigh[bad].min())
            suggestion = nice_ceil(operator.damping + 2 * abs(quotient) + 1e-8)
            raise CurvatureError(
                "Conjugate gradients met a direction of non-positive curvature "
                f"(p^T (H + damping*I) p / p^T p = {quotient:.3e} <= 0), so H + damping*I is not "
                f"positive definite and influence is not defined. Received: damping="
                f"{operator.damping}. Pass a larger damping to `compile`, e.g. damping="
                f"{suggestion:.2g} (the smallest eigenvalue is at most {quotient:.3e}; "
                "solver='exact' reports it exactly on small models)."
            )
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=int(iterations),
            residual_norm=residual,
            converged=residual <= self.tol,
            info={"recycled_directions": recycled},
        )
        return x, diagnostics


def forward_flops(operator) -> float | None:
    """Flops of the per-example loss on one training example, or None if not countable.

    Counted by TensorFlow's profiler on the graph of one example (matrix products
    and convolutions; elementwise work is left out). Cached on the operator.
    """

    def count():
        try:
            first = next(iter(operator.data.batches()))
            one = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t)[:1], tuple(first))
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), one)
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

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.w = self.aw = self.e = self.e_inv = None

    @property
    def width(self) -> int:
        return 0 if self.w is None else int(self.w.shape[1])

    def tensors(self, operator):
        if self.w is None:
            empty = tf.zeros([operator.num_params, 0], operator.dtype)
            return empty, empty, tf.zeros([0, 0], operator.dtype)
        return self.w, self.aw, self.e_inv

    def extend(self, directions, products):
        """Adds a solve's search directions until the space is full.

        When they would overflow it, the Ritz vectors of the largest values are
        kept. A full space stays as it is: refreshing it would cost about one CG
        iteration per solve.
        """
        if int(directions.shape[1]) == 0 or self.width >= self.capacity:
            return
        if self.w is None:
            self.w = tf.zeros_like(directions[:, :0])
            self.aw = self.w
            self.e = tf.zeros([0, 0], tf.float64)
        w, aw, e = _append(self.w, self.aw, self.e, directions, products)
        if int(w.shape[1]) > self.capacity:
            w, aw, e = _keep_largest(w, aw, e, tf.constant(self.capacity))
        e_inv, ok = _inverse_if_positive(e)
        if bool(ok):
            self.w, self.aw, self.e, self.e_inv = w, aw, e, tf.cast(e_inv, w.dtype)
        else:  # not positive definite along the kept space: start afresh next time
            self.w = self.aw = self.e = self.e_inv = None


def append_directions(w, aw, e, directions, products):
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


def keep_largest(w, aw, e, capacity):
    """Rayleigh-Ritz: the ``capacity`` Ritz vectors of ``w`` with the largest values."""
    ritz, rotation = tf.linalg.eigh(e)  # ascending
    ritz, rotation = ritz[-capacity:], tf.cast(rotation[:, -capacity:], w.dtype)
    return tf.matmul(w, rotation), tf.matmul(aw, rotation), tf.linalg.diag(ritz)


def inverse_if_positive(e):
    """``(inv(e), ok)``: ``ok`` is False unless ``e`` is positive definite."""
    values, vectors = tf.linalg.eigh(e)
    ok = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(values)),
        tf.reduce_min(tf.concat([values, tf.ones([1], tf.float64)], 0)) > 0,
    )
    return _positive_inverse(values, vectors), ok


def _positive_inverse(values, vectors):
    """The inverse of ``vectors @ diag(values) @ vectors^T`` on its positive eigenvalues."""
    safe = tf.where(values > 0, values, tf.ones_like(values))
    return tf.matmul(vectors / safe, vectors, transpose_b=True)


class _AnySize:
    """``fn`` compiled once per dtype with every dimension unknown.

    ``reduce_retracing`` would trace twice (the first sizes, then relaxed ones),
    and the second trace would land on the second ``explain``.
    """

    def __init__(self, fn):
        self._function = tf.function(fn, autograph=False)
        self._concrete = {}

    def __call__(self, *args):
        args = [tf.convert_to_tensor(a) for a in args]
        key = tuple((a.dtype, a.shape.rank) for a in args)
        if key not in self._concrete:
            specs = [tf.TensorSpec([None] * a.shape.rank, a.dtype) for a in args]
            self._concrete[key] = self._function.get_concrete_function(*specs)
        return self._concrete[key](*args)

    def experimental_get_tracing_count(self) -> int:
        return self._function.experimental_get_tracing_count()


_append = _AnySize(append_directions)
_keep_largest = _AnySize(keep_largest)
_inverse_if_positive = _AnySize(inverse_if_positive)


def _symmetric64(matrix):
    matrix = tf.cast(matrix, tf.float64)
    return 0.5 * (matrix + tf.transpose(matrix))


def orthonormal_columns(a):
    """An orthonormal basis of ``a``'s columns (the Q of a thin QR).

    Shifted Cholesky QR (Fukaya et al. 2020), twice, in float64 on columns scaled
    to unit norm: all matrix products, several times faster than Householder QR
    for tall blocks. Falls back to Householder QR when a column is zero or the
    Gram matrix is too ill-conditioned for Cholesky, which shows as a result that
    is not orthonormal.
    """
    dtype = a.dtype
    q = tf.cast(a, tf.float64)
    q = tf.math.divide_no_nan(q, tf.norm(q, axis=0))
    k = tf.shape(q)[1]
    eye = tf.eye(k, dtype=tf.float64)
    for _ in range(2):
        gram = tf.matmul(q, q, transpose_a=True)
        shift = 1e-14 * tf.linalg.trace(gram) + 1e-300
        lower = tf.linalg.cholesky(gram + shift * eye)
        # q L^-T by one product with the small inverse: no (p, k) transposes.
        q = tf.matmul(q, tf.linalg.triangular_solve(lower, eye, lower=True), transpose_b=True)
    error = tf.reduce_max(tf.abs(tf.matmul(q, q, transpose_a=True) - eye))
    good = tf.logical_and(tf.math.is_finite(error), error < 1e-3)
    return tf.cond(good, lambda: tf.cast(q, dtype), lambda: tf.linalg.qr(a).q)


def column_cg(operator, rhs, tol, max_iter):
    """One CG recursion per column, sharing the batched product.

    Returns ``(x, iterations, relative residual, bad, rayleigh)``; ``bad`` flags columns
    that met non-positive curvature, ``rayleigh`` the quotient that showed it.
    """
    dtype = rhs.dtype
    rhs_norm = tf.norm(rhs, axis=0)
    threshold = tf.cast(tol, dtype) * rhs_norm
    x = tf.zeros_like(rhs)
    r = rhs
    p = r
    rs = tf.reduce_sum(r * r, axis=0)
    active = tf.sqrt(rs) > threshold
    bad = tf.zeros_like(active)
    rayleigh = tf.zeros_like(rs)
    i = tf.constant(0)

    def cond(i, x, r, p, rs, active, bad, rayleigh):
        return tf.logical_and(i < max_iter, tf.reduce_any(active))

    def body(i, x, r, p, rs, active, bad, rayleigh):
        ap = operator.matvec(p)
        pap = tf.reduce_sum(p * ap, axis=0)
        pp = tf.reduce_sum(p * p, axis=0)
        new_bad = tf.logical_and(active, pap <= 0)
        rayleigh = tf.where(new_bad, tf.math.divide_no_nan(pap, pp), rayleigh)
        bad = tf.logical_or(bad, new_bad)
        active = tf.logical_and(active, tf.logical_not(new_bad))
        alpha = tf.where(active, tf.math.divide_no_nan(rs, pap), tf.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = tf.reduce_sum(r * r, axis=0)
        beta = tf.where(active, tf.math.divide_no_nan(rs_new, rs), tf.zeros_like(rs))
        p = r + beta * p
        rs = tf.where(active, rs_new, rs)
        active = tf.logical_and(active, tf.sqrt(rs) > threshold)
        return i + 1, x, r, p, rs, active, bad, rayleigh

    i, x, r, p, rs, active, bad, rayleigh = tf.while_loop(
        cond, body, (i, x, r, p, rs, active, bad, rayleigh)
    )
    residual = tf.math.divide_no_nan(tf.sqrt(rs), rhs_norm)
    return x, i, residual, bad, rayleigh


def block_cg(operator, rhs, tol, max_iter, space=None, record=None):
    """Block CG: all columns share one Krylov space (same returns as ``column_cg``).

    The search block is re-orthonormalised every iteration, which keeps
    ``P^T A P`` as well conditioned as ``A`` itself even when residual columns
    become nearly dependent (Dubrulle's retooled variant). Step sizes come from
    the eigendecomposition of that small ``(s, s)`` matrix, whose smallest
    eigenvalue is a Rayleigh quotient of ``A``: if it is not positive, ``A`` is
    not positive definite and every column is flagged. A converged column keeps
    its solution (its step is masked) while its residual still spans the block.

    With ``space=(w, aw, e_inv)`` (``aw = A w``, ``e_inv = inv(w^T A w)``) the solve
    is deflated: it starts from the Galerkin solution in ``span(w)``, searches only
    directions A-conjugate to ``w``, and after each step corrects the residual's
    part in ``span(w)`` again, which keeps rounding from leaving it there. It then
    also returns the first ``record`` blocks of search directions and their
    products, as two ``(p, record * s)`` matrices (fewer if it converged sooner).
    """
    dtype = rhs.dtype
    rhs_norm = tf.norm(rhs, axis=0)
    threshold = tf.cast(tol, dtype) * rhs_norm
    x = tf.zeros_like(rhs)
    if space is None:
        w = aw = e_inv = None
        r = rhs
        x_w = tf.zeros([0, rhs.shape[1]], dtype)
    else:
        # The solution is x + w @ x_w; x_w collects the steps in span(w), so that
        # w multiplies it once, at the end.
        w, aw, e_inv = space
        x_w = tf.matmul(e_inv, tf.matmul(w, rhs, transpose_a=True))
        r = rhs - tf.matmul(aw, x_w)

    def conjugate(v):
        if w is None:
            return v
        return v - tf.matmul(w, tf.matmul(e_inv, tf.matmul(aw, v, transpose_a=True)))

    p = orthonormal_columns(conjugate(r))
    r_norm = tf.norm(r, axis=0)
    active = r_norm > threshold
    bad = tf.zeros_like(active)
    rayleigh = tf.zeros_like(r_norm)
    i = tf.constant(0)
    k = rhs.shape[1]
    kept = tf.TensorArray(dtype, size=0, dynamic_size=True, element_shape=rhs.shape)
    kept_products = tf.TensorArray(dtype, size=0, dynamic_size=True, element_shape=rhs.shape)

    def cond(i, x, x_w, r, p, r_norm, active, bad, rayleigh, kept, kept_products):
        return tf.logical_and(i < max_iter, tf.reduce_any(active))

    def body(i, x, x_w, r, p, r_norm, active, bad, rayleigh, kept, kept_products):
        ap = operator.matvec(p)
        if record is not None:
            kept, kept_products = tf.cond(
                i < record,
                lambda: (kept.write(i, p), kept_products.write(i, ap)),
                lambda: (kept, kept_products),
            )
        pap = tf.matmul(p, ap, transpose_a=True)
        eigenvalues, eigenvectors = tf.linalg.eigh(0.5 * (pap + tf.transpose(pap)))
        smallest = eigenvalues[0]
        new_bad = tf.logical_and(active, smallest <= 0)
        rayleigh = tf.where(new_bad, smallest, rayleigh)
        bad = tf.logical_or(bad, new_bad)
        active = tf.logical_and(active, tf.logical_not(new_bad))
        mask = tf.cast(active, dtype)[None, :]
        inverse = _positive_inverse(eigenvalues, eigenvectors)  # (P^T A P)^-1
        alpha = tf.matmul(inverse, tf.matmul(p, r, transpose_a=True)) * mask
        x = x + tf.matmul(p, alpha)
        r = r - tf.matmul(ap, alpha)
        if w is not None:
            c = tf.matmul(e_inv, tf.matmul(w, r, transpose_a=True)) * mask
            x_w = x_w + c
            r = r - tf.matmul(aw, c)
        beta = -tf.matmul(inverse, tf.matmul(ap, r, transpose_a=True))
        p = orthonormal_columns(conjugate(r + tf.matmul(p, beta)))
        r_norm = tf.where(active, tf.norm(r, axis=0), r_norm)
        active = tf.logical_and(active, r_norm > threshold)
        return i + 1, x, x_w, r, p, r_norm, active, bad, rayleigh, kept, kept_products

    loop = (i, x, x_w, r, p, r_norm, active, bad, rayleigh, kept, kept_products)
    i, x, x_w, r, p, r_norm, active, bad, rayleigh, kept, kept_products = tf.while_loop(
        cond, body, loop
    )
    if w is not None:
        x = x + tf.matmul(w, x_w)
    residual = tf.math.divide_no_nan(r_norm, rhs_norm)
    if space is None:
        return x, i, residual, bad, rayleigh

    def columns(array):
        blocks = array.stack()  # (t, p, k)
        return tf.reshape(tf.transpose(blocks, [1, 0, 2]), [rhs.shape[0], tf.shape(blocks)[0] * k])

    return x, i, residual, bad, rayleigh, columns(kept), columns(kept_products)
