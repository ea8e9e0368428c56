"""Hessian-vector products of the training objective, compiled with ``tf.function``.

    H = hessian(R)(theta_hat) + damping * I,   R(theta) = (1/n) sum_j L(z_j, theta) + Omega(theta)

Two ways to form the product, both exact:

* ``"reverse_over_reverse"`` (the reference): nested ``tf.GradientTape``s; the
  inner tape gives ``g = grad R``, the outer tape differentiates ``g . v``.
* ``"forward_over_reverse"``: a ``tf.autodiff.ForwardAccumulator`` pushes ``v``
  forward through the gradient computation (Pearlmutter's R-operator); it does
  not keep a second backward graph and is usually the faster.

Several vectors are handled at once (vectorised with pfor), and the sum over the
training set is accumulated batch by batch inside the graph, so memory is
bounded by the batch size, never by ``n_train``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import tensorflow as tf

from tf_influence._compile import BatchFunction
from tf_influence.data import ExampleData
from tf_influence.distribute import ReplicaData
from tf_influence.objective import Objective

# Columns per matvec when the dense Hessian is assembled from Hessian-vector products.
DENSE_CHUNK = 128

HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")
# "auto" picks this one: benchmarks/run.py measures both side by side; on the digits
# MLP and CNN they run at the same speed, and nested tapes trace twice as fast.
DEFAULT_HVP_MODE = "reverse_over_reverse"


def check_hvp_mode(mode: str) -> str:
    if mode == "auto":
        return DEFAULT_HVP_MODE
    if mode not in HVP_MODES:
        raise ValueError(
            f'Argument `hvp` must be "auto" or one of {list(HVP_MODES)}. Received: hvp={mode!r}'
        )
    return mode


def tf_variable(variable):
    """The ``tf.Variable`` behind a Keras variable (ForwardAccumulator needs it).

    A plain ``tf.Variable`` (Keras 3.4's ``TFSMLayer`` tracks those) is returned as
    it is: its ``value`` is a method, not the variable.
    """
    if isinstance(variable, tf.Variable):
        return variable
    return getattr(variable, "value", variable)


class HessianOperator:
    """The matrix-free operator ``v -> (H + damping * I) v`` over a training set.

    Args:
        objective: the per-example loss, regularisation and parameters.
        data: the training examples, in a fixed order.
        damping: non-negative number added to the diagonal.
        hvp: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.
        jit_compile: compile the per-batch product with XLA.
        strategy: None, or a ``tf.distribute.Strategy``: each replica then computes
            the products on its shard of every batch and the sums are all-reduced
            (see ``tf_influence.distribute``).

    Attributes:
        num_params: p, the side of the (p, p) operator.
        num_examples: n, the number of training examples.
        dtype: the dtype of vectors it acts on (the parameters' dtype).
    """

    def __init__(
        self,
        objective: Objective,
        data: ExampleData,
        damping: float = 0.0,
        hvp: str = "auto",
        jit_compile: bool = False,
        strategy=None,
    ):
        self.objective = objective
        self.data = data
        self.strategy = strategy
        self.replicas = None if strategy is None else ReplicaData(data, strategy)
        self.damping = float(damping)
        self.hvp_mode = check_hvp_mode(hvp)
        self.jit_compile = bool(jit_compile)
        self._batch_hvp = (
            tf.function(self._hvp, jit_compile=True) if self.jit_compile else self._hvp
        )
        self.num_params = objective.num_params
        self.num_examples = data.num_examples
        self.dtype = objective.dtype
        self._cache: dict = {}
        spec = tf.TensorSpec([self.num_params, None], self.dtype)
        # Traced once per number of columns: a static k lets one vector take the
        # plain-gradient path instead of the vectorised one.
        self._matvec = tf.function(self._matvec_impl)
        self._batch_matvec = BatchFunction(
            lambda x, y, vectors: self._batch_matvec_impl(vectors, x, y), [spec]
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def clear_cache(self) -> None:
        """Drops what was computed from the weights (after they changed).

        Compiled functions (solver graphs) are kept: they read the variables live.
        """
        for key, value in list(self._cache.items()):
            if isinstance(value, HessianOperator):
                value.clear_cache()
            elif not callable(value):
                del self._cache[key]

    def cached(self, key: Hashable, make: Callable):
        """Memoises ``make()`` on this operator (until ``clear_cache``)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- products -------------------------------------------------------------------------
    def _objective_value(self, x, y, loss_weight, regularization_weight):
        total = tf.zeros([], self.dtype)
        if x is not None:
            total += loss_weight * tf.reduce_sum(self.objective.per_example_loss(x, y))
        if regularization_weight:
            total += regularization_weight * self.objective.regularization()
        return total

    def _hvp(self, x, y, vectors, loss_weight, regularization_weight):
        """``hessian(loss_weight * sum_batch L + regularization_weight * Omega) @ vectors``."""
        if self.hvp_mode == "forward_over_reverse":
            return self._hvp_forward_over_reverse(x, y, vectors, loss_weight, regularization_weight)
        variables = self.objective.variables
        layout = self.objective.layout
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = self._objective_value(x, y, loss_weight, regularization_weight)
            flat_grad = layout.flatten(inner.gradient(total, variables), self.dtype)
            projections = tf.linalg.matvec(vectors, flat_grad, transpose_a=True)  # (k,)
        if vectors.shape[1] == 1:
            column = layout.flatten(outer.gradient(projections, variables), self.dtype)
            return column[:, None]
        columns = outer.jacobian(projections, variables)
        k = tf.shape(vectors)[1]
        return tf.transpose(layout.flatten_batched(columns, k, self.dtype))  # (p, k)

    def _hvp_forward_over_reverse(self, x, y, vectors, loss_weight, regularization_weight):
        variables = self.objective.variables
        layout = self.objective.layout
        primals = [tf_variable(v) for v in variables]

        def one(vector):
            with tf.autodiff.ForwardAccumulator(primals, layout.unflatten(vector)) as acc:
                with tf.GradientTape() as tape:
                    total = self._objective_value(x, y, loss_weight, regularization_weight)
                grads = tape.gradient(total, variables)
            return layout.flatten([None if g is None else acc.jvp(g) for g in grads], self.dtype)

        return tf.transpose(tf.vectorized_map(one, tf.transpose(vectors)))

    def _matvec_impl(self, vectors):
        n = tf.cast(self.num_examples, self.dtype)
        if self.replicas is not None:
            total = self.replicas.fold_sum(
                lambda x, y: self._batch_hvp(x, y, vectors, 1.0 / n, 0.0), tf.zeros_like(vectors)
            )
        else:
            total = self.data.fold(
                lambda acc, batch: acc + self._batch_hvp(batch[0], batch[1], vectors, 1.0 / n, 0.0),
                tf.zeros_like(vectors),
            )
        if self.objective.has_regularization():
            total += self._hvp(None, None, vectors, 0.0, 1.0)
        return total + self.damping * vectors

    def _batch_matvec_impl(self, vectors, x, y):
        size = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], self.dtype)
        if self.replicas is not None:
            result = self.replicas.split_sum(
                lambda xs, ys: self._batch_hvp(xs, ys, vectors, 1.0 / size, 0.0), x, y, vectors
            )
        else:
            result = self._batch_hvp(x, y, vectors, 1.0 / size, 0.0)
        if self.objective.has_regularization():
            result += self._hvp(None, None, vectors, 0.0, 1.0)
        return result + self.damping * vectors

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + damping * I) @ vectors`` over the whole training set.

        Args:
            vectors: shape ``(num_params,)`` or ``(num_params, k)``.

        Returns:
            A tensor of the same shape as ``vectors``.
        """
        vectors = tf.convert_to_tensor(vectors, self.dtype)
        if vectors.shape.rank == 1:
            return self._matvec(vectors[:, None])[:, 0]
        return self._matvec(vectors)

    def batch_matvec(self, vectors: tf.Tensor, batch) -> tf.Tensor:
        """An unbiased estimate of ``(H + damping * I) @ vectors`` from one batch ``(x, y)``.

        Uses ``(1/b) sum_{j in batch} hessian(L_j) + hessian(Omega) + damping * I``.
        """
        return self._batch_matvec(batch[0], batch[1], tf.convert_to_tensor(vectors, self.dtype))

    def subsample(self, size: int, seed: int = 0) -> HessianOperator:
        """The same operator over a fixed random subset of ``size`` training examples.

        An unbiased, cheaper estimate of H for large training sets; cached per
        ``(size, seed)``.
        """

        def make():
            data = self.data.subset(size, seed)
            return HessianOperator(
                self.objective, data, self.damping, self.hvp_mode, self.jit_compile, self.strategy
            )

        return self.cached(("subsample", int(size), int(seed)), make)

    @property
    def num_dense_chunks(self) -> int:
        """How many matvecs ``dense()`` takes."""
        return -(-self.num_params // DENSE_CHUNK)

    def dense(self, progress: Callable[[int], None] | None = None) -> tf.Tensor:
        """The dense ``(p, p)`` matrix ``H + damping * I`` in float64, symmetrised.

        Built from Hessian-vector products in chunks of columns, so it costs about
        ``p / DENSE_CHUNK`` passes over the data. Only sensible for small ``p``.

        Args:
            progress: optional callable, called with the number of chunks done.
        """

        def make():
            p = self.num_params
            eye = tf.eye(p, dtype=self.dtype)
            chunks = []
            for start in range(0, p, DENSE_CHUNK):
                chunks.append(self._matvec(eye[:, start : start + DENSE_CHUNK]))
                if progress is not None:
                    progress(len(chunks))
            matrix = tf.cast(tf.concat(chunks, axis=1), tf.float64)
            return 0.5 * (matrix + tf.transpose(matrix))

        return self.cached("dense", make)
