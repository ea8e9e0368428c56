"""The Gauss-Newton matrix in a projection's coordinates, ``P^T G P``, from output draws.

    P^T G P = (1/n) sum_j P^T J_j^T H_L,j J_j P = (1/n) sum_j sum_d w_d Psi_jd Psi_jd^T

``Psi_jd = P^T J_j^T u_jd`` is the projection of the backward pass of draw ``d`` of
example ``j`` (``engine.output_draws``: ``u = H_L^(1/2) eps`` with ``eps`` every
column of the identity for ``samples="exact"``, which makes the sum exact, or
``m`` seeded normal draws of weight ``1/m``, unbiased). ``H_L,j`` holds the
example's sample weight. The regulariser's Hessian is not in it.

The draws are projected as the index rows are (``GradientProjection``): with
Kronecker units, ``P_in^T a`` of a layer's inputs once per batch and ``P_out^T
delta_d`` of the output gradients of each draw, so no per-example gradient of
those layers is formed; the dense part projects the draws' per-example gradients
of its variables, all draws of a batch in one product (one generation of a dense
matrix too large to keep). A batch costs one forward pass, one backward pass per
draw and a ``(b * draws, dim)`` Gram product.

Draws are seeded by ``(seed, 2 * j + DRAW_STREAM)`` for the example at position
``j``: apart from the seeds of the projection's own matrices (``(seed, i)`` with
``i >= 0``), and the same for any batch size or number of replicas.

References:
    Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing Model Behavior at
    Scale", ICML 2023 (the Gauss-Newton matrix of projected gradients). Martens,
    "New Insights and Perspectives on the Natural Gradient Method", JMLR 2020.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence.engine.compile import SpecFunction
from tf_influence.engine.curvature import tf_variable
from tf_influence.engine.factored import Use, _recording
from tf_influence.engine.output_draws import output_draws, training_sums
from tf_influence.engine.projection import GradientProjection

# The second component of a draw's stateless seed is 2 * position + DRAW_STREAM.
DRAW_STREAM = -(2**62)


class ProjectedGaussNewton:
    """``sum_j sum_d w_d Psi_jd Psi_jd^T`` over the training data, float64 ``(dim, dim)``.

    Args:
        projection: the ``GradientProjection`` the index rows are taken in.
        samples: ``"exact"`` or the number of normal draws per example.
        seed: the integer the draws are seeded by (with the examples' positions).
    """

    def __init__(self, projection: GradientProjection, samples: int | str, seed: int):
        self.projection = projection
        self.objective = projection.objective
        self.samples = samples
        self.seed = int(seed)
        self._step = SpecFunction(self._gram_step, relaxed=(0, 1, 2))

    def gram(self, operator: Any, on_batch: Any = lambda: None) -> tf.Tensor:
        """One pass over ``operator``'s training data: the sum, ``(dim, dim)`` float64.

        Args:
            operator: the curvature operator (its training data, and replicas).
            on_batch: called after each batch.
        """
        data = operator.data
        x, y = data.first_batch()
        self.projection.uses_factors(x, y)
        like = tf.zeros([self.projection.dim] * 2, tf.float64)
        return training_sums(operator, self._step, like, self.batch_size(data), (), on_batch)

    def batch_size(self, data: Any) -> int:
        """Examples per step: as for the index (``rows_per_pass``), shared among the draws."""
        passed = self.projection.rows_per_pass
        if passed is None:
            return data.batch_size
        x, _ = data.first_batch()
        outputs = self.objective.predict(tf.nest.map_structure(lambda t: t[:1], x))
        width = sum(int(np.prod(t.shape[1:], dtype=np.int64)) for t in tf.nest.flatten(outputs))
        draws = width if self.samples == "exact" else self.samples
        return max(data.batch_size, passed // max(draws, 1))

    def _gram_step(self, x, y, positions):
        """``sum_j sum_d w_d Psi_jd Psi_jd^T`` over a batch: products in the model's dtype."""
        projection, objective = self.projection, self.objective
        factored = projection.gradients.factored if projection.uses_factors(x, y) else None
        variables = [tf_variable(v) for v in objective.variables]
        records: list = []
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(variables)
            with _recording(factored.layers if factored else [], records):
                outputs = objective.predict(x)
            draws = output_draws(
                objective, outputs, y, positions, self.samples, self.seed, DRAW_STREAM
            )
        size = tf.shape(tf.nest.flatten(outputs)[0])[0]
        dtype = projection.dtype
        zs = [z for _, _, z in records]

        def jacobians(pseudo, indices):
            found = tape.jacobian(
                pseudo, [variables[i] for i in indices], experimental_use_pfor=True
            )
            return [None if g is None else tf.reshape(g, [size, -1]) for g in found]

        units, rests = [], []
        for weight, pseudo in draws:
            scale = tf.constant(np.sqrt(weight), dtype)
            if factored is not None and records:
                deltas = tape.gradient(pseudo, zs)
                uses = [
                    Use(entry, inputs, tf.zeros_like(z) if d is None else d)
                    for (entry, inputs, z), d in zip(records, deltas, strict=True)
                ]
                part, rest = projection.factored_parts(
                    uses, size, lambda indices, p=pseudo: jacobians(p, indices)
                )
                units.append(part * scale)
            else:  # every variable's per-example gradients, projected at once below
                found = jacobians(pseudo, range(len(variables)))
                sizes = objective.layout.sizes
                rest = tf.concat(
                    [
                        tf.zeros([size, n], dtype) if g is None else tf.cast(g, dtype)
                        for g, n in zip(found, sizes, strict=True)
                    ],
                    axis=1,
                )
            if rest is not None:
                rests.append(tf.cast(rest, dtype) * scale)
        if not draws:  # a loss that does not depend on the outputs
            return tf.zeros([projection.dim] * 2, tf.float64)
        rest = tf.concat(rests, axis=0) if rests else None
        if units:
            rows = projection.join(tf.concat(units, axis=0), rest)
        else:
            rows = tf.transpose(projection.project(tf.transpose(rest)))
        return tf.cast(tf.matmul(rows, rows, transpose_a=True), tf.float64)
