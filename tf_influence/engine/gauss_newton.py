"""The generalised Gauss-Newton curvature: ``v -> (G + damping * I) v``, matrix-free.

    G = (1/n) sum_j J_j^T H_L,j J_j + hessian(Omega)

``J_j`` is the Jacobian of the model's outputs ``z_j = model(x_j)`` (inference
mode, as the objective runs it) with respect to the parameters, and
``H_L,j = d2 L_j / d z_j^2`` the Hessian of the per-example loss with respect to
those outputs (small: outputs x outputs). Each product is three steps per batch:
``J v`` (forward mode with ``hvp="forward_over_reverse"``, else the double
vector-Jacobian trick), ``H_L (J v)`` by autodiff of the loss on the outputs, and
``J^T (H_L J v)`` by one vector-Jacobian product; vectorised over the columns.

G drops the term ``sum_o dL/dz_o * hessian(z_o)`` of the Hessian, which is what
makes it indefinite away from a minimum. So G is positive semi-definite whenever
every ``H_L,j`` is (true of cross-entropy on logits or probabilities, MSE, and
every convex loss of the outputs), and equals the Hessian when the outputs are
linear in the parameters (a linear or logistic model). The regulariser keeps its
exact Hessian.

``GaussNewtonOperator`` subclasses ``HessianOperator`` and replaces only the
per-batch product, so batching, distribution, ``dense``, ``subsample``, ``cached``
and the shared traces (under a key of their own) are the Hessian's.

References:
    Schraudolph, "Fast Curvature Matrix-Vector Products for Second-Order Gradient
    Descent", Neural Computation 2002. Martens, "New Insights and Perspectives on
    the Natural Gradient Method", JMLR 2020. Bae, Ng, Lo, Ghassemi & Grosse, "If
    Influence Functions are the Answer, Then What is the Question?", NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence.engine.compile import SpecFunction, objective_key, shared_function
from tf_influence.engine.curvature import HessianOperator, tf_variable
from tf_influence.engine.objective import Objective
from tf_influence.engine.vectorize import vectorized_map

# A loss is refused when an example's output Hessian has an eigenvalue below
# -LOSS_PSD_TOLERANCE times the largest magnitude among them (rounding noise passes).
LOSS_PSD_TOLERANCE = 1e-6


def check_loss_curvature(objective: Objective, batch: tuple) -> None:
    """Refuses a loss whose Hessian on the model's outputs is not positive semi-definite.

    Computes every example's ``d2 L_j / d z_j^2`` on ``batch = (x, y)`` (one small
    ``(outputs, outputs)`` matrix each) and checks its eigenvalues.

    Raises:
        ValueError: an eigenvalue is clearly negative (below ``-LOSS_PSD_TOLERANCE``
            times the largest); it names the loss and suggests ``curvature="hessian"``.
    """
    # Compiled: eagerly, batch_jacobian wraps pfor in a tf.function of TensorFlow's
    # own each time, which TensorFlow then reports as retracing after a few
    # Gauss-Newton models. Shared per model and objective configuration, so a refit
    # or a second InfluenceModel checks without tracing again; any batch size.
    check = shared_function(
        objective,
        objective.model,
        ("gauss_newton.loss_check", objective_key(objective)),
        "_output_hessians",
        lambda body: SpecFunction(body, relaxed=(0, 1)),
        method=_output_hessians,
    )
    hessians = check(batch[0], batch[1])
    if hessians is None:
        return
    values = np.linalg.eigvalsh(tf.cast(hessians, tf.float64).numpy())
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    smallest = float(np.min(values)) if values.size else 0.0
    if smallest < -LOSS_PSD_TOLERANCE * scale:
        example = int(np.argmin(np.min(values, axis=1)))
        raise ValueError(
            'curvature="gauss_newton" needs a loss whose Hessian with respect to the '
            "model's outputs is positive semi-definite (a convex function of the outputs, "
            f"such as cross-entropy or MSE). Received: loss {objective.loss_name!r}, whose "
            f"output Hessian at training example {example} has eigenvalue {smallest:.3g} "
            f'(largest magnitude {scale:.3g}). Use curvature="hessian" in `compile` for '
            "this loss."
        )


def _output_hessians(objective: Objective, x: Any, y: Any) -> tf.Tensor | None:
    """Every example's ``d2 L_j / d z_j^2``, ``(batch, outputs, outputs)``, or None."""
    return output_hessians(objective, objective.predict(x), y)


def output_hessians(objective: Objective, outputs: Any, y: Any) -> tf.Tensor | None:
    """``d2 L_j / d z_j^2`` at the model's ``outputs`` on a batch, ``(batch, K, K)``.

    ``K`` is the number of output values per example, over every output, in the
    order of ``tf.nest.flatten(outputs)``. None when the loss does not depend on the
    outputs.
    """
    flat = tf.nest.flatten(outputs)
    size = tf.shape(flat[0])[0]
    widths = [int(np.prod(t.shape[1:], dtype=np.int64)) for t in flat]
    joined = tf.stop_gradient(tf.concat([tf.reshape(t, [size, -1]) for t in flat], axis=1))
    with tf.GradientTape() as outer:
        outer.watch(joined)
        with tf.GradientTape() as inner:
            inner.watch(joined)
            parts = tf.split(joined, widths, axis=1)
            parts = [tf.reshape(p, tf.shape(t)) for p, t in zip(parts, flat, strict=True)]
            predictions = tf.nest.pack_sequence_as(outputs, parts)
            total = tf.reduce_sum(objective.loss_from_outputs(predictions, y))
        gradient = inner.gradient(total, joined)
    if gradient is None:
        return None  # the loss does not depend on the outputs: G is 0 there
    return outer.batch_jacobian(gradient, joined)


