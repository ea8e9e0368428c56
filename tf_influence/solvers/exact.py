"""Exact inverse-HVPs: the dense Hessian, factorised by Cholesky in float64."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tf_influence.solvers.base import (
    GAUSS_NEWTON_HINT,
    CurvatureError,
    CurvatureOperator,
    Diagnostics,
    ProgressFactory,
    Solver,
    nice_ceil,
    silent_progress,
)

# Where the factor is kept on the operator (one spelling: here).
_CHOLESKY = "exact.cholesky"

# Below this ratio of smallest to largest Cholesky pivot (squared), the matrix is
# treated as numerically singular and its spectrum is checked.
_SINGULAR_RATIO = 1e-13
# Without damping, refuse when condition_number * eps(dtype) exceeds this.
_CONDITION_TOLERANCE = 1e-2
# Power-iteration steps for the extreme eigenvalues (a few percent accuracy).
_SPECTRUM_STEPS = 60


class Exact(Solver):
    """Solves with the dense matrix ``H + damping*I``, factorised once by Cholesky.

    The Hessian is assembled from Hessian-vector products (about ``p / 128``
    passes over the training data) and factorised in float64; every later solve
    is two triangular solves. Meant for models up to a few thousand parameters:
    the matrix takes ``8 * p**2`` bytes and assembling it several times that
    (26,122 parameters did not fit in 24 GB); use CG beyond.

    Raises:
        CurvatureError: at ``fit``/solve time if ``H + damping*I`` is not positive
            definite (or numerically singular); the message gives the smallest
            eigenvalue and a damping that would fix it.

    Example:
        >>> im.compile(solver=tfi.solvers.Exact(), damping=1e-3)
    """

    name = "exact"

    def _factor(self, operator: CurvatureOperator) -> tf.Tensor:
        def make():
            matrix = operator.dense()
            chol = tf.linalg.cholesky(matrix)
            ok = bool(tf.reduce_all(tf.math.is_finite(chol)))
            if ok:
                pivots = tf.abs(tf.linalg.diag_part(chol)) ** 2
                ratio = float(tf.reduce_min(pivots) / tf.reduce_max(pivots))
                ok = ratio > _SINGULAR_RATIO
            if not ok:
                _raise_not_positive_definite(matrix, operator.damping)
            return chol

        return operator.cached(_CHOLESKY, make)

    def spectrum(self, operator: CurvatureOperator) -> dict[str, float]:
        """Estimated extreme eigenvalues and condition number of ``H + damping*I``.

        Power iteration on the dense matrix (largest) and on its inverse through the
        Cholesky factor (smallest): ``_SPECTRUM_STEPS`` products each, O(p^2) apiece.
        """

        def make():
            chol = self._factor(operator)
            matrix = operator.dense()
            largest = _power(lambda v: matrix @ v, matrix.shape[0])
            smallest = 1.0 / _power(lambda v: tf.linalg.cholesky_solve(chol, v), matrix.shape[0])
            return {
                "largest_eigenvalue": largest,
                "smallest_eigenvalue": smallest,
                "condition_number": largest / smallest,
            }

        return operator.cached("exact.spectrum", make)

    def check_conditioning(self, operator: CurvatureOperator) -> dict[str, float]:
        """Refuses a near-singular ``H`` without damping; returns ``spectrum``.

        Near-singular: ``condition_number * eps(dtype) > 1e-2``, i.e. solutions may
        lose every significant digit in the parameters' precision (float32:
        condition number above about 8e4; float64: 4.5e13).
        """
        spectrum = self.spectrum(operator)
        limit = _CONDITION_TOLERANCE / float(np.finfo(operator.dtype.as_numpy_dtype).eps)
        if operator.damping == 0 and spectrum["condition_number"] > limit:
            suggestion = nice_ceil(spectrum["largest_eigenvalue"] / limit * 10)
            raise CurvatureError(
                "The Hessian is nearly singular, so its inverse (and every influence) is "
                "dominated by rounding and by directions the data does not constrain. "
                f"Received: damping=0.0, condition number {spectrum['condition_number']:.2e} "
                f"(eigenvalues {spectrum['smallest_eigenvalue']:.3e} to "
                f"{spectrum['largest_eigenvalue']:.3e}; above {limit:.1e} in "
                f"{operator.dtype.name}). Pass a damping to `compile`, e.g. "
                f"damping={suggestion:.2g}, or analyse fewer parameters with `params=`."
            )
        return spectrum

    def prepare(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> None:
        """Assembles the dense matrix (with a progress bar), factorises it, checks it."""
        bar = progress(
            operator.num_dense_chunks,
            f"Building the {operator.num_params}x{operator.num_params} Hessian",
        )
        operator.dense(progress=bar.update)
        bar.done()
        self._factor(operator)
        self.check_conditioning(operator)

    def get_state(self, operator: CurvatureOperator) -> dict[str, np.ndarray]:
        """The Cholesky factor of ``H + damping*I`` (float64, lower triangular)."""
        return {"cholesky": self._factor(operator).numpy()}

    def set_state(self, operator: CurvatureOperator, arrays: dict[str, np.ndarray]) -> None:
        """Restores the factor, so that ``load`` does not factorise again."""
        if "cholesky" in arrays:
            factor = tf.constant(arrays["cholesky"], tf.float64)
            operator.cached(_CHOLESKY, lambda: factor)

    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        chol = self._factor(operator)
        rhs64 = tf.cast(rhs, tf.float64)
        solution64 = tf.linalg.cholesky_solve(chol, rhs64)
        dense = operator.dense()
        residual = tf.norm(dense @ solution64 - rhs64, axis=0)
        residual = tf.math.divide_no_nan(residual, tf.norm(rhs64, axis=0)).numpy()
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=0,
            residual_norm=residual,
            converged=residual < 1e-6,
            info=dict(self.check_conditioning(operator)),
        )
        return tf.cast(solution64, operator.dtype), diagnostics

    def self_products(
        self, operator: CurvatureOperator, vectors: tf.Tensor
    ) -> tuple[tf.Tensor, Diagnostics | None]:
        """``vectors[:, j] . inv(H) . vectors[:, j]`` for each column, via the factor."""
        chol = self._factor(operator)
        half = tf.linalg.triangular_solve(chol, tf.cast(vectors, tf.float64), lower=True)
        return tf.reduce_sum(half**2, axis=0), None


def _power(apply: Callable[[tf.Tensor], tf.Tensor], size: int) -> float:
    """Largest eigenvalue of a symmetric positive operator by power iteration (float64)."""
    vector = tf.random.stateless_normal([size, 1], seed=[17, 0], dtype=tf.float64)
    value = 0.0
    for _ in range(_SPECTRUM_STEPS):
        vector = vector / tf.norm(vector)
        image = apply(vector)
        value = float(tf.reduce_sum(vector * image))
        vector = image
    return value


def _raise_not_positive_definite(matrix: tf.Tensor, damping: float) -> None:
    eigenvalues = np.linalg.eigvalsh(matrix.numpy())
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    suggestion = nice_ceil(damping + max(-smallest, 0.0) + 1e-3 * max(abs(largest), 1e-8))
    raise CurvatureError(
        "The curvature of the training loss plus damping is not positive definite, so "
        "influence is not defined. Received: damping="
        f"{damping}, smallest eigenvalue of H + damping*I = {smallest:.3e} (largest "
        f"{largest:.3e}). Pass a larger damping to `compile`, e.g. damping={suggestion:.2g}, "
        "or train the model closer to a minimum." + GAUSS_NEWTON_HINT
    )
