"""Low-rank inverse-HVPs from the top eigenpairs found by Arnoldi iteration."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._validation import check_int, check_positive_int
from tf_influence.solvers.base import (
    GAUSS_NEWTON_HINT,
    CurvatureError,
    CurvatureOperator,
    Diagnostics,
    LowRankInverse,
    ProgressFactory,
    Solver,
    compile_loop,
    nice_ceil,
    silent_progress,
)


class Arnoldi(Solver):
    """``inv(H + damping*I) ~= V diag(1/lambda) V^T`` on the top ``rank`` eigenpairs.

    Arnoldi iteration (with full re-orthogonalisation; for a symmetric operator it
    is Lanczos) builds an orthonormal Krylov basis of ``iterations`` vectors from a
    seeded random start, one Hessian-vector product per vector, all inside one
    ``tf.function``. The eigenpairs of the small projected matrix give Ritz
    approximations of the top eigenvalues ``lambda`` (of ``H + damping*I``) and
    eigenvectors ``V``; the ``rank`` largest are kept. Found once at ``fit`` and
    cached; every solve is then two matrix products, and ``InfluenceModel``
    keeps the training gradients projected on ``V`` (``n_train x rank``), so a
    query costs one gradient and one product (the influence index).

    The iteration stops early only at an invariant subspace, which holds every
    eigenpair the start vector can reach (then fewer than ``rank`` pairs are kept):
    when the new product ``C q_k`` (``C`` without the damping, which shifts every
    eigenvalue and leaves the Krylov space as it is) lies in the span of the basis up
    to rounding,

        beta_k <= sqrt(eps) * |C q_k|

    with ``beta_k = h_{k+1,k}`` its norm after re-orthogonalisation, ``|C q_k|`` the
    norm of column ``k`` of the projected (Hessenberg) matrix of ``C``, and ``eps``
    the machine epsilon of the operator's dtype. Both sides scale with ``C``, so the
    test means the same at any scale and damping (rounding leaves ``beta_k`` at tens
    to hundreds of ``eps * |C q_k|`` at an invariant subspace of a dense matrix).

    This is an approximation: directions outside the top eigenspace are dropped,
    which is what makes it cheap and also what it gets wrong (their small
    eigenvalues carry large weights in the exact inverse). Check it against
    ``CG`` on a sample before relying on a rank; ``python -m benchmarks.arnoldi`` shows
    how the agreement grows with the rank.

    Args:
        rank: number of eigenpairs kept.
        iterations: Krylov vectors (Hessian-vector products); None means
            ``2 * rank``. Must be at least ``rank``; more makes the top pairs
            more accurate.
        seed: seed of the random start vector.

    Raises:
        CurvatureError: a kept eigenvalue is not positive (add damping).

    References:
        Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up Influence Functions",
        AAAI 2022. Arnoldi (1951); Lanczos (1950).
    """

    name = "arnoldi"

    def __init__(self, rank: int = 50, iterations: int | None = None, seed: int = 0):
        self.rank = check_positive_int("rank", rank)
        self.iterations = check_positive_int("iterations", iterations, allow_none=True)
        if self.iterations is not None and self.iterations < self.rank:
            raise ValueError(
                "Argument `iterations` must be at least `rank`. Received: "
                f"iterations={iterations}, rank={rank}. Use iterations >= 2 * rank."
            )
        self.seed = check_int("seed", seed)

    def get_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "iterations": self.iterations, "seed": self.seed}

    def eigenpairs(self, operator: CurvatureOperator) -> tuple[tf.Tensor, tf.Tensor]:
        """``(eigenvalues (r,), eigenvectors (p, r))`` of ``H + damping*I``, largest first."""

        def make():
            steps = min(self.iterations or 2 * self.rank, operator.num_params)
            values, vectors = _arnoldi(operator, steps, self.seed)
            rank = min(self.rank, int(values.shape[0]))
            values, vectors = values[:rank], vectors[:, :rank]
            smallest = float(values[-1])
            if smallest <= 0:
                suggestion = nice_ceil(operator.damping + 2 * abs(smallest) + 1e-8)
                raise CurvatureError(
                    f"Arnoldi kept an eigenvalue {smallest:.3e} <= 0 among the top {rank} of "
                    f"H + damping*I, so it is not positive definite there. Received: "
                    f"damping={operator.damping}. Pass a larger damping to `compile`, e.g. "
                    f"damping={suggestion:.2g}." + GAUSS_NEWTON_HINT
                )
            return values, vectors

        return operator.cached(self._key, make)

    @property
    def _key(self) -> tuple[str, int, int | None, int]:
        return ("arnoldi", self.rank, self.iterations, self.seed)

    def prepare(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> None:
        """Finds the eigenpairs (one ``tf.function``, no progress to report)."""
        self.eigenpairs(operator)

    def low_rank(self, operator: CurvatureOperator) -> LowRankInverse | None:
        """``V diag(1/lambda) V^T``: the influence index and ``export`` use it."""
        values, vectors = self.eigenpairs(operator)
        return LowRankInverse(basis=vectors, inverse_values=1.0 / values)

    def get_state(self, operator: CurvatureOperator) -> dict[str, np.ndarray]:
        """The kept eigenvalues ``(r,)`` and eigenvectors ``(p, r)``."""
        values, vectors = self.eigenpairs(operator)
        return {"eigenvalues": values.numpy(), "eigenvectors": vectors.numpy()}

    def set_state(self, operator: CurvatureOperator, arrays: dict[str, np.ndarray]) -> None:
        """Restores the eigenpairs, so that ``load`` runs no Arnoldi iteration."""
        if "eigenvalues" in arrays and "eigenvectors" in arrays:
            pair = (
                tf.constant(arrays["eigenvalues"], operator.dtype),
                tf.constant(arrays["eigenvectors"], operator.dtype),
            )
            operator.cached(self._key, lambda: pair)

    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        values, vectors = self.eigenpairs(operator)
        rhs = tf.convert_to_tensor(rhs, operator.dtype)
        coefficients = tf.matmul(vectors, rhs, transpose_a=True) / values[:, None]
        solution = tf.matmul(vectors, coefficients)
        # With A V = V diag(lambda), A x - b = V V^T b - b: the part of b outside the kept
        # eigenspace. Measured from the Ritz basis, so a query needs no Hessian product.
        outside = rhs - tf.matmul(vectors, tf.matmul(vectors, rhs, transpose_a=True))
        residual = tf.math.divide_no_nan(tf.norm(outside, axis=0), tf.norm(rhs, axis=0)).numpy()
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=int(values.shape[0]),
            residual_norm=residual,
            # A low-rank approximation never reaches a small residual; it is not a
            # failed iteration. The residual (|b - V V^T b| / |b|) is reported for
            # inspection.
            converged=np.ones_like(residual, dtype=bool),
            info={"eigenvalues": values.numpy(), "rank": int(values.shape[0])},
        )
        return solution, diagnostics


def _arnoldi(operator: CurvatureOperator, steps: int, seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Top Ritz pairs after ``steps`` Arnoldi steps; numpy-free, one ``tf.function``."""
    graph = operator.cached(
        ("arnoldi.graph", steps, seed),
        lambda: compile_loop(
            operator,
            ("arnoldi", steps, seed),
            lambda op, damping: _arnoldi_graph(op, steps, seed, damping),
        ),
    )
    # The damping is an argument: the trace is shared by operators of any damping.
    values, vectors, size = graph(tf.constant(operator.damping, operator.dtype))
    size = int(size)
    return values[:size], vectors[:, :size]


