"""Conjugate gradients, matrix-free, for several right-hand sides at once."""

from __future__ import annotations

import tensorflow as tf

from tf_influence.solvers.base import (
    CurvatureError,
    Diagnostics,
    Solver,
    check_positive_float,
    check_positive_int,
    nice_ceil,
)


class CG(Solver):
    """Conjugate gradients on ``(H + damping*I) x = b`` inside one ``tf.function``.

    Each column of ``b`` runs its own CG recursion (its own step sizes), all of
    them sharing one Hessian-vector product per iteration; a column stops
    changing once ``|r| <= tol * |b|``. Nothing leaves the graph until the end.

    Args:
        tol: relative residual at which a column has converged.
        max_iter: most iterations; None means ``min(num_params, 1000)``.
        hessian_sample_size: if given, H is estimated on a fixed random subset of
            this many training examples (drawn with ``seed``), so each iteration
            costs a pass over the subset instead of the whole training set. The
            subset stays fixed during the solve (CG needs a fixed matrix); the
            residual is measured against that subsampled H.
        seed: seed of the subset.

    Raises:
        CurvatureError: a direction of non-positive curvature ``p^T H p <= 0``
            was met (H + damping*I is not positive definite); the message
            suggests a damping.

    References:
        Hestenes & Stiefel (1952); Martens, "Deep learning via Hessian-free
        optimization" (ICML 2010); Koh & Liang (ICML 2017).
    """

    name = "cg"

    def __init__(
        self,
        tol: float = 1e-6,
        max_iter: int | None = None,
        hessian_sample_size: int | None = None,
        seed: int = 0,
    ):
        self.tol = check_positive_float("tol", tol)
        self.max_iter = check_positive_int("max_iter", max_iter, allow_none=True)
        self.hessian_sample_size = check_positive_int(
            "hessian_sample_size", hessian_sample_size, allow_none=True
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Argument `seed` must be an integer. Received: seed={seed!r}")
        self.seed = seed

    def get_config(self):
        return {
            "tol": self.tol,
            "max_iter": self.max_iter,
            "hessian_sample_size": self.hessian_sample_size,
            "seed": self.seed,
        }

    def _graph(self, operator):
        max_iter = self.max_iter or min(operator.num_params, 1000)
        tol = self.tol

        def run(rhs):
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

        # Traced per number of right-hand sides, so that one column takes the cheaper
        # single-vector product.
        return tf.function(run)

    def solve(self, operator, rhs):
        if self.hessian_sample_size is not None:
            operator = operator.subsample(self.hessian_sample_size, self.seed)
        graph = operator.cached(
            ("cg",) + tuple(self.get_config().values()), lambda: self._graph(operator)
        )
        x, iterations, residual, bad, rayleigh = graph(tf.convert_to_tensor(rhs, operator.dtype))
        bad = bad.numpy()
        if bad.any():
            quotient = float(rayleigh.numpy()[bad].min())
            suggestion = nice_ceil(operator.damping + 2 * abs(quotient) + 1e-8)
            raise CurvatureError(
                "Conjugate gradients met a direction of non-positive curvature "
                f"(p^T (H + damping*I) p / p^T p = {quotient:.3e} <= 0), so H + damping*I is not "
                f"positive definite and influence is not defined. Received: damping="
                f"{operator.damping}. Pass a larger damping to `compile`, e.g. damping="
                f"{suggestion:.2g} (the smallest eigenvalue is at most {quotient:.3e}; "
                "solver='exact' reports it exactly on small models)."
            )
        residual = residual.numpy()
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=int(iterations),
            residual_norm=residual,
            converged=residual <= self.tol,
        )
        return x, diagnostics
