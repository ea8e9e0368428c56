"""The solver protocol: what every inverse-HVP solver implements, and what it may keep.

A solver maps ``(operator, rhs)`` to ``inv(C + damping*I) @ rhs`` for a curvature
``C`` (the Hessian or another curvature kind). It knows nothing of Keras, never
prints, and keeps its loops inside the graph; the host reads the diagnostics
once, after a solve. Everything the rest of the package needs from a solver goes
through the methods of ``Solver`` below, so that fitting, scoring, saving and
export never branch on a solver's class:

* ``solve(operator, rhs)``: the one required method.
* ``warm_up(operator)``: called at the start of ``fit``, before the data checks, to
  get the first solve ready without waiting (CG builds its solve's graph in a
  background thread when the trace is kept on disk; see ``background_calls``).
  Nothing by default.
* ``prepare(operator, progress)``: one-off work at ``fit`` (a factorisation, an
  eigenbasis), reporting progress through ``progress(total, label)``.
* ``self_products(operator, vectors)``: ``v_j^T inv(C) v_j`` per column (the
  default solves; a factorisation can do better).
* ``low_rank(operator)``: ``LowRankInverse(basis, inverse_values)`` when the
  solver's inverse is ``basis @ diag(inverse_values) @ basis^T``. The fitted
  state then keeps the training gradients projected on ``basis`` (the influence
  index): queries cost one product, self-influence is free and ``export`` can
  serve it with no training data.
* ``projection(operator)`` / ``set_index_gram(operator, gram, num_examples)`` /
  ``index(operator)``: the general influence index. ``projection`` returns a
  ``Projection`` (coordinates ``P^T grad L`` known before any pass: a random
  projection) or None. The fitted state then builds the index ``Phi`` (n x dim) at
  ``fit`` before ``mean_eigenvalue`` and ``prepare``, and hands the solver its Gram
  ``sum_j Phi_j Phi_j^T / w_j`` (per block of an ensemble). After ``prepare``,
  ``index`` returns ``IndexInverse(projection, inverse)`` when ``inv(C +
  damping*I) ~= P @ inverse @ P^T`` (or ``IndexInverse(projection,
  cholesky=L)`` with ``inverse = inv(L L^T)``, never formed); by default it is made
  from ``low_rank`` (whose index is built after ``prepare``). Queries,
  self-influence and ``export`` go through it.
* ``compress_queries(operator, solutions)``: the solved test vectors, compressed
  layer by layer before they are scored against the training data
  (``LowRankQueries``: rank-r factors per layer, which the factored scoring
  multiplies with the layers' inputs and output gradients). The default keeps
  them exact.
* ``get_state(operator)`` / ``set_state(operator, arrays)``: the arrays worth
  saving with ``InfluenceModel.save`` (a Cholesky factor, eigenpairs), and their
  restoration at ``load``.
* ``get_config`` / ``from_config``: the constructor arguments, for the settings
  record (``InfluenceModel.get_compile_config``).

The operator a solver receives is described by ``CurvatureOperator``: the members
listed there are all a solver may use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import numpy as np
import tensorflow as tf


class CurvatureError(ValueError):
    """The Hessian is not positive definite (or a solve diverged): change damping/scale."""


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What a solve did.

    Attributes:
        solver: the solver's name.
        iterations: iterations (CG), recursion steps (LiSSA) or 0 (Exact).
        residual_norm: ``(k,)`` relative residuals ``|A x - b| / |b|`` per right-hand side.
        converged: ``(k,)`` booleans.
        info: solver-specific extras (eigenvalue estimates, scale, ...).
    """

    solver: str
    iterations: int
    residual_norm: np.ndarray
    converged: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """Whether every right-hand side converged."""
        return bool(np.all(self.converged))


# The end of every "not positive definite" error: the curvature that cannot be indefinite.
GAUSS_NEWTON_HINT = (
    ' Or use curvature="gauss_newton" (positive semi-definite by construction) with '
    'damping="auto", the default of `compile()`.'
)


def nice_ceil(value: float) -> float:
    """Rounds a positive number up to two significant digits, for suggestions."""
    if value <= 0 or not math.isfinite(value):
        return value
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(value / 10**exponent) * 10**exponent


class ProgressBar(Protocol):
    """What ``progress(total, label)`` returns: ``update(step)``, then ``done()``."""

    def update(self, step: int) -> None: ...

    def done(self, summary: str = "") -> None: ...


ProgressFactory = Callable[[int, str], ProgressBar]


