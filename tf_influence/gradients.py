"""Per-example gradients and their dot products with solved vectors, vectorised.

Scores of a batch of b training examples against k solved vectors
``s_i = inv(H) @ grad L(z_test_i)`` are ``-grad L(z_j) . s_i``. Two exact ways:

* ``"jacobian"``: per-example gradients vectorised over the batch with
  ``tf.vectorized_map`` (pfor) give the ``(b, p)`` matrix in one pass, then one ``(k, p) x (p, b)``
  matrix product. Cost about one batched backward pass, whatever k is.
* ``"jvp"``: a forward-mode ``tf.autodiff.ForwardAccumulator`` pushes each
  ``s_i`` through the per-example losses: the directional derivatives are the
  scores, and no gradient is ever materialised. Cost about k forward passes;
  cheaper when there are few test points.

``"auto"`` takes ``"jvp"`` up to ``JVP_MAX_TESTS`` test points and
``"jacobian"`` above. Memory is bounded by the batch and the number of test
points, never by the size of the training set.
"""

from __future__ import annotations

import tensorflow as tf

from tf_influence._compile import BatchFunction
from tf_influence.curvature import tf_variable
from tf_influence.objective import Objective

SCORING_MODES = ("jacobian", "jvp")
# "auto" uses forward-mode scoring up to this many test points per pass;
# benchmarks/run.py measures the two side by side (they cross near k = 16 on the
# digits MLP and between 20 and 64 on the CNN, whose convolution filter gradients
# pfor cannot vectorise).
JVP_MAX_TESTS = 32


class ForwardModeUnavailable(Exception):
    """Raised while tracing when forward mode gives no derivative of the loss."""


def check_scoring_mode(mode: str) -> str:
    if mode != "auto" and mode not in SCORING_MODES:
        raise ValueError(
            f'Argument `scoring` must be "auto" or one of {list(SCORING_MODES)}. '
            f"Received: scoring={mode!r}"
        )
    return mode


