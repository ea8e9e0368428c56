"""Influence of perturbing a training input (Koh & Liang 2017, I_pert,loss).

    I_pert,loss(z_j, z_test) = -grad_theta L(z_test)^T @ inv(H) @ grad_x grad_theta L(z_j)

a tensor shaped like the input ``x_j``: moving ``x_j`` by a small ``delta`` (label
kept) and refitting changes the test loss by about ``I_pert . delta / n``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_influence._errors import check_training_indices
from tf_influence.engine.compile import GraphFunction
from tf_influence.engine.vectorize import vectorized_map


def check_indices(indices, num_train: int) -> np.ndarray:
    array = np.asarray(indices)
    return check_training_indices(
        array[None] if array.ndim == 0 else array, num_train, "Argument `x_train_indices`"
    )


class PerturbationGradients:
    """``-solutions^T @ grad_x grad_theta L(z_j)`` for a batch of training examples."""

    def __init__(self, objective):
        self.objective = objective
        self._function = GraphFunction(self._impl, model=objective.model)

    def _impl(self, x, y, solutions):
        variables = self.objective.variables
        layout = self.objective.layout
        leaves = tf.nest.flatten(x)
        with tf.GradientTape() as outer:
            outer.watch(leaves)
            with tf.GradientTape() as inner:
                # Example j's input only reaches its own loss (inference mode), so the
                # input gradient of the summed projection is per example.
                total = tf.reduce_sum(self.objective.per_example_loss(x, y))
            grad = layout.flatten(inner.gradient(total, variables), self.objective.dtype)
            projections = tf.linalg.matvec(solutions, grad, transpose_a=True)  # (k,)

        # The Jacobian of the k projections, one backward pass per row: vectorised with
        # pfor, or looped where pfor cannot (recurrent layers; see engine/vectorize.py).
        def row(seed):
            return outer.gradient(projections, leaves, output_gradients=seed)

        jacobians = vectorized_map(row, tf.eye(tf.shape(projections)[0], dtype=projections.dtype))
        return tf.nest.pack_sequence_as(x, [-j for j in jacobians])  # each (k, m, ...)

    def __call__(self, x, y, solutions):
        for leaf in tf.nest.flatten(x):
            if not leaf.dtype.is_floating:
                raise ValueError(
                    "Perturbation influence needs floating-point inputs (it differentiates "
                    f"with respect to them). Received: training inputs of dtype "
                    f"{leaf.dtype.name}, e.g. token ids. Use `explain` for discrete inputs."
                )
        return self._function(x, y, solutions)


def explain_perturbation(state, x_train_indices, x_test, y_test, batch_size, verbose, target):
    """``InfluenceModel.explain_perturbation`` (see its docstring), on a ``FittedState``."""
    indices = check_indices(x_train_indices, state.num_train)
    solutions = state.inverse_hvp_tests(x_test, y_test, batch_size, verbose, target)
    x, y = state.data.gather(indices)
    perturbation = PerturbationGradients(state.objective)
    size = state.batch_size
    parts = []
    for start in range(0, indices.size, size):
        chunk = tf.nest.map_structure(lambda t, s=start: t[s : s + size], (x, y))
        parts.append(perturbation(chunk[0], chunk[1], solutions))
    return tf.nest.map_structure(lambda *blocks: tf.concat(blocks, axis=1).numpy(), *parts)
