"""Per-example gradients and their dot products with solved vectors, vectorised.

For a batch of b examples, ``tf.GradientTape.jacobian`` (vectorised with pfor)
gives all b gradients of the per-example loss in one pass, flattened to a
``(b, p)`` matrix. Scores against the inverse-HVP vectors of the test points
are one matrix product per batch, so memory is bounded by the batch and the
number of test points, never by the size of the training set.
"""

from __future__ import annotations

import tensorflow as tf

from tf_influence._compile import BatchFunction
from tf_influence.objective import Objective


class PerExampleGradients:
    """``grad_theta L(z_j, theta)`` for every example of a batch.

    Args:
        objective: the per-example loss and the parameters.
    """

    def __init__(self, objective: Objective):
        self.objective = objective
        self._gradients = BatchFunction(self._gradients_impl)
        solutions = tf.TensorSpec([objective.num_params, None], objective.dtype)
        self._scores = BatchFunction(self._scores_impl, [solutions])

    def _gradients_impl(self, x, y):
        variables = self.objective.variables
        with tf.GradientTape() as tape:
            losses = self.objective.per_example_loss(x, y)
        jac = tape.jacobian(losses, variables)
        size = tf.shape(losses)[0]
        return self.objective.layout.flatten_batched(jac, size, self.objective.dtype)

    def _scores_impl(self, x, y, solutions):
        grads = self._gradients_impl(x, y)  # (b, p)
        scores = -tf.matmul(solutions, grads, transpose_a=True, transpose_b=True)  # (k, b)
        finite = tf.reduce_all(tf.math.is_finite(grads), axis=1)  # (b,)
        return scores, finite

    def __call__(self, x, y) -> tf.Tensor:
        """Gradients of shape ``(batch, num_params)``."""
        return self._gradients(x, y)

    def scores(self, x, y, solutions) -> tuple[tf.Tensor, tf.Tensor]:
        """``-grad L(z_j) . solutions[:, i]`` for the batch, without keeping the gradients.

        Args:
            x, y: a batch of b training examples.
            solutions: ``(num_params, k)``, the vectors ``inv(H) @ grad L(z_test_i)``.

        Returns:
            ``(scores, finite)``: scores of shape ``(k, b)`` and a ``(b,)`` boolean that is
            False where an example's gradient holds NaN or inf.
        """
        return self._scores(x, y, tf.convert_to_tensor(solutions, self.objective.dtype))

    def tracing_count(self) -> int:
        """Traces so far of the gradient and scoring functions (for retracing checks)."""
        return self._gradients.tracing_count() + self._scores.tracing_count()
