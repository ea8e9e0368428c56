"""K-FAC and EK-FAC: the Gauss-Newton matrix approximated layer by layer with Kronecker factors.

For a ``Dense`` layer ``z = a @ W + b`` an example's gradient of ``[W; b]`` is the
outer product ``[a; 1] delta^T`` (``delta = dL/dz``), so the layer's block of the
Gauss-Newton (true Fisher) matrix ``G = E[vec(g) vec(g)^T]`` is
``E[(a a^T) (x) (delta delta^T)]``. K-FAC (Martens & Grosse 2015) replaces it by

    A (x) S,   A = E[a a^T],   S = E[delta delta^T],

whose inverse needs only the eigendecompositions ``A = Q_A diag(l_A) Q_A^T`` and
``S = Q_S diag(l_S) Q_S^T``: ``inv(A (x) S + damping I) vec(V) =
vec(Q_A [(Q_A^T V Q_S) / (l_A l_S^T + damping)] Q_S^T)``. A convolution's gradient
is the same product summed over output positions with the input patches as ``a``;
under the usual assumptions (Grosse & Martens 2016) ``A`` averages the patches'
products over positions and ``S`` sums the output gradients' over positions.
``Conv1D`` is factored the same way, and an ``EinsumDense`` whose kernel axes are
contracted input axes then output axes (the projections of ``MultiHeadAttention``)
too, its other input axes being positions. A ``DepthwiseConv2D`` is a block of one
Kronecker product per input channel (``A_c`` over the channel's patch values,
``S_c`` over its ``depth_multiplier`` outputs); an ``Embedding``'s ``A`` is diagonal
over tokens (their frequencies per position), so its eigenbasis is the identity
over tokens times ``Q_S`` (``engine.factored_layers``, ``solvers._kronecker_blocks``).

EK-FAC (George et al. 2018) keeps the eigenbasis ``Q_A (x) Q_S`` and replaces the
eigenvalues ``l_A l_S^T`` by the exact second moments of the gradients in that
basis: ``Lambda_ij = E[(Q_A^T g Q_S)_ij^2]``, which is the diagonal of the layer's
true Gauss-Newton block in the Kronecker eigenbasis. A second pass over the
training data computes it from the layer factors (``Q_A^T a`` and ``Q_S^T delta``);
for a Dense layer on one vector per example without ever forming a gradient.

Every other chosen parameter (normalisation scales, biases that fit no block,
layers of other kinds, ...) gets the diagonal of the Gauss-Newton matrix, ``E[g_i^2]``, from
per-example gradients. The regulariser's Hessian enters through its diagonal (exact
for L2): added to the diagonal parameters, and projected on each layer's
eigenbasis (the diagonal of ``Q^T D Q``).

"True Fisher" (the default): ``delta`` is the backward pass of a draw ``u`` from
the output distribution with covariance ``H_L`` (the loss's Hessian with respect
to the model's outputs, which includes the example's weight), ``u = L eps`` with
``L L^T = H_L`` and ``eps ~ N(0, I)``. For cross-entropy this has the second
moments of ``p - onehot(y)`` with ``y`` sampled from the model's predictive
distribution, and only second moments enter the factors, so it is the
sampled-label Fisher; ``E[J^T u u^T J] = J^T H_L J``, so the factors are unbiased
for the Gauss-Newton matrix the other solvers use with
``curvature="gauss_newton"``. ``samples="exact"`` takes the expectation over
``u`` exactly (one backward pass per model output), ``fisher="empirical"`` uses
the gradients of the training labels instead.

References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML 2016. George, Laurent,
    Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient Descent in a
    Kronecker-factored Eigenbasis", NeurIPS 2018. Grosse, Bae, Anil et al.,
    "Studying Large Language Model Generalization with Influence Functions", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._validation import check_int, check_positive_int
from tf_influence.engine.output_draws import check_fisher, check_samples
from tf_influence.solvers.base import (
    CurvatureOperator,
    Diagnostics,
    LowRankQueries,
    ProgressFactory,
    Solver,
    silent_progress,
)

FACTOR_DTYPES = ("float64", "float32")
# The layers whose queries ``query_rank`` truncates, for messages.
COMPRESSED = "Dense, EinsumDense, Conv1D and Conv2D"
_STATE = "kfac.state"


@dataclasses.dataclass(frozen=True)
class _Block:
    """A Kronecker-factored layer: its ``[kernel; bias]`` as ``(rows, cols)`` matrices.

    One matrix for the matrix kinds (Dense, EinsumDense, convolutions) and an
    Embedding (``fan_in`` its vocabulary); a DepthwiseConv2D is ``groups`` of them, one
    per input channel, each ``(kh * kw + 1, depth_multiplier)``.
    """

    entry: Any  # engine.factored.FactoredLayer
    fan_in: int
    cols: int
    bias: bool
    groups: int = 0  # DepthwiseConv2D: its input channels; 0: one matrix

    @property
    def rows(self) -> int:
        return self.fan_in + (1 if self.bias else 0)

    @property
    def one_hot(self) -> bool:
        """An Embedding: its ``A`` is diagonal over tokens (``Q_A`` the identity, not kept)."""
        return self.entry.kind == "embedding"

    @property
    def compressible(self) -> bool:
        """One ``(rows, cols)`` matrix of a matrix kind: what ``query_rank`` truncates."""
        return not self.groups and not self.one_hot

    @property
    def size(self) -> int:
        """``min(rows, cols)``: the largest rank of the layer's ``(rows, cols)`` matrices."""
        return min(self.rows, self.cols)

    def shapes(self) -> tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``(Q_A, Q_S, eigenvalues)`` (``Q_A`` None for an Embedding)."""
        group = (self.groups,) if self.groups else ()
        qa = None if self.one_hot else (*group, self.rows, self.rows)
        return qa, (*group, self.cols, self.cols), (*group, self.rows, self.cols)


@dataclasses.dataclass
class KroneckerState:
    """What K-FAC / EK-FAC keep per fit: eigenbases, eigenvalues and diagonals.

    Attributes:
        blocks: the Kronecker-factored layers.
        diagonal: indices of the variables with a diagonal approximation.
        qa, qs: per block, the ``(rows, rows)`` and ``(cols, cols)`` eigenbases
            (with a leading ``groups`` axis for a DepthwiseConv2D; ``qa`` None for an
            Embedding, whose input eigenbasis is the identity).
        values: per block, the ``(rows, cols)`` eigenvalues (``l_A l_S^T`` for
            K-FAC, the corrected ones for EK-FAC; with the regulariser), with the
            leading ``groups`` axis of a DepthwiseConv2D.
        diagonals: per diagonal variable, the flat diagonal.

    Every tensor has the solver's ``factor_dtype`` (float64 by default); the sums
    behind them are accumulated, and the factors decomposed, in float64.
    """

    blocks: list[_Block]
    diagonal: list[int]
    qa: list[tf.Tensor | None]
    qs: list[tf.Tensor]
    values: list[tf.Tensor]
    diagonals: list[tf.Tensor]

    @functools.cached_property
    def trace(self) -> float:
        """The sum of the approximation's eigenvalues (its trace)."""
        return sum(float(tf.reduce_sum(t)) for t in self.values + self.diagonals)

    @functools.cached_property
    def smallest(self) -> float:
        """The approximation's smallest eigenvalue (inf without any)."""
        return min(
            [float(tf.reduce_min(t)) for t in self.values + self.diagonals if t.shape[0]],
            default=float("inf"),
        )


