"""Predicted effect of removing groups of training examples (first and second order).

Removing the examples of a group ``U`` (``m = |U|`` of ``n``) turns the objective
``R(theta) = (1/n) sum_j L_j(theta) + Omega(theta)`` into ``R + G`` with

    G(theta) = -(1/n) sum_{j in U} L_j(theta)                    (renormalize=False)
    G(theta) = -(1/n) sum_{j in U} L_j(theta) - (m/n) Omega(theta)  (renormalize=True)

(the second is what ``model.fit`` on the remaining ``n - m`` examples minimises, up to
the factor ``n / (n - m)``: a mean over fewer examples weighs ``Omega`` more). With
``H = hessian(R) + damping*I``, the parameters move by

    order 1:  d1 = -inv(H) grad G = inv(H) [(1/n) sum_U grad L_j (+ (m/n) grad Omega)]
    order 2:  d2 = d1 - inv(H) hessian(G) d1
                 = d1 + inv(H) [(1/n) sum_U hessian(L_j) (+ (m/n) hessian(Omega))] d1

(order 1 is Koh et al. 2019's sum of single influences; order 2 is the next term of
the series in the group's own curvature, Basu, You & Feizi 2020, which captures
interactions inside the group; third derivatives are dropped). The predicted change
of test loss ``i`` is ``grad L(z_test_i)^T d``. For a group of one, order 1 without
renormalisation equals ``-scores[i, j] / n``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_influence._errors import check_training_indices, describe
from tf_influence._progress import resolve_verbose
from tf_influence.engine.compile import GraphFunction


def check_groups(groups, num_train: int) -> list[np.ndarray]:
    """Groups as sorted integer index arrays, or a ValueError naming the bad one."""
    if isinstance(groups, np.ndarray) and groups.ndim == 1 and groups.dtype != object:
        groups = [groups]
    try:
        items = list(groups)
    except TypeError:
        items = None
    if not items:
        raise ValueError(
            "Argument `groups` must be a non-empty list of groups, each a list/array of "
            f"training indices. Received: groups={describe(groups)}"
        )
    result = []
    for g, group in enumerate(items):
        array = check_training_indices(group, num_train, f"Group {g} of argument `groups`")
        unique = np.unique(array)
        if unique.size != array.size:
            raise ValueError(
                f"Group {g} of argument `groups` repeats training indices; each example can "
                f"be removed once. Received: {array.size} indices, {unique.size} distinct."
            )
        result.append(unique)
    return result


def membership(groups: list[np.ndarray], start: int, size: int, dtype) -> np.ndarray:
    """``(size, n_groups)`` 0/1 matrix: does training example ``start + r`` belong to group g."""
    matrix = np.zeros((size, len(groups)), dtype)
    for g, group in enumerate(groups):
        inside = group[(group >= start) & (group < start + size)]
        matrix[inside - start, g] = 1.0
    return matrix


class GroupCurvature:
    """The products a second-order prediction needs: ``(1/n) sum_{j in U} hessian(L_j) v``.

    One compiled function per (batch shape); a group's product visits only the batches
    that hold its examples.
    """

    def __init__(self, objective):
        self.objective = objective
        self._product = GraphFunction(self._weighted_hvp)

    def _weighted_hvp(self, x, y, weights, vector):
        variables = self.objective.variables
        layout = self.objective.layout
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                losses = self.objective.per_example_loss(x, y)
                total = tf.reduce_sum(tf.cast(weights, losses.dtype) * losses)
            grad = layout.flatten(inner.gradient(total, variables), self.objective.dtype)
            dot = tf.reduce_sum(grad * vector)
        return layout.flatten(outer.gradient(dot, variables), self.objective.dtype)

    def products(self, data, groups, vectors, scale: float):
        """``scale * sum_{j in U_g} hessian(L_j) @ vectors[:, g]`` for every group g."""
        dtype = self.objective.dtype.as_numpy_dtype
        out = [tf.zeros_like(vectors[:, 0]) for _ in groups]
        start = 0
        for batch in data.batches():
            size = int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
            member = membership(groups, start, size, dtype) * scale
            for g in np.flatnonzero(member.any(axis=0)):
                out[g] += self._product(batch[0], batch[1], member[:, g], vectors[:, g])
            start += size
        return tf.stack(out, axis=1)


def predict_removal(im, groups, x_test, y_test, order, renormalize, batch_size, verbose, target):
    """``InfluenceModel.predict_removal`` (see its docstring)."""
    im._require_current("predict_removal")
    groups = check_groups(groups, im.num_train)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"Argument `order` must be 1 or 2. Received: order={order!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(
            f"Argument `renormalize` must be True or False. Received: renormalize={renormalize!r}"
        )
    resolve_verbose(verbose)  # checked; the work below is a few passes, no bar
    n = im.num_train
    dtype = im.objective.dtype
    tests = im._test_data(x_test, y_test, batch_size)
    test_grads = tf.concat(
        [
            im._test_gradients(batch, target, check=step == 0)[1]()
            for step, batch in enumerate(tests.batches())
        ],
        axis=0,
    )  # (k, p)
    # (1/n) sum_{j in U} grad L_j for every group, (p, n_groups), one pass over the data.
    sums = tf.zeros([im.num_params, len(groups)], dtype)
    start = 0
    for batch in im._data.batches():
        grads = im._gradients(batch[0], batch[1])
        size = int(grads.shape[0])
        member = membership(groups, start, size, dtype.as_numpy_dtype)
        if member.any():
            sums += tf.matmul(grads, member, transpose_a=True) / n
        start += size
    sizes = tf.constant([g.size / n for g in groups], dtype)
    if renormalize and im.objective.has_regularization():
        with tf.GradientTape() as tape:
            omega = im.objective.regularization()
        grad_omega = im.objective.layout.flatten(
            tape.gradient(omega, im.objective.variables), dtype
        )
        sums += grad_omega[:, None] * sizes[None, :]
    first, diagnostics = im.solver.solve(im._operator, sums)
    im._warn_if_unconverged(diagnostics, "groups")
    if order == 2:
        curvature = GroupCurvature(im.objective)
        bracket = curvature.products(im._data, groups, first, 1.0 / n)
        if renormalize and im.objective.has_regularization():
            bracket += im._operator._hvp(None, None, first, 0.0, 1.0) * sizes[None, :]
        correction, diagnostics = im.solver.solve(im._operator, bracket)
        im._warn_if_unconverged(diagnostics, "groups")
        first = first + correction
    im.diagnostics = diagnostics
    return tf.matmul(test_grads, first).numpy()
