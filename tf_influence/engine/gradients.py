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

``"auto"`` takes ``"jacobian"`` when every parameter is factored (below), and
otherwise ``"jvp"`` up to ``JVP_MAX_TESTS`` test points and ``"jacobian"`` above.
Memory is bounded by the batch and the number of test points, never by the size
of the training set.

With ``"jacobian"``, the parameters of ``Dense``, ``EinsumDense``, ``Conv1D``,
``Conv2D``, ``DepthwiseConv2D``, ``Embedding`` and normalisation layers get their
per-example gradients (and scores) from the layers' inputs and output gradients
in one batched pass (``tf_influence/engine/factored.py``), once a check on a real batch
has shown that these add up to the batch gradient; the other parameters go
through pfor. Then a pass may take several batches at once, up to
``SCORING_BUDGET`` values of intermediate results.

Where pfor cannot vectorise the model (recurrent layers: ``LSTM``, ``GRU``,
``SimpleRNN``, ``Bidirectional``), both loop over examples or vectors inside the
graph instead (``tf_influence/engine/vectorize.py``), with one warning; forward
mode cannot go through a graph ``tf.while_loop`` at all, so ``"auto"`` takes
``"jacobian"`` there. The factored Dense layers after a recurrent layer stay
factored.

The compiled functions take every batch as an argument and are shared by all
``PerExampleGradients`` on the same Keras model with the same parameters, loss,
regularisers and ``jit_compile`` (``tf_influence/engine/compile.py``), so a second
``InfluenceModel`` reuses the traces of the first. The batch axis is left free: a
short last batch does not trace again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import keras
import numpy as np
import tensorflow as tf

from tf_influence.engine import vectorize
from tf_influence.engine.compile import (
    BatchFunction,
    BoundFunction,
    in_background,
    objective_key,
    shared_function,
)
from tf_influence.engine.curvature import tf_variable
from tf_influence.engine.factored import (
    FactoredGradients,
    FactoredUnavailable,
    find_layers,
)
from tf_influence.engine.objective import Objective
from tf_influence.engine.vectorize import vectorized_map

if TYPE_CHECKING:
    from tf_influence.solvers.base import LowRankQueries

_Result = TypeVar("_Result")

SCORING_MODES = ("jacobian", "jvp")
# "auto" uses forward-mode scoring up to this many test points per pass;
# benchmarks/run.py measures the two side by side (they cross near k = 16 on the
# digits MLP and between 20 and 64 on the CNN, whose convolution filter gradients
# pfor cannot vectorise).
JVP_MAX_TESTS = 32
# A factored scoring pass holds about this many intermediate values (64 MiB in
# float32); it takes as many whole batches as fit in it.
SCORING_BUDGET = 2**24
# The factored check runs eagerly on at most this many examples of the first batch:
# it holds their per-example gradients in float64 (8 x 8 bytes per parameter, 660 MB
# at 10M parameters).
CHECK_ROWS = 8


class ForwardModeUnavailable(Exception):
    """Raised while tracing when forward mode gives no derivative of the loss."""


