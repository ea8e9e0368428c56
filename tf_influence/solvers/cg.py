"""Conjugate gradients, matrix-free, for several right-hand sides at once.

This file holds the public ``CG`` solver: its arguments, how a solve is split
into blocks and which of them recycle, its diagnostics and its error. The
iterations themselves are in ``krylov.py``; the directions kept between solves
in ``recycling.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._validation import (
    check_bool,
    check_int,
    check_positive_float,
    check_positive_int,
)
from tf_influence.solvers.base import (
    GAUSS_NEWTON_HINT,
    CurvatureError,
    CurvatureOperator,
    Diagnostics,
    Solver,
    background_calls,
    nice_ceil,
)

# The kernels and recycling helpers that tests and benchmarks reach as tfi.solvers.cg.*
# are re-exported (``name as name``); krylov.py and recycling.py are their homes.
from tf_influence.solvers.krylov import deflated_solve_graph, solve_graph
from tf_influence.solvers.krylov import orthonormal_columns as orthonormal_columns
from tf_influence.solvers.recycling import RECYCLE_FALLBACK as RECYCLE_FALLBACK
from tf_influence.solvers.recycling import RECYCLE_PER_FLOP as RECYCLE_PER_FLOP
from tf_influence.solvers.recycling import RecycledSpace, recycle_capacity
from tf_influence.solvers.recycling import forward_flops as forward_flops

# Most values a recycled space holds (its directions W and their products A W), per
# operator: 2**26 is 256 MiB in float32. CG's memory policy, handed to recycle_capacity.
RECYCLE_BUDGET = 2**26


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
        self.seed = check_int("seed", seed)
        self.block = check_bool("block", block)
        if recycle != "auto" and (
            isinstance(recycle, bool) or not isinstance(recycle, (int, np.integer)) or recycle < 0
        ):
            raise ValueError(
                'Argument `recycle` must be "auto" or a non-negative integer (0 turns '
                f"recycling off). Received: recycle={recycle!r}"
            )
        self.recycle = recycle if recycle == "auto" else int(recycle)

    def get_config(self) -> dict[str, Any]:
        return {
            "tol": self.tol,
            "max_iter": self.max_iter,
            "hessian_sample_size": self.hessian_sample_size,
            "seed": self.seed,
            "block": self.block,
            "recycle": self.recycle,
        }

    def _max_iter(self, operator: CurvatureOperator) -> int:
        return self.max_iter or min(operator.num_params, 1000)

    def _recycle_capacity(self, operator: CurvatureOperator) -> int:
        return recycle_capacity(operator, self.recycle, RECYCLE_BUDGET)

    def _recycled(self, operator: CurvatureOperator, k: int) -> RecycledSpace | None:
        """The operator's recycled space, or None if this solve does not recycle.

        With ``recycle="auto"`` the capacity needs the forward flops (a trace of the
        loss): they are counted when the space first takes directions in, at the
        second solve, not before the first answer. Until then its bound decides
        how much a solve records.
        """
        if not self.block:
            return None
        bound = recycle_capacity(operator, self.recycle, RECYCLE_BUDGET, count=False)
        if bound < 1:
            return None
        if self.recycle != "auto" or k > operator.num_params - bound:
            capacity = self._recycle_capacity(operator)
            if capacity < 1 or k > operator.num_params - capacity:
                return None
        space = operator.cached(
            ("cg.recycled", self.recycle, RECYCLE_BUDGET), lambda: RecycledSpace(None, bound)
        )
        if space.needs_capacity:
            space.capacity = self._recycle_capacity(operator)
        return space

    def _deflated(self, operator: CurvatureOperator) -> Callable[..., Any]:
        return operator.cached(
            ("cg.recycling",) + tuple(self.get_config().values()),
            lambda: deflated_solve_graph(operator, self.tol, self._max_iter(operator)),
        )

    def warm_up(self, operator: CurvatureOperator) -> None:
        """Gets the recycling solve ready in the background if its trace is kept on disk.

        A solve of one zero column runs no iteration; its first call builds the
        graph (see ``tf_influence.engine.compile.in_background``), while ``fit``
        checks the data.
        """
        if self.hessian_sample_size is not None:
            return
        space = self._recycled(operator, 1)
        if space is None:
            return
        rhs = tf.zeros([operator.num_params, 1], operator.dtype)
        with background_calls():
            self._deflated(operator)(rhs, *space.tensors(operator), 0)

    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
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
                    ("cg",) + tuple(self.get_config().values()),
                    lambda: solve_graph(operator, self.tol, self._max_iter(operator), self.block),
                )
                parts.append(graph(chunk))
                continue
            graph = self._deflated(operator)
            recycled = space.width
            # Record no more blocks of directions than the space has room for.
            record = space.room(k)
            *out, directions, products = graph(chunk, *space.tensors(operator), record)
            if not out[3].numpy().any():
                space.extend(directions, products, k)
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
                "solver='exact' reports it exactly on small models)." + GAUSS_NEWTON_HINT
            )
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=int(iterations),
            residual_norm=residual,
            converged=residual <= self.tol,
            info={"recycled_directions": recycled},
        )
        return x, diagnostics