def _arnoldi_graph(operator, steps, seed, damping):
    p = operator.num_params
    dtype = operator.dtype
    start = tf.random.stateless_normal([p], seed=[seed, 0], dtype=dtype)
    basis = tf.zeros([steps + 1, p], dtype)
    basis = tf.tensor_scatter_nd_update(basis, [[0]], [start / tf.norm(start)])
    projected = tf.zeros([steps + 1, steps], dtype)
    tolerance = tf.constant(np.finfo(dtype.as_numpy_dtype).eps ** 0.5, dtype)

    def cond(i, basis, projected, done):
        return tf.logical_and(i < steps, tf.logical_not(done))

    def body(i, basis, projected, done):
        w = operator.matvec(basis[i][:, None])[:, 0]
        # Gram-Schmidt against the whole basis, twice (rows not yet filled are 0).
        h = tf.linalg.matvec(basis, w)
        w = w - tf.linalg.matvec(basis, h, transpose_a=True)
        h2 = tf.linalg.matvec(basis, w)
        w = w - tf.linalg.matvec(basis, h2, transpose_a=True)
        h = h + h2
        beta = tf.norm(w)
        column = tf.tensor_scatter_nd_update(h, [[i + 1]], [beta])
        projected = tf.tensor_scatter_nd_update(tf.transpose(projected), [[i]], [column])
        projected = tf.transpose(projected)
        # An invariant subspace ends the iteration: it holds every eigenpair the start
        # vector can reach. Relative to |C q_i|, column i of the projected matrix
        # without the damping (which shifts it and leaves the Krylov space as it is).
        undamped = tf.tensor_scatter_nd_sub(column, [[i]], [damping])
        breakdown = beta <= tolerance * tf.norm(undamped)
        safe = tf.where(breakdown, tf.ones_like(beta), beta)
        basis = tf.tensor_scatter_nd_update(basis, [[i + 1]], [w / safe])
        return i + 1, basis, projected, breakdown

    size, basis, projected, _ = tf.while_loop(
        cond, body, (tf.constant(0), basis, projected, tf.constant(False))
    )
    square = projected[:size, :size]
    square = 0.5 * (square + tf.transpose(square))  # symmetric operator
    values, small_vectors = tf.linalg.eigh(square)
    values, small_vectors = values[::-1], small_vectors[:, ::-1]  # largest first
    vectors = tf.matmul(basis[:size], small_vectors, transpose_a=True)  # (p, size)
    # Pad to a static width so that the function has fixed output shapes.
    pad = steps - size
    values = tf.pad(values, [[0, pad]])
    vectors = tf.pad(vectors, [[0, 0], [0, pad]])
    return values, vectors, size