class GaussNewtonOperator(HessianOperator):
    """The matrix-free ``v -> (G + damping * I) v``, G the generalised Gauss-Newton matrix.

    ``G = (1/n) sum_j J_j^T H_L,j J_j + hessian(Omega)`` (see the module docstring):
    positive semi-definite for a loss that is convex in the model's outputs, and
    equal to the Hessian for linear models with canonical losses. The arguments and
    members are those of ``HessianOperator``; ``hvp="forward_over_reverse"`` forms
    ``J v`` with a ``tf.autodiff.ForwardAccumulator``, the default with two
    vector-Jacobian products.

    The loss is checked on the first training batch when the operator is made: a
    loss whose output Hessian is not positive semi-definite is refused.

    Raises:
        ValueError: the loss is not convex in the outputs (see
            ``check_loss_curvature``).
    """

    kind = "gauss_newton"
    positive_semidefinite = True

    def __init__(
        self,
        objective: Objective,
        data: Any,
        damping: float = 0.0,
        hvp: str = "auto",
        jit_compile: bool = False,
        strategy: tf.distribute.Strategy | None = None,
    ):
        check_loss_curvature(objective, data.first_batch())
        super().__init__(objective, data, damping, hvp, jit_compile, strategy)

    def _hvp_parts(self, x, y, tangents, loss_weight, regularization_weight):
        """``G(sum_batch loss_weight * L) v + regularization_weight * hessian(Omega) v``.

        Shapes as ``HessianOperator._hvp_parts``; without examples (``x`` None) this
        is the regulariser's exact Hessian product.
        """
        if x is None:
            return super()._hvp_parts(x, y, tangents, loss_weight, regularization_weight)
        parts = self._ggn_parts(x, y, tangents, loss_weight)
        if regularization_weight:
            regular = super()._hvp_parts(None, None, tangents, 0.0, regularization_weight)
            parts = [a + b for a, b in zip(parts, regular, strict=True)]
        return parts

    def _ggn_parts(self, x, y, tangents, loss_weight):
        variables = self.objective.variables
        single = tangents[0].shape.rank == len(self.objective.layout.shapes[0])
        forward = self.hvp_mode == "forward_over_reverse"
        primals = [tf_variable(v) for v in variables]
        with tf.GradientTape(persistent=True) as tape:
            outputs = self.objective.predict(x)
        flat = tf.nest.flatten(outputs)
        constants = [tf.stop_gradient(t) for t in flat]

        def jvp(tangent):
            if forward:
                with tf.autodiff.ForwardAccumulator(primals, list(tangent)) as acc:
                    again = tf.nest.flatten(self.objective.predict(x))
                return [
                    acc.jvp(t, unconnected_gradients=tf.UnconnectedGradients.ZERO) for t in again
                ]
            # J v = d/du (J^T u . v) at u = 0: two reverse passes, no forward mode.
            seeds = [tf.zeros_like(t) for t in flat]
            with tf.GradientTape() as outer:
                outer.watch(seeds)
                back = tape.gradient(flat, variables, output_gradients=seeds)
                dot = tf.add_n(
                    [tf.zeros([], self.dtype)]
                    + [
                        tf.reduce_sum(
                            tf.cast(tf.convert_to_tensor(b) * tf.cast(t, b.dtype), self.dtype)
                        )
                        for b, t in zip(back, tangent, strict=True)
                        if b is not None
                    ]
                )
            found = outer.gradient(dot, seeds)
            return [tf.zeros_like(s) if f is None else f for f, s in zip(found, seeds, strict=True)]

        def one(tangent):
            directions = jvp(tangent)
            curved = self._output_hessian_product(y, outputs, constants, directions, loss_weight)
            columns = tape.gradient(flat, variables, output_gradients=curved)
            return [
                tf.zeros_like(t) if c is None else tf.cast(tf.convert_to_tensor(c), self.dtype)
                for c, t in zip(columns, tangent, strict=True)
            ]

        if single:
            return one(list(tangents))
        return vectorized_map(one, list(tangents))

    def _output_hessian_product(self, y, outputs, constants, directions, loss_weight):
        """``H_L @ directions`` per example: the loss Hessian on the outputs, times weights."""
        with tf.GradientTape() as outer:
            outer.watch(constants)
            with tf.GradientTape() as inner:
                inner.watch(constants)
                predictions = tf.nest.pack_sequence_as(outputs, constants)
                losses = self.objective.loss_from_outputs(predictions, y)
                total = tf.reduce_sum(loss_weight * losses)
            grads = inner.gradient(total, constants)
            dot = tf.add_n(
                [tf.zeros([], self.dtype)]
                + [
                    tf.reduce_sum(tf.cast(g * tf.stop_gradient(tf.cast(d, g.dtype)), self.dtype))
                    for g, d in zip(grads, directions, strict=True)
                    if g is not None
                ]
            )
        found = outer.gradient(dot, constants)
        return [tf.zeros_like(c) if f is None else f for f, c in zip(found, constants, strict=True)]
