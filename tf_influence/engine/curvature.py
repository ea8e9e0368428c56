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

The compiled product is shared by every operator on the same Keras model with the
same parameters, loss, regularisers, ``hvp``, ``jit_compile`` and batch size
(``tf_influence/engine/compile.py``): the training data, its size and the damping
are arguments of the trace, not constants in it, so a second ``InfluenceModel``
(on these or other training arrays of the same structure) does not trace again.
Every batch has the same static shape (the last one is padded with examples that
weigh zero), so a product is traced once, not once for full batches and once more
for a short last batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_influence._fingerprint import weights_fingerprint
from tf_influence.distribute import ReplicaData
from tf_influence.engine import vectorize
from tf_influence.engine.compile import (
    BatchFunction,
    GraphFunction,
    SpecFunction,
    objective_key,
    shared_function,
)
from tf_influence.engine.data import ExampleData, fold_inputs
from tf_influence.engine.objective import Objective
from tf_influence.engine.vectorize import vectorized_map

# Columns per matvec when the dense Hessian is assembled from Hessian-vector products.
DENSE_CHUNK = 128

# Values computed from the weights (a dense H, its factor, CG's recycled directions),
# shared by operators of one model with the same configuration, training data,
# damping and weights: {model: {key: {cache key: value}}}, the latest few keys.
_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SHARED_VALUE_SETS = 2
# A value larger than this when made (a dense H of more than ~5,800 parameters, its
# factor) stays with its operator: sharing would keep it alive as long as the model.
SHARED_VALUE_BYTES = 256 * 2**20

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
        share_values: a class attribute, True by default: ``cached`` shares plain
            values of up to ``SHARED_VALUE_BYTES`` (CG's recycled directions, the
            solutions of test batches, a small dense H and its factor) between
            operators of the same model, configuration, training data, damping and
            weights, so a second ``InfluenceModel`` (a notebook cell run again)
            finds the solutions of the first and starts its solves from the first's
            recycled directions (answers within the solver's tolerance, as a second
            ``explain`` on one model). Set it to False for every fresh operator to
            start empty.
    """

    share_values = True
    # The curvature's name in ``compile(curvature=...)`` and in the shared-trace key.
    kind = "hessian"
    # Whether the curvature is positive semi-definite by construction (``damping="auto"``
    # then needs no estimate of the smallest eigenvalue).
    positive_semidefinite = False

    def __init__(
        self,
        objective: Objective,
        data: ExampleData,
        damping: float = 0.0,
        hvp: str = "auto",
        jit_compile: bool = False,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.objective = objective
        self.data = data
        self.strategy = strategy
        self.replicas = None if strategy is None else ReplicaData(data, strategy)
        self.damping = float(damping)
        self.hvp_mode = check_hvp_mode(hvp)
        vectorize.check_forward_mode(objective.model, self.hvp_mode)
        self.jit_compile = bool(jit_compile)
        self.num_params = objective.num_params
        self.num_examples = data.num_examples
        self.dtype = objective.dtype
        # Eagerly (the factors as Keras applies them), for the products of Omega.
        self._regularizer_scales = regularizer_curvatures(objective)
        self._cache: dict = {}
        self._values_key = None  # the key of the shared values (see `cached`)
        # Everything the traces depend on besides argument shapes (the data, its size
        # and the damping are arguments). Distributed operators keep traces of their own.
        self.trace_key = (
            None
            if self.replicas is not None
            else (
                self.kind,
                objective_key(objective),
                self.hvp_mode,
                self.jit_compile,
                data.fold_batch_size,
            )
        )

        def share(name, compile):
            return shared_function(self, objective.model, self.trace_key, name, compile)

        self._batch_hvp = (
            share("_hvp_parts", lambda fn: GraphFunction(fn, jit_compile=True))
            if self.jit_compile
            else self._hvp_parts
        )
        spec = tf.TensorSpec([self.num_params, None], self.dtype)
        scalar = tf.TensorSpec([], self.dtype)
        # Traced once per number of columns: a static k lets one vector take the
        # plain-gradient path instead of the vectorised one. Without autograph unless
        # needed (see GraphFunction): 0.7 s less on the first trace on the digits MLP.
        # The distributed sum loops over a distributed dataset, which needs it. The
        # training tensors (argument 3) get a free leading axis: any number of examples.
        autograph = self.replicas is not None
        self._matvec = share(
            "_matvec_impl", lambda fn: SpecFunction(fn, relaxed=(3,), autograph=autograph)
        )
        self._batch_matvec = share(
            "_batch_matvec_impl", lambda fn: BatchFunction(fn, [spec, scalar])
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def clear_cache(self) -> None:
        """Drops what was computed from the weights (after they changed).

        Compiled functions (solver graphs) are kept: they read the variables live.
        """
        self._values_key = None
        for key, value in list(self._cache.items()):
            if isinstance(value, HessianOperator):
                value.clear_cache()
            elif not callable(value):
                del self._cache[key]

    def set_damping(self, damping: float) -> None:
        """Sets the damping (``damping="auto"`` resolved at ``fit``) and drops cached values.

        Cached values depend on the damping (a dense matrix, its factor); subsampled
        operators take the new damping too.
        """
        self.damping = float(damping)
        self.clear_cache()
        for value in self._cache.values():
            if isinstance(value, HessianOperator):
                value.set_damping(damping)

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """Memoises ``make()`` on this operator (until ``clear_cache``).

        With ``share_values`` on (the default), plain values (tensors, arrays,
        numbers, and objects made only of those, such as CG's recycled directions)
        of up to ``SHARED_VALUE_BYTES`` are shared with every operator of the same
        model, configuration, training data, damping and weights: a second
        ``InfluenceModel`` on them finds the solutions, a small dense H, its factor
        or the recycled directions of the first. Functions and operators always
        stay on this operator (they hold it, and so the model).
        """
        if key in self._cache:
            return self._cache[key]
        shared = self._shared_values()
        if shared is not None and key in shared:
            value = shared[key]
        else:
            value = make()
            size = None if shared is None else _plain_bytes(value)
            if size is not None and size <= SHARED_VALUE_BYTES:
                shared[key] = value
        self._cache[key] = value
        return value

    def _shared_values(self) -> dict | None:
        if not self.share_values or self.trace_key is None:
            return None
        if self._values_key is None:
            self._values_key = (
                self.trace_key,
                self.damping,
                self.data.content_key,
                weights_fingerprint(self.objective.model.weights),
            )
        try:
            sets = _VALUES.setdefault(self.objective.model, {})
        except TypeError:
            return None
        if self._values_key not in sets:
            while len(sets) >= SHARED_VALUE_SETS:  # older weights: drop the oldest
                del sets[next(iter(sets))]
            sets[self._values_key] = {}
        return sets[self._values_key]

    # -- products -------------------------------------------------------------------------
    def _objective_value(self, x, y, loss_weight, regularization_weight):
        total = tf.zeros([], self.dtype)
        if x is not None:
            # loss_weight: a number, or one weight per example (0 on padding).
            total += tf.reduce_sum(loss_weight * self.objective.per_example_loss(x, y))
        if regularization_weight:
            total += regularization_weight * self.objective.regularization()
        return total

    def _tangents(self, vectors):
        """Splits ``(p, k)`` columns into per-variable tangents.

        Shapes are ``variable.shape`` when k is statically 1, else
        ``(k, *variable.shape)``.
        """
        layout = self.objective.layout
        if vectors.shape[1] == 1:
            return layout.unflatten(vectors[:, 0])
        parts = tf.split(tf.transpose(vectors), layout.sizes, axis=1)
        return [
            tf.reshape(part, [-1, *shape]) for part, shape in zip(parts, layout.shapes, strict=True)
        ]

    def _flat_columns(self, parts, k):
        """Per-variable products (shaped as ``_tangents``) back to ``(p, k)`` columns."""
        layout = self.objective.layout
        if isinstance(k, int) and k == 1:
            return layout.flatten(parts, self.dtype)[:, None]
        return tf.transpose(layout.flatten_batched(parts, k, self.dtype))

    def _hvp_parts(self, x, y, tangents, loss_weight, regularization_weight):
        """``hessian(sum_batch loss_weight * L + regularization_weight * Omega) @ v``, per variable.

        ``loss_weight`` is a number or a ``(batch,)`` tensor of per-example weights.

        ``tangents`` and the result are shaped as ``_tangents`` gives them; the sum over
        batches is accumulated in this form and flattened once per product.
        """
        if x is None and isinstance(loss_weight, (int, float)) and loss_weight == 0:
            scales = self._regularizer_scales
            if scales is not None:
                # Omega alone, of elementwise quadratic regularizers: no tapes to trace.
                weight = tf.cast(regularization_weight, self.dtype)
                return [
                    tf.zeros_like(t, self.dtype)
                    if c == 0
                    else (weight * c) * tf.cast(t, self.dtype)
                    for c, t in zip(scales, tangents, strict=True)
                ]
        single = tangents[0].shape.rank == len(self.objective.layout.shapes[0])
        if self.hvp_mode == "forward_over_reverse":
            return self._hvp_forward_over_reverse(
                x, y, tangents, single, loss_weight, regularization_weight
            )
        variables = self.objective.variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = self._objective_value(x, y, loss_weight, regularization_weight)
            grads = inner.gradient(total, variables)
            # Dense targets (an embedding's gradient comes as IndexedSlices).
            grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
            connected = [i for i, g in enumerate(grads) if g is not None]
            if not connected:
                return [tf.zeros_like(t) for t in tangents]
            if single:
                projection = tf.add_n(
                    [
                        tf.reduce_sum(grads[i] * tf.cast(tangents[i], grads[i].dtype))
                        for i in connected
                    ]
                )

        if single:
            columns = outer.gradient(projection, variables)
        else:
            # One backward pass vectorised over the columns, seeded with the tangents
            # themselves. `jacobian` of the k projections g . v did the same work plus
            # the projections' own backward, whose transposes made block products
            # 3-10% slower (digits CNN / MLP).
            def vjp(vectors):
                # H v as the vector-Jacobian product of the gradient, v the cotangent.
                return outer.gradient(
                    [grads[i] for i in connected],
                    variables,
                    output_gradients=[tf.cast(vectors[i], grads[i].dtype) for i in connected],
                )

            columns = vectorized_map(vjp, list(tangents), broadcast_matmul=True)
        return [
            tf.zeros_like(t) if c is None else tf.cast(c, self.dtype)
            for c, t in zip(columns, tangents, strict=True)
        ]

    def _hvp_forward_over_reverse(self, x, y, tangents, single, loss_weight, regularization_weight):
        variables = self.objective.variables
        primals = [tf_variable(v) for v in variables]

        def one(tangent):
            with tf.autodiff.ForwardAccumulator(primals, list(tangent)) as acc:
                with tf.GradientTape() as tape:
                    total = self._objective_value(x, y, loss_weight, regularization_weight)
                grads = tape.gradient(total, variables)
                # An Embedding's gradient is IndexedSlices, which has no tangent of its
                # own: made dense inside the accumulator, its tangent is recorded.
                grads = [
                    tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads
                ]
            return [
                tf.zeros_like(t) if g is None else tf.cast(acc.jvp(g), self.dtype)
                for g, t in zip(grads, tangent, strict=True)
            ]

        if single:
            return one(tangents)
        return vectorized_map(one, tangents, broadcast_matmul=True)

    def _hvp(self, x, y, vectors, loss_weight, regularization_weight):
        """``hessian(loss_weight * sum_batch L + regularization_weight * Omega) @ vectors``."""
        parts = self._hvp_parts(x, y, self._tangents(vectors), loss_weight, regularization_weight)
        return self._flat_columns(parts, vectors.shape[1] or tf.shape(vectors)[1])

    def _matvec_impl(self, vectors, damping, num_examples, inputs):
        """``(H + damping * I) @ vectors`` over the examples ``inputs`` (``fold_inputs``)."""
        if vectors.shape.rank == 1:
            # Reshaped inside the graph: two eager slices cost 0.4 ms, 8% of a product.
            return self._matvec_impl(vectors[:, None], damping, num_examples, inputs)[:, 0]
        k = vectors.shape[1] or tf.shape(vectors)[1]
        if self.replicas is not None:
            total = self.replicas.fold_sum(
                lambda x, y: self._flat_columns(
                    self._batch_hvp(x, y, self._tangents(vectors), 1.0 / num_examples, 0.0), k
                ),
                tf.zeros_like(vectors),
            )
        else:
            # Accumulate per variable, flatten once: per batch this saves a concat, a
            # split and a (p, k) add, which is 15-20% of a one-vector product at B=128.
            tangents = self._tangents(vectors)

            def add(acc, batch, mask):
                # Examples an earlier batch took (the padding of the last batch) weigh 0.
                weights = 1.0 / num_examples
                if mask is not None:
                    weights = tf.cast(mask, self.dtype) * weights
                parts = self._batch_hvp(batch[0], batch[1], tangents, weights, 0.0)
                return tuple(a + b for a, b in zip(acc, parts, strict=True))

            # A tuple: Dataset.reduce would stack a list state into one tensor.
            initial = tuple(tf.zeros_like(t) for t in tangents)
            parts = fold_inputs(inputs, self.data.fold_batch_size, add, initial)
            total = self._flat_columns(parts, k)
        if self.objective.has_regularization():
            # One small pair of tapes on Omega alone, once per product.
            total += self._hvp(None, None, vectors, 0.0, 1.0)
        return total + damping * vectors

    def _batch_matvec_impl(self, x, y, vectors, damping):
        size = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], self.dtype)
        k = vectors.shape[1] or tf.shape(vectors)[1]
        if self.replicas is not None:
            result = self.replicas.split_sum(
                lambda xs, ys: self._flat_columns(
                    self._batch_hvp(xs, ys, self._tangents(vectors), 1.0 / size, 0.0), k
                ),
                x,
                y,
                vectors,
            )
        else:
            result = self._flat_columns(
                self._batch_hvp(x, y, self._tangents(vectors), 1.0 / size, 0.0), k
            )
        if self.objective.has_regularization():
            result += self._hvp(None, None, vectors, 0.0, 1.0)
        return result + damping * vectors

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + damping * I) @ vectors`` over the whole training set.

        Args:
            vectors: shape ``(num_params,)`` or ``(num_params, k)``.

        Returns:
            A tensor of the same shape as ``vectors``.
        """
        return self._matvec(
            tf.convert_to_tensor(vectors, self.dtype),
            tf.constant(self.damping, self.dtype),
            tf.constant(self.num_examples, self.dtype),
            self.data.graph_inputs(),
        )

    def matvec_inputs(self) -> tuple:
        """What a product reads besides the vectors: ``(damping, n, training data)``."""
        return (
            tf.constant(self.damping, self.dtype),
            tf.constant(self.num_examples, self.dtype),
            self.data.graph_inputs(),
        )

    def compiled(
        self, key: Hashable, fn: Callable[..., Any], free: tuple[int, ...] = ()
    ) -> Callable[..., Any]:
        """``fn(operator, *args)`` compiled once per model and configuration, for this operator.

        Solvers compile their loops with it. Inside the trace, ``operator.matvec``
        takes the training data, its size and the damping as arguments of the
        compiled function instead of capturing them, so a second operator with the
        same ``trace_key`` (a new ``InfluenceModel`` on the same model) calls the
        same graph on its own data and traces nothing. ``fn`` must hold no operator.

        Args:
            key: everything besides ``trace_key`` and the argument shapes that the
                trace depends on (the solver's name and settings).
            fn: ``fn(operator, *args)``, traceable.
            free: positions in ``args`` whose tensors take any size on every axis.
        """

        def run(owner, inputs, *args):
            return fn(_WithInputs(owner, inputs), *args)

        free_positions = tuple(i + 1 for i in free)
        key = None if self.trace_key is None else (self.trace_key, key)
        shared = shared_function(
            self,
            self.objective.model,
            key,
            ("compiled", key),
            lambda body: SpecFunction(body, relaxed=(0,), free=free_positions),
            method=run,
        )

        def call(*args):
            return shared(self.matvec_inputs(), *args)

        return call

    def batch_matvec(self, vectors: tf.Tensor, batch: tuple) -> tf.Tensor:
        """An unbiased estimate of ``(H + damping * I) @ vectors`` from one batch ``(x, y)``.

        Uses ``(1/b) sum_{j in batch} hessian(L_j) + hessian(Omega) + damping * I``.
        """
        return self._batch_matvec(
            batch[0],
            batch[1],
            tf.convert_to_tensor(vectors, self.dtype),
            tf.constant(self.damping, self.dtype),
        )

    def subsample(self, size: int, seed: int = 0) -> HessianOperator:
        """The same operator over a fixed random subset of ``size`` training examples.

        An unbiased, cheaper estimate of H for large training sets; cached per
        ``(size, seed)``.
        """

        def make():
            data = self.data.subset(size, seed)
            return type(self)(
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
        ``p / DENSE_CHUNK`` passes over the data. Only sensible for small ``p``. The
        chunks have one width (the last one padded with zero columns), so the product
        is traced once, not a second time for a narrower last chunk.

        Args:
            progress: optional callable, called with the number of chunks done.
        """

        def make():
            p, count = self.num_params, self.num_dense_chunks
            width = -(-p // count)
            eye = tf.eye(p, count * width, dtype=self.dtype)
            chunks = []
            for start in range(0, count * width, width):
                chunks.append(self.matvec(eye[:, start : start + width]))
                if progress is not None:
                    progress(len(chunks))
            matrix = tf.cast(tf.concat(chunks, axis=1)[:, :p], tf.float64)
            return 0.5 * (matrix + tf.transpose(matrix))

        return self.cached("dense", make)


def regularizer_curvatures(objective: Objective) -> list[float] | None:
    """Per chosen variable, the constant diagonal of ``hessian(Omega)``, or None.

    Keras's ``L1``, ``L2`` and ``L1L2`` weight regularizers are elementwise:
    ``l1 * sum(|w|) + l2 * sum(w**2)`` has the Hessian ``2 * l2 * I`` (the L1 part's
    is 0 where it is differentiable, as autodiff gives it), in the variable's dtype.
    Any other regularizer (or a subclass) gives None: its product goes through tapes.
    Call it eagerly (it evaluates the regularizers).
    """
    trainable = {id(v) for v in objective.model.trainable_variables}
    scales = []
    for variable in objective.variables:
        regularizer = getattr(variable, "regularizer", None)
        if regularizer is None or id(variable) not in trainable:
            scales.append(0.0)
        elif type(regularizer) in (keras.regularizers.L2, keras.regularizers.L1L2):
            l2 = getattr(regularizer, "l2", 0.0) or 0.0
            # The factor as Keras applies it (it may round it to float32 first).
            ones = np.ones([1], variable.dtype)
            factor = float(keras.regularizers.L2(l2)(ones)) if l2 else 0.0
            scales.append(2.0 * factor)
        elif type(regularizer) is keras.regularizers.L1:
            scales.append(0.0)
        else:
            return None
    return scales


class _WithInputs:
    """An operator inside a ``compiled`` trace: products read the data from arguments."""

    def __init__(self, operator: HessianOperator, inputs: tuple):
        self._operator = operator
        self._inputs = inputs
        self.damping = inputs[0]

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = tf.convert_to_tensor(vectors, self._operator.dtype)
        return self._operator._matvec(vectors, *self._inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._operator, name)


# The curvature kinds of ``compile(curvature=...)``: name -> operator class (see ``curvatures``).
CURVATURE_NAMES = ("hessian", "gauss_newton")


def curvatures() -> dict[str, type[HessianOperator]]:
    """``{name: operator class}`` of every curvature kind ``compile`` accepts."""
    from tf_influence.engine.gauss_newton import GaussNewtonOperator  # it subclasses ours

    return {"hessian": HessianOperator, "gauss_newton": GaussNewtonOperator}


def check_curvature(curvature: Any) -> str:
    """``curvature`` if it names a curvature kind, else a ValueError listing them."""
    if not isinstance(curvature, str) or curvature not in CURVATURE_NAMES:
        raise ValueError(
            f"Argument `curvature` must be one of {list(CURVATURE_NAMES)}. Received: "
            f'curvature={curvature!r}. Use "hessian" (exact) or "gauss_newton" '
            "(positive semi-definite, for models away from a minimum)."
        )
    return curvature


def make_operator(
    curvature: str,
    objective: Objective,
    data: ExampleData,
    damping: float = 0.0,
    hvp: str = "auto",
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> HessianOperator:
    """The operator ``v -> (C + damping*I) v`` of the curvature kind named ``curvature``.

    Args:
        curvature: ``"hessian"`` or ``"gauss_newton"``.
        objective, data, damping, hvp, jit_compile, strategy: as for ``HessianOperator``.
    """
    kind = curvatures()[check_curvature(curvature)]
    return kind(objective, data, damping, hvp, jit_compile, strategy)


def _plain_bytes(value, depth: int = 0) -> int | None:
    """The bytes of the tensors and arrays ``value`` holds, or None unless it holds only
    tensors, arrays, numbers and strings (no references to a model), so that sharing
    it between operators cannot keep a model alive."""
    if isinstance(value, (np.ndarray, tf.Tensor)) and not isinstance(value, tf.Variable):
        return int(np.prod(value.shape)) * value.dtype.size
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return 0
    if depth > 3 or callable(value) or isinstance(value, (HessianOperator, tf.Variable)):
        return None
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (tuple, list)):
        fields = getattr(value, "__dict__", None)
        if fields is None:
            return None
        value = list(fields.values())
    sizes = [_plain_bytes(v, depth + 1) for v in value]
    return None if None in sizes else sum(sizes)
