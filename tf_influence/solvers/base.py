"""What every inverse-HVP solver shares: the interface, diagnostics and errors.

A solver maps ``(operator, rhs)`` to ``inv(H + damping*I) @ rhs``. It knows
nothing of Keras: the operator only needs ``matvec`` (and, for stochastic
solvers, ``batch_matvec`` and ``data.sampler``). The numerical loop runs
inside one ``tf.function``; the host reads the diagnostics once, after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf


class CurvatureError(ValueError):
    """The Hessian is not positive definite (or a solve diverged): change damping/scale."""


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What a solve did.

    Attributes:
        solver: the solver's name.
        iterations: iterations (CG), recursion steps (LiSSA) or 0 (Exact).
        residual_norm: ``(k,)`` relative residuals ``|A x - b| / |b|`` per right-hand side.
        converged: ``(k,)`` booleans.
        info: solver-specific extras (eigenvalue estimates, scale, ...).
    """

    solver: str
    iterations: int
    residual_norm: np.ndarray
    converged: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


def nice_ceil(value: float) -> float:
    """Rounds a positive number up to two significant digits, for suggestions."""
    if value <= 0 or not math.isfinite(value):
        return value
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(value / 10**exponent) * 10**exponent


def relative_residual(operator, solution, rhs) -> tf.Tensor:
    """``|A x - b| / |b|`` per column (0 where ``b`` is 0)."""
    residual = operator.matvec(solution) - rhs
    rhs_norm = tf.norm(rhs, axis=0)
    return tf.math.divide_no_nan(tf.norm(residual, axis=0), rhs_norm)


class Solver:
    """Base class: ``solve(operator, rhs) -> (solution, Diagnostics)``.

    Subclasses implement ``solve`` and list their constructor arguments in
    ``get_config`` so that ``type(s).from_config(s.get_config())`` rebuilds them.
    """

    name = "solver"

    def solve(self, operator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        """Solves ``(H + damping*I) x = rhs``.

        Args:
            operator: a ``HessianOperator`` (or anything with ``matvec`` etc.).
            rhs: ``(num_params, k)`` right-hand sides.

        Returns:
            ``(solution, diagnostics)``; ``solution`` has the shape of ``rhs``.
        """
        raise NotImplementedError

    def prepare(self, operator) -> None:
        """Optional one-off work at ``fit`` time (e.g. a factorisation)."""

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Solver:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"Argument `{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def check_positive_float(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive finite number. Received: {name}={value!r}"
        )
    return number