class PerExampleGradients:
    """``grad_theta L(z_j, theta)`` for every example of a batch, and scores against them.

    Args:
        objective: the per-example loss and the parameters.
        scoring: ``"auto"``, ``"jacobian"`` or ``"jvp"`` (see the module docstring).
        jit_compile: compile the per-batch functions with XLA.
    """

    def __init__(self, objective: Objective, scoring: str = "auto", jit_compile: bool = False):
        self.objective = objective
        self.scoring = check_scoring_mode(scoring)
        self._gradients = BatchFunction(self._gradients_impl, jit_compile=jit_compile)
        self._jit_compile = jit_compile
        self._target_functions: dict = {}
        self._jvp_unavailable = False
        solutions = tf.TensorSpec([objective.num_params, None], objective.dtype)
        self._scores = {
            "jacobian": BatchFunction(self._jacobian_scores, [solutions], jit_compile),
            "jvp": BatchFunction(self._jvp_scores, [solutions], jit_compile),
        }

    def _per_variable_gradients(self, x, y):
        """Per-example gradients, one ``(b, size)`` tensor per variable (None: no gradient).

        Vectorised over the batch with pfor. This is 7x faster than ``tape.jacobian``
        of the vector of losses on the digits MLP (2 vs 14 ms for 128 examples):
        pfor then sees one small backward pass instead of the reverse pass of the
        whole batch seeded with every one-hot vector.
        """
        variables = self.objective.variables

        def one(example):
            xi, yi = tf.nest.map_structure(lambda t: t[None], example)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(self.objective.per_example_loss(xi, yi))
            grads = tape.gradient(loss, variables)
            # pfor cannot stack None: mark missing gradients with an empty tensor.
            return [tf.zeros([0], self.objective.dtype) if g is None else g for g in grads]

        grads = tf.vectorized_map(one, (x, y))
        size = tf.shape(grads[0])[0] if grads else 0
        return [
            None if g.shape[1:].num_elements() == 0 and n else tf.reshape(g, [size, n])
            for g, n in zip(grads, self.objective.layout.sizes, strict=True)
        ]

    def _gradients_impl(self, x, y):
        grads = self._per_variable_gradients(x, y)
        size = tf.shape(tf.nest.flatten(y)[0])[0]
        dtype = self.objective.dtype
        parts = [
            tf.zeros([size, n], dtype) if g is None else tf.cast(g, dtype)
            for g, n in zip(grads, self.objective.layout.sizes, strict=True)
        ]
        return tf.concat(parts, axis=1)  # (b, p)

    def _jacobian_scores(self, x, y, solutions):
        # Per-variable products: no (b, p) concatenation, which costs as much memory
        # traffic as the gradients themselves.
        blocks = tf.split(solutions, self.objective.layout.sizes, axis=0)
        size = tf.shape(tf.nest.flatten(y)[0])[0]
        scores = tf.zeros([size, tf.shape(solutions)[1]], solutions.dtype)
        for g, block in zip(self._per_variable_gradients(x, y), blocks, strict=True):
            if g is not None:
                scores -= tf.matmul(tf.cast(g, solutions.dtype), block)
        scores = tf.transpose(scores)  # (k, b)
        # A NaN or inf in a gradient makes its scores NaN or inf.
        finite = tf.reduce_all(tf.math.is_finite(scores), axis=0)  # (b,)
        return scores, finite

    def _jvp_scores(self, x, y, solutions):
        primals = [tf_variable(v) for v in self.objective.variables]
        layout = self.objective.layout

        def one(solution):
            with tf.autodiff.ForwardAccumulator(primals, layout.unflatten(solution)) as acc:
                losses = self.objective.per_example_loss(x, y)
            jvp = acc.jvp(losses)
            if jvp is None:
                # The loss always depends on the parameters, so None means forward
                # mode could not see through an op (e.g. a function restored from a
                # SavedModel). Zeros would be a silent wrong answer.
                raise ForwardModeUnavailable()
            return jvp

        scores = -tf.vectorized_map(one, tf.transpose(solutions))  # (k, b)
        finite = tf.reduce_all(tf.math.is_finite(scores), axis=0)  # (b,)
        return scores, finite

    def target_gradients(self, target, x) -> tf.Tensor:
        """``grad_theta target(model, x_i)`` for every example, shape ``(batch, num_params)``.

        ``target(model, x)`` returns one scalar per example (shape ``(batch,)`` or
        ``(batch, 1)``), e.g. a class logit; it replaces the test loss.
        """
        entry = self._target_functions.get(id(target))
        if entry is None:
            function = BatchFunction(
                lambda x, unused: self._target_gradients_impl(target, x),
                jit_compile=self._jit_compile,
            )
            # Keep a reference: ids of collected functions can be reused.
            entry = self._target_functions[id(target)] = (target, function)
        size = tf.shape(tf.nest.flatten(x)[0])[0]
        return entry[1](x, tf.zeros([size], tf.int32))

    def _target_gradients_impl(self, target, x):
        variables = self.objective.variables
        layout = self.objective.layout
        dtype = self.objective.dtype

        def one(example):
            xi = tf.nest.map_structure(lambda t: t[None], example)
            with tf.GradientTape() as tape:
                with self.objective._full_precision():
                    value = tf.reduce_sum(tf.cast(target(self.objective.model, xi), dtype))
            return layout.flatten(tape.gradient(value, variables), dtype)

        return tf.vectorized_map(one, x)

    def __call__(self, x, y) -> tf.Tensor:
        """Gradients of shape ``(batch, num_params)``."""
        return self._gradients(x, y)

    def mode_for(self, num_tests: int) -> str:
        """The scoring mode used for ``num_tests`` solved vectors."""
        if self.scoring != "auto":
            return self.scoring
        return "jvp" if num_tests <= JVP_MAX_TESTS else "jacobian"

    def scores(self, x, y, solutions) -> tuple[tf.Tensor, tf.Tensor]:
        """``-grad L(z_j) . solutions[:, i]`` for the batch.

        Args:
            x, y: a batch of b training examples.
            solutions: ``(num_params, k)``, the vectors ``inv(H) @ grad L(z_test_i)``.

        Returns:
            ``(scores, finite)``: scores of shape ``(k, b)`` and a ``(b,)`` boolean that is
            False where an example's gradient (or score) holds NaN or inf.
        """
        solutions = tf.convert_to_tensor(solutions, self.objective.dtype)
        return self.run_scoring(lambda impl: impl(x, y, solutions), int(solutions.shape[1]))

    def run_scoring(self, call, num_tests: int):
        """``call(impl)`` with the scoring function for ``num_tests`` vectors.

        ``impl(x, y, solutions) -> (scores, finite)``; if forward mode cannot see
        through the model, "auto" falls back to per-example gradients for good.
        """
        mode = "jacobian" if self._jvp_unavailable else self.mode_for(num_tests)
        try:
            return call(self._scores[mode])
        except ForwardModeUnavailable:
            if self.scoring == "jvp":
                raise ValueError(
                    "Forward-mode scoring cannot differentiate this model: some op in it has "
                    "no forward-mode gradient (for example a function restored from a "
                    "SavedModel). Received: scoring='jvp'. Use scoring='jacobian' or 'auto' "
                    "in `compile`."
                ) from None
            self._jvp_unavailable = True  # "auto": per-example gradients from now on
            return call(self._scores["jacobian"])

    def tracing_count(self) -> int:
        """Traces so far of the gradient and scoring functions (for retracing checks)."""
        return self._gradients.tracing_count() + sum(
            f.tracing_count() for f in self._scores.values()
        )