def structure(objective) -> tuple[list[_Block], list[int]]:
    """The Kronecker-factored layers of ``objective`` and the variables left diagonal."""
    from tf_influence.engine.factored import KERNEL_KINDS, find_layers

    layout = objective.layout
    blocks, covered = [], set()
    for entry in find_layers(objective):
        if entry.kernel is None or entry.kind not in KERNEL_KINDS:
            continue  # a bias alone, or a normalisation layer: diagonal
        shape = [int(d) for d in layout.shapes[entry.kernel]]
        bias = entry.bias is not None
        if entry.kind == "depthwise":
            kh, kw, channels, multiplier = shape
            block = _Block(entry, kh * kw, multiplier, bias, groups=channels)
        else:
            split = entry.einsum.split if entry.kind == "einsum" else len(shape) - 1
            block = _Block(entry, int(np.prod(shape[:split])), int(np.prod(shape[split:])), bias)
        blocks.append(block)
        covered.update(i for i in (entry.kernel, entry.bias) if i is not None)
    diagonal = [i for i in range(len(layout.shapes)) if i not in covered]
    return blocks, diagonal


def coverage(source: Any) -> dict[str, str]:
    """Which approximation each analysed variable gets from ``KFAC`` / ``EKFAC``.

    Args:
        source: a fitted ``InfluenceModel`` (or its ``operator.objective``).

    Returns:
        ``{variable path: "kronecker (<layer name>)" or "diagonal"}``, in the order of
        the parameters.

    Example:
        >>> tfi.solvers.ekfac.coverage(im)
        {'model/dense/kernel': 'kronecker (dense)', ..., 'model/norm/gamma': 'diagonal'}
    """
    from tf_influence.engine.objective import variable_name

    operator = getattr(source, "operator", None)
    objective = operator.objective if operator is not None else source

    blocks, _ = structure(objective)
    found = {}
    for block in blocks:
        for index in (block.entry.kernel, block.entry.bias):
            if index is not None:
                found[index] = f"kronecker ({block.entry.layer.name})"
    return {variable_name(v): found.get(i, "diagonal") for i, v in enumerate(objective.variables)}


