"""LiSSA: a stochastic Neumann-series estimate of inverse-HVPs (Agarwal et al., 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tf_influence._validation import check_int, check_positive_float, check_positive_int
from tf_influence.solvers.base import (
    CurvatureError,
    CurvatureOperator,
    Diagnostics,
    ProgressFactory,
    Solver,
    nice_ceil,
    relative_residual,
    silent_progress,
)

# A run is called diverged when |h_t| exceeds this many times (t + 1) |v|, the
# largest norm a converging recursion (|I - A/scale| <= 1) can reach.
_GROWTH_SLACK = 2.0


def power_iteration(
    matvec: Callable[[tf.Tensor], tf.Tensor],
    num_params: int,
    dtype: tf.DType,
    iterations: int = 30,
    seed: int = 0,
) -> tf.Tensor:
    """Largest eigenvalue (in absolute value) of a symmetric operator, by power iteration.

    Args:
        matvec: ``(p, 1) -> (p, 1)`` product with the operator (a callable).
        num_params: p.
        dtype: dtype of the start vector (that of the operator's vectors).
        iterations: power steps.
        seed: seed of the random start vector.

    Returns:
        A scalar tensor, the Rayleigh quotient of the last iterate.
    """
    v = tf.random.stateless_normal([num_params, 1], seed=[seed, 17], dtype=dtype)
    v = v / tf.norm(v)
    estimate = tf.zeros([], dtype)
    for _ in range(iterations):
        w = matvec(v)
        estimate = tf.reduce_sum(v * w)
        v = w / tf.maximum(tf.norm(w), tf.cast(1e-30, dtype))
    return estimate


class LiSSA(Solver):
    """Stochastic inverse-HVPs by the recursion of Koh & Liang (2017).

    With ``A = H + damping*I`` and ``A_t`` its estimate on a random training
    batch, each repeat runs::

        h_0 = v;   h_t = v + h_{t-1} - A_t h_{t-1} / scale      (t = 1..recursion_depth)

    and returns ``h / scale``; the estimates of ``num_repeats`` independent runs
    are averaged. It converges to ``inv(A) @ v`` when ``scale`` exceeds the
    largest eigenvalue of every batch Hessian and ``recursion_depth`` is several
    times ``scale / smallest_eigenvalue``. In Koh & Liang's notation
    (``h <- v + (1 - d) h - H h / scale``) their ``d`` equals our
    ``damping / scale``: we keep one meaning of damping for every solver.

    Args:
        recursion_depth: steps per repeat (one batch HVP each).
        scale: divisor that keeps the recursion contracting; None estimates the
            largest eigenvalue by power iteration on a few batches and uses 1.5x it.
        num_repeats: independent runs averaged.
        batch_size: training examples per stochastic HVP; None uses the
            ``fit`` batch size.
        seed: seed of the batch sampling (results are reproducible).
        tol: relative residual ``|A x - b| / |b|`` (checked once, on the full data,
            after the recursion) under which a solve counts as converged; a
            stochastic solver is held to its own, looser tolerance.

    Raises:
        CurvatureError: the recursion diverged; the message suggests a larger scale.

    References:
        Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine
        learning in linear time" (JMLR 2017); Koh & Liang (ICML 2017).
    """

    name = "lissa"

    def __init__(
        self,
        recursion_depth: int = 1000,
        scale: float | None = None,
        num_repeats: int = 1,
        batch_size: int | None = None,
        seed: int = 0,
        tol: float = 0.1,
    ):
        self.recursion_depth = check_positive_int("recursion_depth", recursion_depth)
        self.scale = check_positive_float("scale", scale, allow_none=True)
        self.num_repeats = check_positive_int("num_repeats", num_repeats)
        self.batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        self.seed = check_int("seed", seed)
        self.tol = check_positive_float("tol", tol)

    def get_config(self) -> dict[str, Any]:
        return {
            "recursion_depth": self.recursion_depth,
            "scale": self.scale,
            "num_repeats": self.num_repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "tol": self.tol,
        }

    def _batch_size(self, operator: CurvatureOperator) -> int:
        return self.batch_size or operator.data.batch_size

    def estimate_scale(self, operator: CurvatureOperator) -> float:
        """1.5x the largest eigenvalue seen over the full operator and a few batches."""

        def make():
            draw = operator.data.sampler(self._batch_size(operator), self.seed + 7919)
            estimates = [power_iteration(operator.matvec, operator.num_params, operator.dtype)]
            for k in range(4):
                batch = draw(k)
                estimates.append(
                    power_iteration(
                        lambda v, b=batch: operator.batch_matvec(v, b),
                        operator.num_params,
                        operator.dtype,
                        seed=k + 1,
                    )
                )
            return 1.5 * max(float(e) for e in estimates)

        return operator.cached(("lissa.scale", self.seed, self._batch_size(operator)), make)

    def prepare(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> None:
        """Estimates the scale (power iteration) unless one was given."""
        if self.scale is None:
            self.estimate_scale(operator)

    def _graph(self, operator: CurvatureOperator, scale: float) -> Callable:
        depth, repeats = self.recursion_depth, self.num_repeats

        def run(rhs):
            draw = operator.data.sampler(self._batch_size(operator), self.seed)
            dtype = rhs.dtype
            scale_t = tf.cast(scale, dtype)
            rhs_norm = tf.norm(rhs, axis=0)
            h = rhs
            total = tf.zeros_like(rhs)
            diverged = tf.zeros_like(rhs_norm, dtype=tf.bool)
            steps = tf.constant(0)
            # A loop condition, not `break`: autograph would put the body (and the
            # all-reduce of a distributed product) inside a tf.cond, which collective
            # ops across workers do not support.
            while steps < depth * repeats and not tf.reduce_any(diverged):
                step = steps
                product = tf.ensure_shape(operator.batch_matvec(h, draw(step)), rhs.shape)
                h = rhs + h - product / scale_t
                bound = _GROWTH_SLACK * tf.cast(step % depth + 2, dtype) * rhs_norm
                norm = tf.norm(h, axis=0)
                grew = tf.logical_or(tf.logical_not(tf.math.is_finite(norm)), norm > bound)
                diverged = tf.logical_or(diverged, grew)
                steps = step + 1
                if steps % depth == 0:
                    total += h
                    h = rhs
            return total / (scale_t * repeats), steps, diverged

        # Traced per number of right-hand sides, so that one column takes the cheaper
        # single-vector product.
        return tf.function(run)

    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        scale = self.scale if self.scale is not None else self.estimate_scale(operator)
        key = ("lissa",) + tuple(self.get_config().values()) + (scale,)
        graph = operator.cached(key, lambda: self._graph(operator, scale))
        rhs = tf.convert_to_tensor(rhs, operator.dtype)
        solution, steps, diverged = graph(rhs)
        if bool(tf.reduce_any(diverged)):
            largest = float(self.estimate_scale(operator)) / 1.5
            suggestion = nice_ceil(max(2 * largest, 2 * scale))
            raise CurvatureError(
                f"LiSSA diverged after {int(steps)} recursion steps: the batch Hessians have "
                f"eigenvalues above scale. Received: scale={scale:.4g} (largest eigenvalue "
                f"estimated at {largest:.4g}), batch_size={self._batch_size(operator)}. Pass "
                f"a larger scale, e.g. LiSSA(scale={suggestion:.2g}), a larger batch_size, or "
                "a larger damping if H is not positive definite."
            )
        residual = relative_residual(operator, solution, rhs).numpy()
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=int(steps),
            residual_norm=residual,
            converged=residual <= self.tol,
            info={"scale": scale},
        )
        return solution, diagnostics
