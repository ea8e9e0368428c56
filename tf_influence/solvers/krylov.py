"""The conjugate-gradient iterations, traced once into a graph.

``column_cg`` runs one CG recursion per right-hand side; ``block_cg`` runs block
CG, whose columns share one Krylov space, optionally deflated by a space of
directions kept from earlier solves (see ``recycling.py``). Both are plain
``tf.while_loop``s with no autograph; ``solve_graph`` and ``deflated_solve_graph``
compile them (once per model and configuration, see ``base.compile_loop``) into the
functions ``CG`` caches on the operator.
``orthonormal_columns`` is the Cholesky QR that keeps block CG's search block
orthonormal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import tensorflow as tf

from tf_influence.solvers.base import compile_loop

if TYPE_CHECKING:
    from tf_influence.solvers.base import CurvatureOperator

# What the compiled solves return: (x, iterations, relative residual, bad, rayleigh),
# plus (directions, products) for a deflated solve.
CGResults = tuple[tf.Tensor, ...]


def solve_graph(
    operator: CurvatureOperator, tol: float, max_iter: int, block: bool
) -> Callable[[tf.Tensor], CGResults]:
    """``rhs -> (x, iterations, relative residual, bad, rayleigh)``, compiled.

    Block CG when ``block`` and the rhs has between 2 and ``num_params`` columns
    (block CG needs as many independent directions as columns), else column CG.
    Traced once per number of right-hand sides, so that one column takes the
    cheaper single-vector product.
    """

    def run(operator: CurvatureOperator, rhs: tf.Tensor) -> CGResults:
        k = rhs.shape[1]
        if block and k is not None and 1 < k <= operator.num_params:
            return block_cg(operator, rhs, tol, max_iter)
        return column_cg(operator, rhs, tol, max_iter)

    return compile_loop(operator, ("cg.solve", tol, max_iter, block), run)


def deflated_solve_graph(
    operator: CurvatureOperator, tol: float, max_iter: int
) -> Callable[..., CGResults]:
    """Deflated block CG, traced once for any number of columns and width of the kept space.

    The function takes ``(rhs (p, k), w (p, m), aw (p, m), e_inv (m, m), record)`` and
    returns ``block_cg``'s seven results (see ``block_cg`` with ``space``). One trace
    serves every number of test points (k = 1 included): a new ``k`` neither traces
    again nor, in a new process, builds another graph.
    """

    def run(
        operator: CurvatureOperator,
        rhs: tf.Tensor,
        w: tf.Tensor,
        aw: tf.Tensor,
        e_inv: tf.Tensor,
        record: tf.Tensor,
    ) -> CGResults:
        rhs = tf.ensure_shape(rhs, [operator.num_params, None])
        return block_cg(operator, rhs, tol, max_iter, space=(w, aw, e_inv), record=record)

    return compile_loop(operator, ("cg.deflated", tol, max_iter), run, free=(0, 1, 2, 3))


def positive_inverse(values: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
    """The inverse of ``vectors @ diag(values) @ vectors^T`` on its positive eigenvalues."""
    safe = tf.where(values > 0, values, tf.ones_like(values))
    return tf.matmul(vectors / safe, vectors, transpose_b=True)


def orthonormal_columns(a: tf.Tensor) -> tf.Tensor:
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


def column_cg(operator: CurvatureOperator, rhs: tf.Tensor, tol: float, max_iter: int) -> CGResults:
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


def block_cg(
    operator: CurvatureOperator,
    rhs: tf.Tensor,
    tol: float,
    max_iter: int,
    space: tuple[tf.Tensor, tf.Tensor, tf.Tensor] | None = None,
    record: tf.Tensor | int | None = None,
) -> CGResults:
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
        inverse = positive_inverse(eigenvalues, eigenvectors)  # (P^T A P)^-1
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
        def stacked():
            blocks = array.stack()  # (t, p, k)
            return tf.reshape(tf.transpose(blocks, [1, 0, 2]), [rhs.shape[0], -1])

        # An empty list cannot be stacked when k is not static (no iteration ran).
        return tf.cond(array.size() > 0, stacked, lambda: tf.zeros([rhs.shape[0], 0], dtype))

    return x, i, residual, bad, rayleigh, columns(kept), columns(kept_products)
