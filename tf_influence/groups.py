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
from tf_influence._validation import check_bool
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
        self._product = GraphFunction(self._weighted_hvp, model=objective.model)

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

    def regularization_gradient(self) -> tf.Tensor:
        """``grad Omega``, flat ``(p,)``."""
        with tf.GradientTape() as tape:
            omega = self.objective.regularization()
        variables = self.objective.variables
        return self.objective.layout.flatten(tape.gradient(omega, variables), self.objective.dtype)

    def regularization_products(self, vectors: tf.Tensor) -> tf.Tensor:
        """``hessian(Omega) @ vectors`` for ``(p, k)`` columns (nested tapes)."""
        variables = self.objective.variables
        layout = self.objective.layout
        columns = []
        for g in range(int(vectors.shape[1])):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    omega = self.objective.regularization()
                grad = layout.flatten(inner.gradient(omega, variables), self.objective.dtype)
                dot = tf.reduce_sum(grad * vectors[:, g])
            columns.append(layout.flatten(outer.gradient(dot, variables), self.objective.dtype))
        return tf.stack(columns, axis=1)

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


def predict_removal(state, groups, x_test, y_test, order, renormalize, batch_size, target):
    """``InfluenceModel.predict_removal`` (see its docstring), on a ``FittedState``."""
    groups = check_groups(groups, state.num_train)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"Argument `order` must be 1 or 2. Received: order={order!r}")
    renormalize = check_bool("renormalize", renormalize)
    objective = state.objective
    n = state.num_train
    dtype = objective.dtype
    test_grads = state.test_gradient_matrix(x_test, y_test, batch_size, target)  # (k, p)
    # (1/n) sum_{j in U} grad L_j for every group, (p, n_groups), one pass over the data.
    sums = tf.zeros([state.num_params, len(groups)], dtype)
    start = 0
    for batch in state.batches():
        grads = state.gradients(batch[0], batch[1])
        size = int(grads.shape[0])
        member = membership(groups, start, size, dtype.as_numpy_dtype)
        if member.any():
            sums += tf.matmul(grads, member, transpose_a=True) / n
        start += size
    sizes = tf.constant([g.size / n for g in groups], dtype)
    renormalized = renormalize and objective.has_regularization()
    curvature = GroupCurvature(objective)
    if renormalized:
        sums += curvature.regularization_gradient()[:, None] * sizes[None, :]
    first = state.solve(sums, "groups")
    if order == 2:
        bracket = curvature.products(state.data, groups, first, 1.0 / n)
        if renormalized:
            bracket += curvature.regularization_products(first) * sizes[None, :]
        first = first + state.solve(bracket, "groups")
    return tf.matmul(test_grads, first).numpy()