# The shared forward-mode scoring functions that raised ForwardModeUnavailable: a
# second PerExampleGradients on the same trace does not try again.
_NO_FORWARD_MODE: weakref.WeakSet = weakref.WeakSet()


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
        factored: take the gradients of the factored layers (Dense, convolutions, ...) from their
            inputs and output gradients (``factored.py``) where that is checked to
            agree; False computes every gradient by pfor (for comparisons).
    """

    def __init__(
        self,
        objective: Objective,
        scoring: str = "auto",
        jit_compile: bool = False,
        factored: bool = True,
    ):
        self.objective = objective
        self.scoring = check_scoring_mode(scoring)
        self._jit_compile = jit_compile
        # Everything the traces depend on besides the shapes of their arguments.
        self.trace_key = ("gradients", objective_key(objective), bool(jit_compile))

        def share(name, *args):
            return shared_function(
                self, objective.model, self.trace_key, name, lambda fn: BatchFunction(fn, *args)
            )

        self._gradients = share("_gradients_impl", (), jit_compile)
        self._target_functions: dict = {}
        solutions = tf.TensorSpec([objective.num_params, None], objective.dtype)
        self._scores = {
            "jacobian": share("_jacobian_scores", [solutions], jit_compile),
            "jvp": share("_jvp_scores", [solutions], jit_compile),
        }
        layers = find_layers(objective)
        self._factored = FactoredGradients(objective, layers) if layers else None
        # "unchecked" until `check_factored` ran on a batch, then "on" or "off".
        self._factored_state = "unchecked" if layers and factored else "off"
        factored = set(self._factored.indices) if layers else set()
        self._pfor_indices = [i for i in range(len(objective.variables)) if i not in factored]
        self._factored_gradients = share("_factored_gradients_impl", (), jit_compile)
        self._factored_scores = share("_factored_scores_impl", [solutions], jit_compile)
        # One factored scoring function per structure of compressed test vectors.
        self._query_functions: dict = {}

    def _per_variable_gradients(self, x, y, indices=None):
        """Per-example gradients, one ``(b, size)`` tensor per variable (None: no gradient).

        ``indices`` chooses variables (default: all), and the result follows them.

        Vectorised over the batch with pfor. This is 7x faster than ``tape.jacobian``
        of the vector of losses on the digits MLP (2 vs 14 ms for 128 examples):
        pfor then sees one small backward pass instead of the reverse pass of the
        whole batch seeded with every one-hot vector.
        """
        if indices is None:
            indices = range(len(self.objective.variables))
        variables = [self.objective.variables[i] for i in indices]
        sizes = [self.objective.layout.sizes[i] for i in indices]

        def one(example):
            xi, yi = tf.nest.map_structure(lambda t: t[None], example)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(self.objective.per_example_loss(xi, yi))
            grads = tape.gradient(loss, variables)
            # pfor cannot stack None: mark missing gradients with an empty tensor.
            return [tf.zeros([0], self.objective.dtype) if g is None else g for g in grads]

        grads = vectorized_map(one, (x, y))
        size = tf.shape(grads[0])[0] if grads else 0
        return [
            None if g.shape[1:].num_elements() == 0 and n else tf.reshape(g, [size, n])
            for g, n in zip(grads, sizes, strict=True)
        ]

    def per_variable_gradients(
        self, x: Any, y: Any, indices: Sequence[int] | None = None
    ) -> list[tf.Tensor | None]:
        """Per-example gradients by pfor, one ``(b, size)`` tensor per chosen variable.

        Traceable (for graphs built elsewhere: ``engine.projection``). ``indices``
        chooses variables (default: all); None marks a variable without gradient.
        """
        return self._per_variable_gradients(x, y, indices)

    @property
    def factored(self) -> FactoredGradients | None:
        """The ``FactoredGradients`` of the model's factored layers, or None."""
        return self._factored

    @property
    def pfor_indices(self) -> list[int]:
        """Indices of the variables whose per-example gradients come from pfor."""
        return list(self._pfor_indices)

    def graph_gradients(self, x: Any, y: Any) -> tf.Tensor:
        """``(b, p)`` per-example loss gradients, traceable inside another ``tf.function``.

        For graphs built elsewhere (``export``'s serving signatures); eager callers
        use ``__call__``, which compiles and caches the trace. Loops over the
        examples where pfor cannot vectorise the model (``engine/vectorize.py``).
        """
        model = self.objective.model
        with vectorize.loop_mode(vectorize.needs_loop(model) or self._gradients.loop):
            return self._gradients_impl(x, y)

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

    # -- factored layers (tf_influence/engine/factored.py) ------------------------------
    def _factored_check_impl(self, x, y):
        uses, losses, batch_grads = self._factored.uses(x, y, batch_grads=True)
        return self._factored.check(uses, tf.shape(losses)[0], batch_grads)

    @property
    def factored_unchecked(self) -> bool:
        """True until ``check_factored`` has decided on a batch."""
        return self._factored_state == "unchecked"

    def check_factored(self, x: Any, y: Any) -> bool:
        """Decides, once, on a batch, whether factored per-example gradients are exact here.

        They are used only if their sum equals the batch gradient of every factored
        variable (see ``FactoredGradients.check``); otherwise pfor is used for good.
        The check looks at the first ``CHECK_ROWS`` examples of the batch: it holds
        their per-example gradients in float64, which for a whole batch of a large
        model would take more memory than fitting or scoring.
        """
        if self._factored_state == "unchecked":
            try:
                # Eagerly, on a few rows: a trace of its own would cost more than the
                # check (0.6 s of a fresh process's first answer on the digits MLP).
                ok = bool(self._factored_check_impl(*_first_rows((x, y), CHECK_ROWS)).numpy())
            except (FactoredUnavailable, tf.errors.InvalidArgumentError, TypeError, ValueError):
                ok = False  # whatever the factors cannot express goes through pfor
            self._factored_state = "on" if ok else "off"
        return self._factored_state == "on"

    def _factored_gradients_impl(self, x, y):
        uses, losses, _ = self._factored.uses(x, y)
        size = tf.shape(losses)[0]
        dtype = self.objective.dtype
        parts = self._factored.per_example(uses, size, dtype)
        if self._pfor_indices:
            rest = self._per_variable_gradients(x, y, self._pfor_indices)
            parts.update(zip(self._pfor_indices, rest, strict=True))
        tensors = [parts.get(i) for i in range(len(self.objective.variables))]
        return self.objective.layout.flatten_batched(tensors, size, dtype)

    def _factored_scores_impl(self, x, y, solutions, lefts=(), rights=(), kernels=()):
        blocks = tf.split(solutions, self.objective.layout.sizes, axis=0)
        uses, losses, _ = self._factored.uses(x, y)
        queries = dict(zip(kernels, zip(lefts, rights, strict=True), strict=True))
        scores = self._factored.scores(uses, tf.shape(losses)[0], blocks, queries)  # (b, k)
        if self._pfor_indices:
            rest = self._per_variable_gradients(x, y, self._pfor_indices)
            for i, g in zip(self._pfor_indices, rest, strict=True):
                if g is not None:
                    scores += tf.matmul(tf.cast(g, solutions.dtype), blocks[i])
        scores = -tf.transpose(scores)  # (k, b)
        finite = tf.reduce_all(tf.math.is_finite(scores), axis=0)  # (b,)
        return scores, finite

    def _use_factored(self, x=None, y=None) -> bool:
        if self._factored_state == "unchecked" and x is not None:
            self.check_factored(x, y)
        return self._factored_state == "on"

    def _query_function(self, queries: Sequence[LowRankQueries]) -> BoundFunction:
        """The factored scoring function for test vectors with these compressed layers."""
        kernels = tuple(q.kernel for q in queries)
        shapes = tuple((int(q.left.shape[1]), int(q.right.shape[1]), q.rank) for q in queries)
        key = (kernels, shapes)
        if key not in self._query_functions:
            dtype = self.objective.dtype
            specs = [
                tf.TensorSpec([self.objective.num_params, None], dtype),
                [tf.TensorSpec([None, rows, rank], dtype) for rows, _, rank in shapes],
                [tf.TensorSpec([None, cols, rank], dtype) for _, cols, rank in shapes],
            ]
            self._query_functions[key] = shared_function(
                self,
                self.objective.model,
                (*self.trace_key, "queries", key),
                "_factored_scores_impl",
                lambda fn: BatchFunction(fn, specs, self._jit_compile),
                method=lambda owner, *args: owner._factored_scores_impl(*args, kernels=kernels),
            )
        return self._query_functions[key]

    def rows_per_pass(
        self, num_tests: int, batch_size: int, queries: Sequence[LowRankQueries] = ()
    ) -> int:
        """Training examples per scoring pass: whole batches within ``SCORING_BUDGET``."""
        if self.mode_for(num_tests) != "jacobian" or not self._use_factored():
            return batch_size
        layout = self.objective.layout
        compressed = {q.kernel: q for q in queries}
        per_row = sum(layout.sizes[i] for i in self._pfor_indices)
        for entry in self._factored.layers:
            query = compressed.get(entry.kernel)
            if query is not None:
                rows, cols, rank = int(query.left.shape[1]), int(query.right.shape[1]), query.rank
                # The (t, k * r) products from the factors, if they can pay (t >= 1).
                if rank * (rows + cols) < rows * cols:
                    if entry.kind == "dense":
                        per_row += 2 * rank * num_tests
                    else:  # taken only where t * r * (rows + cols) < rows * cols
                        product = 2 * num_tests * rows * cols // (rows + cols)
                        per_row += max(layout.sizes[entry.kernel], product)
                    continue
            if entry.kind == "dense" and entry.kernel is not None:
                fan_in, fan_out = layout.shapes[entry.kernel][-2:]
                ghost = num_tests <= max(fan_in, fan_out)
                width = min(fan_in, fan_out) * num_tests
                per_row += width if ghost else layout.sizes[entry.kernel]
            elif entry.kernel is not None:
                per_row += layout.sizes[entry.kernel]
            if entry.bias is not None:
                per_row += layout.sizes[entry.bias]
        batches = max(1, SCORING_BUDGET // max(1, per_row * batch_size))
        return batches * batch_size

    def _jvp_scores(self, x, y, solutions):
        primals = [tf_variable(v) for v in self.objective.variables]
        layout = self.objective.layout

        def one(solution):
            try:
                with tf.autodiff.ForwardAccumulator(primals, layout.unflatten(solution)) as acc:
                    losses = self.objective.per_example_loss(x, y)
            except TypeError as error:
                # Forward mode through a tf.while_loop in a graph (every Keras recurrent
                # layer) fails on the loop's TensorList handles: "`dtype` <dtype:
                # 'variant'> is not compatible with 1 of dtype int64".
                if "variant" not in str(error):
                    raise
                raise ForwardModeUnavailable() from error
            jvp = acc.jvp(losses)
            if jvp is None:
                # The loss always depends on the parameters, so None means forward
                # mode could not see through an op (e.g. a function restored from a
                # SavedModel). Zeros would be a silent wrong answer.
                raise ForwardModeUnavailable()
            return jvp

        scores = -vectorized_map(one, tf.transpose(solutions))  # (k, b)
        finite = tf.reduce_all(tf.math.is_finite(scores), axis=0)  # (b,)
        return scores, finite

    def target_gradients(
        self, target: Callable[[keras.Model, Any], tf.Tensor], x: Any
    ) -> tf.Tensor:
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
        with vectorize.model_scope(self.objective.model):
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

        return vectorized_map(one, x)

    def __call__(self, x: Any, y: Any) -> tf.Tensor:
        """Gradients of shape ``(batch, num_params)``."""
        if self._use_factored(x, y):
            try:
                return self._factored_gradients(x, y)
            except FactoredUnavailable:
                self._factored_state = "off"
        return self._gradients(x, y)

    def warm_up(self, x: Any, y: Any) -> None:
        """Gets the scoring of training examples ready, without waiting.

        Scores the first example of ``(x, y)`` (a training batch) against a zero
        solution inside ``compile.in_background``: if its trace is kept on disk,
        the function is built in the background (after the solve ``fit`` started
        first), so that ``explain`` finds it ready; otherwise nothing is done. The
        scoring warmed is the one for a few test points (``mode_for(1)``). The
        test gradients are not: ``explain`` needs them before the solve, which
        the background thread is still building.
        """
        x, y = _first_rows((x, y), 1)
        solutions = tf.zeros([self.objective.num_params, 1], self.objective.dtype)
        with in_background():
            self.scores(x, y, solutions)

    def mode_for(self, num_tests: int) -> str:
        """The scoring mode used for ``num_tests`` solved vectors."""
        if self.scoring != "auto":
            return self.scoring
        if self._factored_state == "on" and not self._pfor_indices:
            return "jacobian"  # factored throughout: faster than jvp at any k measured
        return "jvp" if num_tests <= JVP_MAX_TESTS else "jacobian"

    def scores(
        self, x: Any, y: Any, solutions: tf.Tensor, queries: Sequence[LowRankQueries] = ()
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``-grad L(z_j) . solutions[:, i]`` for the batch.

        Args:
            x: the inputs of a batch of b training examples.
            y: their targets.
            solutions: ``(num_params, k)``, the vectors ``inv(H) @ grad L(z_test_i)``.
            queries: ``LowRankQueries`` of layers whose part of ``solutions`` is of low
                rank (``Solver.compress_queries``); factored scoring multiplies their
                factors instead of the dense blocks where that takes fewer products.

        Returns:
            ``(scores, finite)``: scores of shape ``(k, b)`` and a ``(b,)`` boolean that is
            False where an example's gradient (or score) holds NaN or inf.
        """
        solutions = tf.convert_to_tensor(solutions, self.objective.dtype)
        self._use_factored(x, y)
        return self.run_scoring(
            lambda impl, extra: impl(x, y, solutions, *extra), int(solutions.shape[1]), queries
        )

    def run_scoring(
        self,
        call: Callable[[Callable[..., tuple[tf.Tensor, tf.Tensor]], tuple], _Result],
        num_tests: int,
        queries: Sequence[LowRankQueries] = (),
    ) -> _Result:
        """``call(impl, extra)`` with the scoring function for ``num_tests`` vectors.

        ``impl(x, y, solutions, *extra) -> (scores, finite)``: ``extra`` is ``()``, or
        the factors ``(lefts, rights)`` of ``queries`` when factored scoring takes
        them. If forward mode cannot see through the model, "auto" falls back to
        per-example gradients for good.
        """
        if self._jvp_unavailable and self.scoring == "jvp":
            raise _forward_mode_refused()  # known from another owner of the trace
        mode = "jacobian" if self._jvp_unavailable else self.mode_for(num_tests)
        if mode == "jacobian" and self._factored_state == "on":
            try:
                if queries:
                    factors = ([q.left for q in queries], [q.right for q in queries])
                    return call(self._query_function(queries), factors)
                return call(self._factored_scores, ())
            except FactoredUnavailable:
                self._factored_state = "off"
        try:
            return call(self._scores[mode], ())
        except ForwardModeUnavailable:
            if self.scoring == "jvp":
                raise _forward_mode_refused() from None
            # "auto": per-example gradients from now on, for every owner of the trace.
            _NO_FORWARD_MODE.add(self._scores["jvp"].shared)
            return self.run_scoring(call, num_tests, queries)  # factored where it applies

    @property
    def _jvp_unavailable(self) -> bool:
        return self._scores["jvp"].shared in _NO_FORWARD_MODE

    def tracing_count(self) -> int:
        """Traces so far of the gradient and scoring functions (for retracing checks)."""
        functions = [self._gradients, self._factored_gradients, self._factored_scores]
        functions += [*self._scores.values(), *self._query_functions.values()]
        return sum(f.tracing_count() for f in functions)


def _first_rows(batch: Any, rows: int) -> Any:
    """The first ``rows`` examples of a nested batch of dense tensors or arrays (else all)."""
    leaves = tf.nest.flatten(batch)
    if not all(isinstance(t, (tf.Tensor, np.ndarray)) and len(t.shape) > 0 for t in leaves):
        return batch
    return tf.nest.map_structure(lambda t: t[:rows], batch)


def _forward_mode_refused() -> ValueError:
    """The error for ``scoring="jvp"`` on a model forward mode cannot see through."""
    return ValueError(
        "Forward-mode scoring cannot differentiate this model: some op in it has no "
        "forward-mode gradient (for example a function restored from a SavedModel). "
        "Received: scoring='jvp'. Use scoring='jacobian' or 'auto' in `compile`."
    )