class _Silent:
    def update(self, step: int) -> None:
        pass

    def done(self, summary: str = "") -> None:
        pass


def silent_progress(total: int, label: str) -> ProgressBar:
    """A ``ProgressFactory`` that shows nothing (the default of ``Solver.prepare``)."""
    return _Silent()


class CurvatureOperator(Protocol):
    """The members of a curvature operator that solvers may use.

    ``tfi.engine.HessianOperator`` implements it; a new curvature kind implements
    the same members and every solver works with it.

    Attributes:
        num_params: p, the side of the ``(p, p)`` operator.
        num_examples: n, the number of training examples.
        dtype: dtype of the vectors it acts on.
        damping: the non-negative number on the diagonal.
        data: the training data (``ExampleData``): ``data.batch_size``,
            ``data.first_batch()``, and ``data.sampler(batch_size, seed)``, which
            stochastic solvers draw minibatches from.
        objective: the per-example loss (``Objective``); ``CG(recycle="auto")``
            traces ``objective.per_example_loss`` once to count a forward pass's
            flops.
        num_dense_chunks: how many products ``dense`` needs (for a progress bar).
    """

    num_params: int
    num_dense_chunks: int
    objective: Any
    num_examples: int
    dtype: tf.DType
    damping: float
    data: Any

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(C + damping*I) @ vectors`` for ``(p, k)`` vectors, over all training data."""

    def batch_matvec(self, vectors: tf.Tensor, batch: Any) -> tf.Tensor:
        """The same product on one minibatch ``batch = (x, y)`` (an unbiased estimate)."""

    def dense(self, progress: Callable[[int], None] | None = None) -> tf.Tensor:
        """The ``(p, p)`` matrix ``C + damping*I`` in float64 (cached)."""

    def subsample(self, size: int, seed: int = 0) -> CurvatureOperator:
        """The same operator on ``size`` training examples drawn with ``seed``."""

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """Memoises ``make()`` until the weights change; where solvers keep state."""


def compile_loop(
    operator: CurvatureOperator, key: Hashable, fn: Callable[..., Any], free: tuple[int, ...] = ()
) -> Callable[..., Any]:
    """``fn(operator, *args)`` compiled into a function of ``args``: how solvers trace loops.

    An operator that offers ``compiled`` (``HessianOperator`` and Gauss-Newton do)
    shares the trace with every operator of the same model and configuration, its
    products reading the training data and damping from arguments: a new
    ``InfluenceModel`` then traces no solver loop again. Any other operator gets a
    function of its own. Write loops with ``tf.while_loop`` / ``tf.cond``:
    autograph is off (converting them cost about 1 s of a first explain).

    Args:
        operator: the curvature operator the loop multiplies by.
        key: hashable; everything besides the argument shapes that ``fn``'s trace
            depends on (the solver's name and settings). ``fn`` must hold no operator.
        fn: ``fn(operator, *args)``, traceable.
        free: positions in ``args`` whose tensors may take any size on every axis
            (one trace for all of them); other arguments retrace on a new shape.
    """
    compiled = getattr(operator, "compiled", None)
    if compiled is not None:
        return compiled(key, fn, free)
    from tf_influence.engine.compile import SpecFunction

    return SpecFunction(lambda *args: fn(operator, *args), free=free)


def background_calls() -> contextlib.AbstractContextManager:
    """In this block, calls of functions from ``compile_loop`` only get them ready.

    Each call returns None at once. A function whose trace is kept on disk
    (``tfi.config.set_trace_cache``) is built and run in a background thread, so
    that its next call finds it ready; any other call is skipped (see
    ``tf_influence.engine.compile.in_background``). For ``Solver.warm_up``: call
    the solve on zero right-hand sides, which runs no iteration.
    """
    from tf_influence.engine.compile import in_background

    return in_background()


@dataclasses.dataclass(frozen=True)
class LowRankInverse:
    """``inv(C + damping*I) ~= basis @ diag(inverse_values) @ basis^T``.

    Attributes:
        basis: ``(p, r)`` orthonormal columns.
        inverse_values: ``(r,)`` positive weights (``1 / eigenvalue`` for an
            eigenbasis).
    """

    basis: tf.Tensor
    inverse_values: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Projection:
    """The coordinates of an influence index: ``P^T grad L(z)`` in ``dim`` numbers.

    Attributes:
        dim: the number of coordinates.
        examples: ``examples(x, y) -> (b, dim)``, ``P^T grad L(z_j)`` for every example
            of a batch ``(x, y)`` (the training loss with its sample weights for training
            batches, the test loss for test batches), called eagerly once per batch;
            or None: the fitted state multiplies the per-example gradients by ``matrix``.
        project: ``project(vectors) -> (dim, k)`` for ``(p, k)`` gradients of the
            model's current weights, traceable (``export`` runs it inside the serving
            graph, ``explain(target=...)`` on target gradients); None when the
            coordinates are not a linear map of one gradient (an ensemble).
        matrix: the ``(p, dim)`` matrix ``P`` when it is held (a low-rank basis), else
            None.
        members: the coordinates are ``members`` blocks of ``dim / members``, one per
            model of an ensemble; the Gram is taken block by block.
        key: hashable, what the coordinates depend on besides the weights and the
            data (the kind of projection, its seed, the ensemble's members): the
            fingerprint of a stored index.
        weights: None, or a Keras layer holding the variables ``project`` reads;
            ``export`` tracks it, so the SavedModel stores them as weights.
        store: None (the index in memory), or the ``.npy`` path of a
            ``tf_influence.index.GradientStore`` the fitted state writes the index
            to (resumable, fingerprinted) and streams every query from.
        store_dtype: ``"float16"`` or ``"float32"``, the store's rows.
        rows_per_pass: None, or how many training examples ``examples`` should take
            at a time when the index is built (more than a batch amortises work
            done once per call, such as generating a random matrix).
        with_gram: whether the solver takes the Gram of the rows (``set_index_gram``);
            False spares its ``n * dim^2`` products when the curvature comes from
            elsewhere.
    """

    dim: int
    examples: Callable[[Any, Any], tf.Tensor] | None = None
    project: Callable[[tf.Tensor], tf.Tensor] | None = None
    matrix: tf.Tensor | None = None
    members: int = 1
    key: Hashable = None
    weights: Any = None
    store: str | None = None
    store_dtype: str = "float16"
    rows_per_pass: int | None = None
    with_gram: bool = True

    @classmethod
    def from_basis(cls, basis: tf.Tensor) -> Projection:
        """The coordinates ``basis^T grad L`` of a ``(p, r)`` basis (``LowRankInverse``)."""
        return cls(
            dim=int(basis.shape[1]),
            project=lambda vectors: tf.matmul(basis, vectors, transpose_a=True),
            matrix=basis,
        )


@dataclasses.dataclass(frozen=True)
class IndexInverse:
    """``inv(C + damping*I) ~= P @ inverse @ P^T`` in the coordinates of ``projection``.

    Then ``score_ij = -(P^T g_test_i)^T inverse (P^T g_j)`` and the self-influence is
    ``Phi_j^T inverse Phi_j``: the fitted state needs no other solve. The inverse is
    given either as it is (``inverse``) or, for a dense matrix ``F`` with ``inverse =
    inv(F)``, as the Cholesky factor of ``F`` (``cholesky``), applied by triangular
    solves: ``inv(F)`` is never formed.

    Attributes:
        projection: the ``Projection``.
        inverse: ``(dim,)`` weights of a diagonal, a ``(dim, dim)`` symmetric matrix,
            or ``(members, d, d)`` blocks on the diagonal (``dim = members * d``); or
            None when ``cholesky`` is given.
        cholesky: None, or the lower-triangular ``L`` with ``inverse = inv(L @ L^T)``:
            ``(dim, dim)``, or ``(members, d, d)`` blocks on the diagonal.
    """

    projection: Projection
    inverse: tf.Tensor | None = None
    cholesky: tf.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.inverse is None) == (self.cholesky is None):
            raise ValueError(
                "IndexInverse takes exactly one of `inverse` and `cholesky`. Received: "
                f"inverse={_shape_of(self.inverse)}, cholesky={_shape_of(self.cholesky)}. "
                "Pass the inverse, or the Cholesky factor of the matrix it inverts."
            )

    def apply(self, coordinates: tf.Tensor) -> tf.Tensor:
        """``inverse @ coordinates`` for ``(dim, k)`` coordinates, in their dtype."""
        if self.cholesky is not None:
            return self._blockwise(
                lambda factor, rhs: tf.linalg.cholesky_solve(factor, rhs), coordinates
            )
        inverse = tf.cast(self.inverse, coordinates.dtype)
        if inverse.shape.rank == 1:
            return inverse[:, None] * coordinates
        return self._blockwise(tf.matmul, coordinates)

    def quadratic(self, coordinates: tf.Tensor) -> tf.Tensor:
        """``c^T inverse c`` for every column ``c`` of ``(dim, k)`` coordinates, ``(k,)``.

        With a Cholesky factor, ``|inv(L) c|^2``: one triangular solve.
        """
        if self.cholesky is None:
            return tf.reduce_sum(coordinates * self.apply(coordinates), axis=0)

        def half(factor, rhs):
            return tf.linalg.triangular_solve(factor, rhs, lower=True)

        return tf.reduce_sum(tf.square(self._blockwise(half, coordinates)), axis=0)

    def _blockwise(self, fn: Callable, coordinates: tf.Tensor) -> tf.Tensor:
        """``fn(matrix, coordinates)`` for the matrix, or per block of ``(members, d, d)``."""
        matrix = self.inverse if self.cholesky is None else self.cholesky
        matrix = tf.cast(matrix, coordinates.dtype)
        if matrix.shape.rank == 2:
            return fn(matrix, coordinates)
        members, d = int(matrix.shape[0]), int(matrix.shape[1])
        blocks = tf.reshape(coordinates, [members, d, -1])
        return tf.reshape(fn(matrix, blocks), [members * d, -1])


def _shape_of(value: Any) -> str:
    return "None" if value is None else f"<tensor of shape {tuple(value.shape)}>"


@dataclasses.dataclass(frozen=True)
class LowRankQueries:
    """One layer's part of ``k`` solved test vectors, each a rank-``r`` matrix.

    The layer is one of the matrix kinds of ``engine.factored_layers`` (Dense,
    EinsumDense, Conv1D, Conv2D), its kernel read as a ``(rows, cols)`` matrix: its
    ``(fan_in, cols)`` reshape (``cols`` the output units or channels, or an
    EinsumDense's output axes), with the bias as a last row when the layer has one.
    Test vector ``i`` holds ``left[i] @ right[i]^T`` there, so a training example
    with layer factors ``(a_t, delta_t)`` (input rows with a 1 for the bias, and
    output gradients, at positions ``t``) scores ``sum_t (a_t^T left[i]) .
    (right[i]^T delta_t)``: ``r * (rows + cols)`` products per position instead of
    ``rows * cols``.

    Attributes:
        kernel: index of the layer's kernel among ``operator.objective.variables``.
        bias: index of its bias, or None.
        left: ``(k, rows, r)``.
        right: ``(k, cols, r)``.
    """

    kernel: int
    bias: int | None
    left: tf.Tensor
    right: tf.Tensor

    @property
    def rank(self) -> int:
        """``r``, the number of columns of ``left`` and ``right``."""
        return int(self.left.shape[-1])


def relative_residual(
    operator: CurvatureOperator, solution: tf.Tensor, rhs: tf.Tensor
) -> tf.Tensor:
    """``|A x - b| / |b|`` per column (0 where ``b`` is 0)."""
    residual = operator.matvec(solution) - rhs
    rhs_norm = tf.norm(rhs, axis=0)
    return tf.math.divide_no_nan(tf.norm(residual, axis=0), rhs_norm)


class Solver:
    """Base class of the solver protocol (see the module docstring).

    Subclasses implement ``solve`` and list their constructor arguments in
    ``get_config`` so that ``type(s).from_config(s.get_config())`` rebuilds them;
    every other method has a default. Register a new solver with
    ``tfi.solvers.register(name, cls)`` so that ``compile(solver=name)`` and
    ``InfluenceModel.load`` find it.
    """

    name = "solver"
    # The curvature the solver approximates whatever `compile(curvature=...)` says
    # (K-FAC: "gauss_newton"), or None when it inverts the operator it is given.
    curvature: str | None = None

    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        """Solves ``(C + damping*I) x = rhs``.

        Args:
            operator: the curvature (see ``CurvatureOperator``).
            rhs: ``(num_params, k)`` right-hand sides.

        Returns:
            ``(solution, diagnostics)``; ``solution`` has the shape of ``rhs``.
        """
        raise NotImplementedError

    def warm_up(self, operator: CurvatureOperator) -> None:
        """Starts getting the first solve ready, without waiting; nothing by default.

        Called at the start of ``fit``, before the data are checked, so it must
        not fail on bad data or block: typically a solve of zero right-hand sides
        inside ``background_calls()``.

        Args:
            operator: the curvature of the training data being fitted.
        """

    def prepare(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> None:
        """One-off work at ``fit`` (a factorisation, an eigenbasis); none by default.

        Args:
            operator: the curvature of the fitted training data.
            progress: ``progress(total, label)`` returns a bar to ``update(step)``
                and ``done()``, for work that takes long.
        """

    def mean_eigenvalue(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> float | None:
        """The mean eigenvalue of the undamped curvature, if the solver knows it cheaply.

        ``damping="auto"`` takes ten times the mean eigenvalue (see
        ``tf_influence.engine.damping``). None (the default) estimates it with
        products; a solver whose approximation has a known trace (K-FAC) returns
        it. Called at ``fit`` with the operator's damping at 0, before ``prepare``;
        what it computes is carried over through ``get_state`` / ``set_state``.
        """
        return None

    def self_products(
        self, operator: CurvatureOperator, vectors: tf.Tensor
    ) -> tuple[tf.Tensor, Diagnostics | None]:
        """``vectors[:, j]^T @ inv(C + damping*I) @ vectors[:, j]`` for every column.

        Args:
            operator: the curvature.
            vectors: ``(num_params, k)``.

        Returns:
            ``(values (k,), diagnostics or None)``. The default solves and takes
            the dot products.
        """
        solution, diagnostics = self.solve(operator, vectors)
        return tf.reduce_sum(tf.cast(vectors, solution.dtype) * solution, axis=0), diagnostics

    def layers(self, operator: CurvatureOperator) -> list[tuple[str, list[int]]] | None:
        """``[(layer name, variable indices), ...]`` for ``explain(per_layer=True)``.

        The groups partition the analysed variables (indices into
        ``operator.objective.variables``); each group's part of the score is
        reported on its own. None (the default): the solver has no layers.
        """
        return None

    def low_rank(self, operator: CurvatureOperator) -> LowRankInverse | None:
        """The inverse as ``basis diag(inverse_values) basis^T``, or None (the default).

        A solver that returns one gets the influence index: the fitted state keeps
        ``basis^T grad L(z_j)`` for every training example, and ``export`` serves it.
        """
        return None

    def projection(self, operator: CurvatureOperator) -> Projection | None:
        """Coordinates known before any pass over the data, to build the index in; None by default.

        The fitted state builds the index ``Phi`` (``n x dim``) in them at ``fit``,
        before ``mean_eigenvalue`` and ``prepare``, then calls ``set_index_gram``.
        """
        return None

    def set_index_gram(
        self, operator: CurvatureOperator, gram: tf.Tensor, num_examples: int
    ) -> None:
        """Takes the Gram of the index built in ``projection``'s coordinates.

        Args:
            operator: the curvature.
            gram: float64 ``sum_j Phi_j Phi_j^T / w_j`` (``w_j`` the sample weights, 1
                without), ``(dim, dim)``, or ``(members, d, d)`` for an ensemble.
            num_examples: n.
        """

    def index(self, operator: CurvatureOperator) -> IndexInverse | None:
        """The inverse in index coordinates, after ``prepare``; None: no index.

        The default makes one from ``low_rank``: ``Projection.from_basis(basis)`` and
        ``diag(inverse_values)``; its index is built after ``prepare``.
        """
        low_rank = self.low_rank(operator)
        if low_rank is None:
            return None
        return IndexInverse(Projection.from_basis(low_rank.basis), low_rank.inverse_values)

    def compress_queries(
        self, operator: CurvatureOperator, solutions: tf.Tensor
    ) -> tuple[tf.Tensor, list[LowRankQueries]]:
        """Solved test vectors as they are scored against the training data.

        Called once per scoring pass over the training data (``explain``,
        ``top_k``, ``explain(per_layer=True)``), with the solutions of every
        test point being explained.

        Args:
            operator: the curvature.
            solutions: ``(num_params, k)``, the vectors ``inv(C + damping*I) @ g_test``.

        Returns:
            ``(vectors, layers)``: ``vectors`` of the shape of ``solutions``, the
            test vectors to score (the compressed ones where a layer is
            compressed), and a ``LowRankQueries`` for each compressed layer, equal
            to the part of ``vectors`` in that layer. The default returns
            ``(solutions, [])``: exact scores.
        """
        return solutions, []

    def get_state(self, operator: CurvatureOperator) -> dict[str, np.ndarray]:
        """Arrays ``InfluenceModel.save`` stores so that ``load`` need not recompute them."""
        return {}

    def set_state(self, operator: CurvatureOperator, arrays: dict[str, np.ndarray]) -> None:
        """Restores what ``get_state`` returned (before ``prepare`` runs at ``load``)."""

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as plain JSON values."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Solver:
        """Rebuilds the solver from ``get_config``'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
