"""``damping="auto"``: a damping chosen from the curvature's spectrum, once per ``fit``.

    damping = max(FRACTION * |mean|, -NEGATIVE_MARGIN * smallest + FRACTION * |mean|)

``mean`` is the mean eigenvalue of the undamped curvature C (``trace(C) / p``),
estimated by Hutchinson's method with ``NUM_PROBES`` seeded Rademacher probes
``z``: ``trace(C) ~= mean_i z_i^T C z_i``. When ``p <= NUM_PROBES`` the probes are
the columns of the identity, so the trace is exact. C is a mean over training
examples, so its trace is too: on more than ``TRACE_EXAMPLES`` examples it is
estimated on a fixed seeded subset of ``TRACE_EXAMPLES`` of them (unbiased; the
cost no longer grows with n). ``smallest`` is C's smallest eigenvalue, estimated
by ``LANCZOS_STEPS`` steps of Lanczos iteration (exact when ``p <= LANCZOS_STEPS``),
over all the data; a curvature that
is positive semi-definite by construction (Gauss-Newton) skips it and takes
``FRACTION * mean``. So ``C + damping*I`` has its smallest eigenvalue at about
``FRACTION * mean`` or above: positive definite, with a condition number of at
most about ``largest / (FRACTION * mean)``.

Lanczos approaches the smallest eigenvalue from above, and slowly when a few large
eigenvalues dominate the spectrum (a trained network's Hessian): on the digits MLP,
20 steps found -3.6e-4 where CG still met negative curvature at damping 1e-3
(``FRACTION * mean`` there is about 3e-3, so "auto" took 4.4e-3 and converged).
``NEGATIVE_MARGIN`` widens the step, but for a network's indefinite Hessian the
Gauss-Newton curvature (positive semi-definite, no estimate needed) is the robust
choice.

The estimate costs ``NUM_PROBES`` columns of products over at most
``TRACE_EXAMPLES`` examples (``PROBE_BLOCK`` columns at a time), plus
``LANCZOS_STEPS`` single products over all the data for a Hessian.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tf_influence.solvers.arnoldi import _arnoldi
from tf_influence.solvers.base import CurvatureOperator

# The damping as a multiple of the mean eigenvalue. A network's curvature has a few
# large eigenvalues and very many near 0, so its mean is small (digits MLP,
# Gauss-Newton: 1.5e-3 after 2 epochs). Measured by loo_check (python -m
# benchmarks.defaults, docs/solvers.md "The defaults"): on the digits MLP and CNN in
# the middle of training, Gauss-Newton at the mean agreed with retraining at Pearson
# 0.46 and 0.73, at ten times the mean at 0.995 and 0.952, with CG needing a third of
# the iterations; on a convex model ten times the mean agreed better too (0.996).
FRACTION = 10.0
# How far below the Lanczos estimate of the smallest eigenvalue the damping reaches.
NEGATIVE_MARGIN = 2.0
NUM_PROBES = 16
# Probes per product. A product's memory grows with its columns times the batch size
# (every column is a JVP and a VJP through the model): 16 columns of 100 examples of
# the residual CNN of `python -m benchmarks.residual_cnn` (1.6M parameters) took more
# than 20 GB. Four at a time keeps the estimate within what a CG solve of a few test
# points needs, and gives the same numbers.
PROBE_BLOCK = 4
# At most this many training examples carry the trace estimate (a seeded subset).
TRACE_EXAMPLES = 256
LANCZOS_STEPS = 20
SEED = 0


@dataclasses.dataclass(frozen=True)
class SpectrumEstimate:
    """What ``damping="auto"`` measured on the undamped curvature C.

    Attributes:
        mean_eigenvalue: ``trace(C) / p`` (exact when ``p <= NUM_PROBES``).
        smallest_eigenvalue: C's smallest eigenvalue (Lanczos), or None when C is
            positive semi-definite by construction.
        damping: the damping chosen from them.
    """

    mean_eigenvalue: float
    smallest_eigenvalue: float | None
    damping: float


def choose_damping(mean: float, smallest: float | None, fraction: float = FRACTION) -> float:
    """``max(fraction * mean, -NEGATIVE_MARGIN * smallest + fraction * mean)``.

    ``smallest`` None (a positive semi-definite curvature): ``fraction * mean``.
    """
    damping = fraction * mean
    if smallest is not None:
        damping = max(damping, -NEGATIVE_MARGIN * smallest + fraction * mean)
    return float(damping)


def mean_eigenvalue(
    operator: CurvatureOperator,
    num_probes: int = NUM_PROBES,
    seed: int = SEED,
    num_examples: int | None = TRACE_EXAMPLES,
) -> float:
    """``trace(C) / p`` of the undamped operator, by Hutchinson's estimate.

    Exact (the identity's columns as probes) when ``p <= num_probes``. The probes are
    multiplied ``PROBE_BLOCK`` columns at a time, so that the memory of a product stays
    that of a solve of a few test points. With more than ``num_examples`` training
    examples the products run over a seeded subset of ``num_examples`` of them
    (``operator.subsample``); None uses all.
    """
    p = operator.num_params
    if num_examples is not None and operator.num_examples > num_examples:
        operator = operator.subsample(num_examples, seed)
    if p <= num_probes:
        probes = tf.eye(p, dtype=operator.dtype)
        count = 1.0
    else:
        signs = tf.random.stateless_uniform([p, num_probes], [seed, 1], 0, 2, dtype=tf.int32)
        probes = tf.cast(2 * signs - 1, operator.dtype)
        count = float(num_probes)
    trace = 0.0
    for start in range(0, int(probes.shape[1]), PROBE_BLOCK):
        chunk = probes[:, start : start + PROBE_BLOCK]
        products = operator.matvec(chunk) - tf.cast(operator.damping, operator.dtype) * chunk
        trace += float(tf.reduce_sum(tf.cast(chunk * products, tf.float64)))
    return trace / count / p


def smallest_eigenvalue(
    operator: CurvatureOperator, steps: int = LANCZOS_STEPS, seed: int = SEED
) -> float:
    """C's smallest eigenvalue by ``steps`` Lanczos steps (exact for ``p <= steps``).

    The smallest Ritz value approaches it from above.
    """
    steps = min(steps, operator.num_params)
    values, _ = _arnoldi(operator, steps, seed)
    return float(values[-1]) - operator.damping


def estimate(
    operator: CurvatureOperator, fraction: float = FRACTION, mean: float | None = None
) -> SpectrumEstimate:
    """The spectrum estimate and the damping ``damping="auto"`` takes on ``operator``.

    Args:
        operator: the curvature (its own damping is subtracted: C is undamped).
        fraction: the damping as a multiple of the mean eigenvalue.
        mean: the mean eigenvalue when the solver knows it (``Solver.mean_eigenvalue``:
            K-FAC's trace is the sum of its eigenvalues); None estimates it here.

    Raises:
        ValueError: the curvature is zero (the loss does not depend on the
            parameters), so no damping can be chosen from it.
    """
    if mean is None:
        mean = mean_eigenvalue(operator)
    positive = bool(getattr(operator, "positive_semidefinite", False))
    smallest = None if positive else smallest_eigenvalue(operator)
    damping = choose_damping(abs(mean), smallest, fraction)
    scale = max(abs(mean), 0.0 if smallest is None else abs(smallest))
    if not math.isfinite(damping) or not scale > np.finfo(np.float64).tiny or damping <= 0:
        raise ValueError(
            'damping="auto" chooses the damping from the curvature\'s eigenvalues, but the '
            f"curvature is zero here (mean eigenvalue {mean:.3g}): the loss does not depend "
            "on the analysed parameters at these weights. Received: damping='auto'. Pass a "
            "positive float as `damping` to `compile`, e.g. damping=1e-3, or analyse "
            "parameters the loss depends on (`params=`)."
        )
    return SpectrumEstimate(mean, smallest, damping)