class KFAC(Solver):
    """``inv(G + damping*I) @ rhs`` with G approximated per layer by Kronecker factors.

    Dense, EinsumDense, Conv1D, Conv2D, DepthwiseConv2D and Embedding layers get
    ``A (x) S`` (see the module docstring; ``coverage`` lists what each variable
    got); every other chosen parameter gets the Gauss-Newton diagonal. The
    factors are fitted once per ``InfluenceModel.fit`` (one pass over the training
    data with a progress bar), summed and decomposed in float64, kept in
    ``factor_dtype``, saved with the state, and reused by every query; a solve is
    a few small matrix products per layer. The approximation is of the
    Gauss-Newton matrix, so ``compile`` takes ``curvature="gauss_newton"`` with it
    (the default); ``damping`` is added to every eigenvalue, which is
    ``inv(G_approx + damping*I)`` exactly.

    Query batching (``query_rank=r``): before the solved test vectors are scored
    against the training data (``explain``, ``top_k``), their part in each Dense,
    EinsumDense, Conv1D and Conv2D layer, a ``(rows, cols)`` matrix ``P_i`` (the
    kernel as input features by outputs, with its bias as a last row), is replaced
    by its best rank-``r`` approximation (truncated SVD) ``U_i diag(s_i) V_i^T``.
    A training example with factors ``(a_t, delta_t)`` then scores
    ``sum_t (a_t^T U_i) diag(s_i) (V_i^T delta_t)`` per layer: ``t * r * (rows +
    cols)`` products instead of ``rows * cols``, taken where that is fewer (a
    Dense layer on vectors, ``t = 1``). Kept exact: layers whose ``min(rows,
    cols)`` is below ``r``; DepthwiseConv2D layers (per channel a ``(kh * kw + 1,
    depth_multiplier)`` matrix, of rank at most ``depth_multiplier``, 1 by
    default); Embedding layers (their scores gather ``dim`` products per token and
    test vector, fewer than the ``r * (dim + 1)`` of rank-``r`` factors); the
    diagonal parameters, ``self_influence`` and ``inverse_hvp_tests``.

    Args:
        fisher: ``"true"`` (the default: output gradients drawn from the model's
            predictive distribution, through the loss's output Hessian) or
            ``"empirical"`` (the gradients of the training labels).
        samples: draws per example for ``fisher="true"``, or ``"exact"`` for the
            exact expectation (one backward pass per model output: for a few
            outputs only).
        seed: seed of the draws. Each example's draws are seeded by ``seed`` and its
            position in the training data: the same factors for any ``batch_size``
            and any number of ``tf.distribute`` replicas.
        batch_size: examples per step of the factor passes (default: the
            ``fit`` batch size).
        query_rank: None (the default: exact scores), or the rank ``r`` each
            Dense, EinsumDense, Conv1D and Conv2D layer's part of a solved test
            vector is truncated to before scoring. Layers smaller than ``r``
            (``min(rows, cols) < r``) stay exact; a rank above every such layer's
            size, or a model with none of them, is refused at ``fit``.
        factor_dtype: ``"float64"`` (the default) or ``"float32"``: the dtype the
            eigenbases, eigenvalues and diagonals are kept, saved and applied in.
            ``"float32"`` halves their memory and file size; the sums are still
            accumulated, and decomposed, in float64.
        max_examples: None (the default: every training example), or the number of
            training examples the factor passes (and EK-FAC's correction pass) read:
            a fixed random subset drawn with ``seed``, each example keeping its
            own draws. The passes cost in proportion; the factors are averages over
            the subset. Scores are still computed against every training example.

    Raises:
        ValueError: an argument is out of range (at construction), or
            ``query_rank`` would compress no layer (at ``fit``).
    """

    name = "kfac"
    curvature = "gauss_newton"
    corrected = False

    def __init__(
        self,
        fisher: str = "true",
        samples: int | str = 1,
        seed: int = 0,
        batch_size: int | None = None,
        query_rank: int | None = None,
        factor_dtype: str = "float64",
        max_examples: int | None = None,
    ):
        self.fisher = check_fisher(fisher)
        self.samples = check_samples(samples)
        self.seed = check_int("seed", seed)
        self.batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        self.query_rank = check_positive_int(
            "query_rank", query_rank, allow_none=True, none_means="exact scores"
        )
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(
                'Argument `factor_dtype` must be "float64" or "float32". '
                f"Received: factor_dtype={factor_dtype!r}"
            )
        self.factor_dtype = factor_dtype
        self.max_examples = check_positive_int(
            "max_examples", max_examples, allow_none=True, none_means="every training example"
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "fisher": self.fisher,
            "samples": self.samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "query_rank": self.query_rank,
            "factor_dtype": self.factor_dtype,
            "max_examples": self.max_examples,
        }

    # -- fitting ------------------------------------------------------------------------
    def _key(self) -> tuple:
        # query_rank is left out: it changes the scoring, not the factors.
        return (
            _STATE,
            type(self).__name__,
            self.fisher,
            self.samples,
            self.seed,
            self.batch_size,
            self.factor_dtype,
            self.max_examples,
        )

    def state(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> KroneckerState:
        """The fitted factors of ``operator`` (computed once, kept in its cache)."""
        return operator.cached(self._key(), lambda: self._fit(operator, progress))

    def prepare(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> None:
        self._query_ranks(self.state(operator, progress).blocks)

    def _query_ranks(self, blocks: list[_Block]) -> list[int | None]:
        """Per block, the rank its queries are truncated to (None: exact)."""
        rank = self.query_rank
        if rank is None:
            return [None] * len(blocks)
        matrices = [b for b in blocks if b.compressible]
        if not matrices:
            raise ValueError(
                f"Argument `query_rank` truncates the queries of {COMPRESSED} layers, and "
                "none of the Kronecker-factored layers here is one (DepthwiseConv2D and "
                "Embedding layers keep exact queries), so it would compress none. "
                f"Received: query_rank={rank}. Pass query_rank=None for exact scores."
            )
        largest = max(matrices, key=lambda b: b.size)
        if rank > largest.size:
            raise ValueError(
                f"Argument `query_rank` is larger than every Kronecker-factored layer, so it "
                f"would compress none: the largest, {largest.entry.layer.name!r}, holds "
                f"{largest.rows} x {largest.cols} matrices (its kernel"
                f"{' and bias row' if largest.bias else ''}), of rank at most {largest.size}. "
                f"Received: query_rank={rank}. Pass query_rank <= {largest.size}, or "
                "query_rank=None for exact scores."
            )
        return [rank if b.compressible and rank <= b.size else None for b in blocks]

    def mean_eigenvalue(
        self, operator: CurvatureOperator, progress: ProgressFactory = silent_progress
    ) -> float:
        """The trace of the approximation over the number of parameters.

        For EK-FAC the trace is the mean squared gradient norm over the training data,
        an unbiased estimate of the Gauss-Newton trace (exact with
        ``samples="exact"``), so ``damping="auto"`` has the meaning it has with the
        other solvers, without the products of the default estimate.
        """
        return self.state(operator, progress).trace / operator.num_params

    def _fit(self, operator: CurvatureOperator, progress: ProgressFactory) -> KroneckerState:
        from tf_influence.solvers import _kronecker

        blocks = structure(operator.objective)[0]
        if blocks:  # a bad query_rank is refused before the passes over the data
            self._query_ranks(blocks)
        return _kronecker.fit(self, operator, progress)

    # -- solving ------------------------------------------------------------------------
    def solve(self, operator: CurvatureOperator, rhs: tf.Tensor) -> tuple[tf.Tensor, Diagnostics]:
        from tf_influence.solvers import _kronecker

        state = self.state(operator)
        solution = _kronecker.precondition(state, operator, rhs)
        k = int(rhs.shape[1])
        diagnostics = Diagnostics(
            solver=self.name,
            iterations=0,
            residual_norm=np.zeros(k),
            converged=np.ones(k, bool),
            info={
                "layers": [b.entry.layer.name for b in state.blocks],
                "diagonal_params": int(
                    sum(operator.objective.layout.sizes[i] for i in state.diagonal)
                ),
                "residual": "of the approximation (exact solve)",
                "query_ranks": {
                    b.entry.layer.name: r
                    for b, r in zip(state.blocks, self._query_ranks(state.blocks), strict=True)
                },
            },
        )
        return solution, diagnostics

    def compress_queries(
        self, operator: CurvatureOperator, solutions: tf.Tensor
    ) -> tuple[tf.Tensor, list[LowRankQueries]]:
        """Each compressed layer's part of ``solutions`` truncated to rank ``query_rank``.

        Returns ``(solutions, [])`` unchanged without ``query_rank``; see
        ``Solver.compress_queries``.
        """
        if self.query_rank is None:
            return solutions, []
        from tf_influence.solvers import _kronecker

        blocks = self.state(operator).blocks
        ranks = self._query_ranks(blocks)
        return _kronecker.compress(operator, blocks, ranks, solutions)

    def layers(self, operator: CurvatureOperator) -> list[tuple[str, list[int]]]:
        """One group per Kronecker-factored layer, then the diagonal variables by layer."""
        from tf_influence.engine.objective import variable_name

        blocks, diagonal = structure(operator.objective)
        groups = [
            (b.entry.layer.name, [i for i in (b.entry.kernel, b.entry.bias) if i is not None])
            for b in blocks
        ]
        owners: dict[str, list[int]] = {}
        for index in diagonal:
            path = variable_name(operator.objective.variables[index])
            owner = path.rsplit("/", 2)[-2] if "/" in path else path
            owners.setdefault(owner, []).append(index)
        return groups + list(owners.items())

    # -- saving -------------------------------------------------------------------------
    def get_state(self, operator: CurvatureOperator) -> dict[str, np.ndarray]:
        state = self.state(operator)
        arrays = {"num_blocks": np.array(len(state.blocks))}
        for i, (qa, qs, values) in enumerate(zip(state.qa, state.qs, state.values, strict=True)):
            if qa is not None:  # an Embedding's is the identity
                arrays[f"block{i}_qa"] = qa.numpy()
            arrays[f"block{i}_qs"] = qs.numpy()
            arrays[f"block{i}_values"] = values.numpy()
        for index, diagonal in zip(state.diagonal, state.diagonals, strict=True):
            arrays[f"diagonal{index}"] = diagonal.numpy()
        return arrays

    def set_state(self, operator: CurvatureOperator, arrays: dict[str, np.ndarray]) -> None:
        from tf_influence.solvers import _kronecker

        state = _kronecker.from_arrays(operator, arrays, self.factor_dtype)
        operator.cached(self._key(), lambda: state)


class EKFAC(KFAC):
    """K-FAC with eigenvalues corrected from per-example gradients (George et al. 2018).

    The Kronecker eigenbasis of ``KFAC``, with the eigenvalues replaced by the
    second moments of the training gradients in that basis (a second pass over the
    training data). Arguments as ``KFAC``.
    """

    name = "ekfac"
    corrected = True
