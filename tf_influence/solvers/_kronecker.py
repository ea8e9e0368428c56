"""The passes behind ``KFAC`` / ``EKFAC``: factors, eigenbases, corrections, preconditioning.

See ``tf_influence.solvers.ekfac`` for the mathematics. Each pass is one compiled
step per batch (a forward pass recording the factored layers' inputs and outputs,
one backward pass per output draw); the sums stay on the device and are
accumulated in float64. Under a ``tf.distribute`` strategy each replica runs the
step on its shard of every global batch and keeps its own sums, which are
all-reduced once per pass (``ReplicaData.replica_sums``); the eigendecompositions
run once, on the reduced sums.

Output draws (``fisher="true"`` with an integer ``samples``) are seeded per example,
from ``seed`` and the example's position in the training data: the same seed gives
the same factors whatever the batch size and the number of replicas or workers.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_influence.engine.output_draws import output_draws, subset_positions, training_sums
from tf_influence.solvers import _kronecker_blocks as kinds
from tf_influence.solvers.base import CurvatureError, LowRankQueries, ProgressFactory
from tf_influence.solvers.ekfac import KFAC, KroneckerState, _Block, structure

# The layers with Kronecker factors, for messages.
COVERED = "Dense, EinsumDense, Conv1D, Conv2D, DepthwiseConv2D and Embedding"


class _Steps:
    """The compiled per-batch steps of the factor and correction passes."""

    def __init__(
        self,
        solver: KFAC,
        objective,
        blocks: list[_Block],
        diagonal: list[int],
        share: bool = True,
    ):
        from tf_influence.engine.compile import SpecFunction, objective_key, shared_function
        from tf_influence.engine.factored import NORM_KINDS, find_layers

        self.solver = solver
        self.objective = objective
        self.blocks = blocks
        self.diagonal = diagonal
        self.dtype = objective.dtype
        # Normalisation layers: per-example gradients of their scales and shifts from
        # the same backward pass (engine.factored); pfor only for what is left.
        self.norms = [e for e in find_layers(objective) if e.kind in NORM_KINDS]
        by_norm = {i for e in self.norms for i in (e.kernel, e.bias) if i is not None}
        self.pfor_diagonal = [i for i in diagonal if i not in by_norm]
        # Traced once per model and configuration: a refit (a callback's next analysis,
        # a second InfluenceModel) reuses the steps. The blocks follow from the objective.
        key = None
        if share:
            key = (
                "kronecker",
                objective_key(objective),
                solver.fisher,
                solver.samples,
                solver.seed,
            )

        def compile_(fn):
            return SpecFunction(fn, relaxed=(0, 1, 2))

        self.factors = shared_function(self, objective.model, key, "_factors", compile_)
        self.corrections = shared_function(self, objective.model, key, "_corrections", compile_)

    def _forward(self, x, y, positions, stream, with_diagonal):
        """Records the factored layers, draws the output gradients, backpropagates them.

        Returns ``(grouped records, [(weight, deltas per record, diagonal grads)])``.
        """
        from tf_influence.engine.curvature import tf_variable
        from tf_influence.engine.factored import _recording

        records: list = []
        variables = [tf_variable(self.objective.variables[i]) for i in self.pfor_diagonal]
        layers = [b.entry for b in self.blocks] + list(self.norms)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(variables)
            with _recording(layers, records):
                outputs = self.objective.predict(x)
            if self.solver.fisher == "empirical":  # the training losses themselves
                draws = [(1.0, self.objective.loss_from_outputs(outputs, y))]
            else:
                draws = output_draws(
                    self.objective,
                    outputs,
                    y,
                    positions,
                    self.solver.samples,
                    self.solver.seed,
                    stream,
                )
        zs = [z for _, _, z in records]
        results = []
        for weight, pseudo in draws:
            deltas = tape.gradient(pseudo, zs) if zs else []
            deltas = [tf.zeros_like(z) if d is None else d for d, z in zip(deltas, zs, strict=True)]
            per_example = []
            if with_diagonal and self.diagonal:
                per_example = self._diagonal_gradients(tape, pseudo, variables, records, deltas)
            results.append((weight, deltas, per_example))
        del tape
        return records, results

    def _diagonal_gradients(self, tape, pseudo, variables, records, deltas):
        """``(b, size)`` per-example gradients of the diagonal variables, in their order."""
        from tf_influence.engine.factored import FactoredGradients, Use

        size = tf.shape(pseudo)[0]
        found = {}
        if variables:
            jacobians = tape.jacobian(pseudo, variables, experimental_use_pfor=True)
            for index, g, v in zip(self.pfor_diagonal, jacobians, variables, strict=True):
                found[index] = (
                    tf.zeros([size, int(np.prod(v.shape))], tf.float64)
                    if g is None
                    else tf.reshape(tf.cast(g, tf.float64), [size, -1])
                )
        norms = {id(e.layer) for e in self.norms}
        uses = [
            Use(entry, inputs, delta)
            for (entry, inputs, _), delta in zip(records, deltas, strict=True)
            if id(entry.layer) in norms
        ]
        if uses:
            found.update(
                FactoredGradients(self.objective, self.norms).per_example(uses, size, tf.float64)
            )
        return [
            found.get(i, tf.zeros([size, self.objective.layout.sizes[i]], tf.float64))
            for i in self.diagonal
        ]

    def _by_block(self, records, deltas):
        """Per block: ``[(inputs, delta), ...]`` over its calls."""
        grouped: dict[int, list] = {}
        for (entry, inputs, _), delta in zip(records, deltas, strict=True):
            grouped.setdefault(id(entry.layer), []).append((inputs, delta))
        return [grouped.get(id(b.entry.layer), []) for b in self.blocks]

    def _factors(self, x, y, positions):
        """Batch sums of ``A`` (position means), ``S`` (position sums) and the diagonals.

        ``positions``: the ``(b,)`` positions of the batch's examples in the data (int64).
        """
        records, results = self._forward(x, y, positions, 0, with_diagonal=True)
        dtype = self.dtype
        a_sums, s_sums = [], []
        for block, calls in zip(
            self.blocks, self._by_block(records, [None] * len(records)), strict=True
        ):
            qa_shape, qs_shape, _ = block.shapes()
            a_sum = tf.zeros(qa_shape or [block.fan_in], tf.float64)
            positions = 0
            for inputs, _ in calls:
                moments, count = kinds.input_moments(block, inputs, dtype)
                a_sum += moments
                positions += count
            # A averages over positions (and calls) within an example.
            a_sums.append(a_sum / tf.cast(tf.maximum(positions, 1), tf.float64))
            s_sums.append(tf.zeros(qs_shape, tf.float64))
        diagonal_sums = [
            tf.zeros([int(np.prod(self.objective.layout.shapes[i]))], tf.float64)
            for i in self.diagonal
        ]
        for weight, deltas, per_example in results:
            for index, (block, calls) in enumerate(
                zip(self.blocks, self._by_block(records, deltas), strict=True)
            ):
                for _, delta in calls:
                    s_sums[index] += weight * kinds.output_moments(block, delta, dtype)
            for index, grads in enumerate(per_example):
                diagonal_sums[index] += weight * tf.reduce_sum(tf.square(grads), axis=0)
        return a_sums, s_sums, diagonal_sums

    def _corrections(self, x, y, positions, qa, qs):
        """Batch sums of the squared gradients in each block's Kronecker eigenbasis."""
        records, results = self._forward(x, y, positions, 1, with_diagonal=False)
        sums = [tf.zeros(b.shapes()[2], tf.float64) for b in self.blocks]
        for weight, deltas, _ in results:
            for index, (block, calls) in enumerate(
                zip(self.blocks, self._by_block(records, deltas), strict=True)
            ):
                if not calls:
                    continue
                total = kinds.rotated_squares(block, calls, qa[index], qs[index], self.dtype)
                sums[index] += weight * tf.cast(total, tf.float64)
        return sums


def _regularizer_diagonal(objective) -> list[tf.Tensor] | None:
    """The row sums of the regulariser's Hessian per variable (its diagonal for L2)."""
    if not objective.has_regularization():
        return None
    from tf_influence.engine.curvature import tf_variable

    variables = [tf_variable(v) for v in objective.variables]
    with tf.GradientTape() as outer:
        outer.watch(variables)
        with tf.GradientTape() as inner:
            inner.watch(variables)
            omega = objective.regularization()
        grads = inner.gradient(omega, variables)
        total = tf.add_n(
            [tf.zeros([], omega.dtype)] + [tf.reduce_sum(g) for g in grads if g is not None]
        )
    rows = outer.gradient(total, variables)
    return [
        tf.zeros([int(np.prod(v.shape))], tf.float64)
        if r is None
        else tf.reshape(tf.cast(r, tf.float64), [-1])
        for r, v in zip(rows, variables, strict=True)
    ]


def fit(solver: KFAC, operator, progress: ProgressFactory) -> KroneckerState:
    """The factors of ``operator``'s training data: one pass (K-FAC) or two (EK-FAC)."""
    objective = operator.objective
    blocks, diagonal = structure(objective)
    if not blocks:
        raise ValueError(
            f"{type(solver).__name__} approximates the curvature of {COVERED} layers, "
            f"and the analysed parameters of model {objective.model.name!r} hold none. "
            "Received: variables "
            f"{[v.path if hasattr(v, 'path') else v.name for v in objective.variables][:8]}. "
            'Use solver="cg" or solver="arnoldi" for this model.'
        )
    data = operator.data
    batch_size = solver.batch_size or data.batch_size
    keep = subset_positions(operator.num_examples, solver.max_examples, solver.seed)
    used = operator.num_examples if keep is None else len(keep)
    num_batches = data.num_batches(batch_size) if keep is None else -(-used // batch_size)
    steps = _Steps(solver, objective, blocks, diagonal, share=operator.replicas is None)
    passes = 2 if solver.corrected else 1
    bar = progress(num_batches * passes, f"{type(solver).__name__} factors")
    done = [0]

    def advance():
        done[0] += 1
        bar.update(done[0])

    zeros = (
        [tf.zeros(b.shapes()[0] or [b.fan_in], tf.float64) for b in blocks],
        [tf.zeros(b.shapes()[1], tf.float64) for b in blocks],
        [tf.zeros([objective.layout.sizes[i]], tf.float64) for i in diagonal],
    )
    a_sums, s_sums, d_sums = training_sums(
        operator, steps.factors, zeros, batch_size, (), advance, keep
    )
    n = float(used)
    qa, qs, values = [], [], []
    for block, a_sum, s_sum in zip(blocks, a_sums, s_sums, strict=True):
        found = kinds.eigen(block, a_sum / n, s_sum / n)
        for kept, value in zip((qa, qs, values), found, strict=True):
            kept.append(value)
    diagonals = [d / n for d in d_sums]
    if solver.corrected:
        compute = objective.dtype
        # An Embedding has no Q_A (the step's arguments are tensors: an empty one).
        qa_c = [tf.zeros([0], compute) if q is None else tf.cast(q, compute) for q in qa]
        qs_c = [tf.cast(q, compute) for q in qs]
        zeros = [tf.zeros_like(v) for v in values]
        sums = training_sums(
            operator, steps.corrections, zeros, batch_size, (qa_c, qs_c), advance, keep
        )
        values = [t / n for t in sums]
    regular = _regularizer_diagonal(objective)
    if regular is not None:
        values = [
            v + _projected(regular, block, a, s)
            for v, block, a, s in zip(values, blocks, qa, qs, strict=True)
        ]
        diagonals = [d + regular[i] for d, i in zip(diagonals, diagonal, strict=True)]
    bar.done()
    stored = tf.as_dtype(solver.factor_dtype)
    qa, qs, values, diagonals = (
        [None if t is None else tf.cast(t, stored) for t in tensors]
        for tensors in (qa, qs, values, diagonals)
    )
    return KroneckerState(blocks, diagonal, qa, qs, values, diagonals)


def _projected(regular: list[tf.Tensor], block: _Block, qa, qs) -> tf.Tensor:
    """The diagonal of ``Q^T D Q`` for the block's part ``D`` of the regulariser diagonal."""
    bias = regular[block.entry.bias] if block.bias else None
    return kinds.projected(block, regular[block.entry.kernel], bias, qa, qs)


def from_arrays(operator, arrays: dict[str, np.ndarray], dtype: str = "float64") -> KroneckerState:
    """The state ``KFAC.get_state`` saved, checked against ``operator``'s model, in ``dtype``."""
    blocks, diagonal = structure(operator.objective)
    saved = int(arrays.get("num_blocks", -1))
    problems = []
    if saved != len(blocks):
        problems.append(f"{saved} factored layers saved, {len(blocks)} in the model")
    qa, qs, values = [], [], []
    for i, block in enumerate(blocks):
        if problems:
            break
        found = [arrays.get(f"block{i}_{name}") for name in ("qa", "qs", "values")]
        shapes = block.shapes()
        if any(
            (f is None) != (s is None) or (f is not None and tuple(f.shape) != s)
            for f, s in zip(found, shapes, strict=True)
        ):
            problems.append(f"layer {block.entry.layer.name!r} has other shapes")
            break
        qa.append(None if found[0] is None else tf.constant(found[0], dtype))
        qs.append(tf.constant(found[1], dtype))
        values.append(tf.constant(found[2], dtype))
    diagonals = []
    for index in diagonal:
        found = arrays.get(f"diagonal{index}")
        if found is None or found.shape != (operator.objective.layout.sizes[index],):
            problems.append(f"variable {index} has no saved diagonal of its size")
            break
        diagonals.append(tf.constant(found, dtype))
    if problems:
        raise ValueError(
            "The saved K-FAC factors do not belong to this model: "
            + "; ".join(problems)
            + ". Load the state into the model (and `params`) it was saved from, or "
            "`fit` again to recompute the factors."
        )
    return KroneckerState(blocks, diagonal, qa, qs, values, diagonals)


def precondition(state: KroneckerState, operator, rhs: tf.Tensor) -> tf.Tensor:
    """``inv(G_approx + damping*I) @ rhs`` for ``(p, k)`` right-hand sides."""
    damping = float(operator.damping)
    if not state.smallest + damping > 0:
        raise CurvatureError(
            "The Kronecker-factored curvature has a zero eigenvalue (a direction no "
            "training example's gradient reaches), so it cannot be inverted without "
            f"damping. Received: damping={damping}. Pass a positive damping to `compile`, "
            'e.g. damping="auto" or damping=1e-3.'
        )
    layout = operator.objective.layout
    dtype = rhs.dtype
    parts = list(tf.split(rhs, layout.sizes, axis=0))
    out = list(parts)
    for block, qa, qs, values in zip(state.blocks, state.qa, state.qs, state.values, strict=True):
        qa_c = None if qa is None else tf.cast(qa, dtype)
        qs_c = tf.cast(qs, dtype)
        inverse = tf.cast(1.0 / (values + damping), dtype)
        bias = parts[block.entry.bias] if block.bias else None
        matrices = kinds.to_matrices(block, parts[block.entry.kernel], bias)  # (k, ...)
        rotated = kinds.rotate(block, matrices, qa_c, qs_c)
        solved = kinds.rotate(block, rotated * inverse, qa_c, qs_c, back=True)
        out[block.entry.kernel], solved_bias = kinds.from_matrices(block, solved)
        if block.bias:
            out[block.entry.bias] = solved_bias
    for index, diagonal in zip(state.diagonal, state.diagonals, strict=True):
        out[index] = parts[index] / tf.cast(diagonal + damping, dtype)[:, None]
    return tf.concat(out, axis=0)


def compress(
    operator, blocks: list[_Block], ranks: list[int | None], solutions: tf.Tensor
) -> tuple[tf.Tensor, list[LowRankQueries]]:
    """Each block's part of ``(p, k)`` solutions truncated to its rank (None: kept).

    Only blocks of one ``(rows, cols)`` matrix are given a rank (``KFAC._query_ranks``).
    Returns the truncated solutions and, per truncated block, its ``LowRankQueries``
    (``left @ right^T`` is the block's part of the truncated solutions).
    """
    layout = operator.objective.layout
    parts = list(tf.split(solutions, layout.sizes, axis=0))
    queries = []
    for block, rank in zip(blocks, ranks, strict=True):
        if rank is None:
            continue
        bias = parts[block.entry.bias] if block.bias else None
        matrices = kinds.to_matrices(block, parts[block.entry.kernel], bias)  # (k, rows, cols)
        left, right = truncated(matrices, rank)
        queries.append(LowRankQueries(block.entry.kernel, block.entry.bias, left, right))
        product = tf.matmul(left, right, transpose_b=True)
        parts[block.entry.kernel], truncated_bias = kinds.from_matrices(block, product)
        if block.bias:
            parts[block.entry.bias] = truncated_bias
    return tf.concat(parts, axis=0), queries


def truncated(matrices: tf.Tensor, rank: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``(left (k, rows, r), right (k, cols, r))`` with ``left @ right^T`` the rank-r SVD.

    The top ``rank`` singular vectors of each ``(rows, cols)`` matrix ``M`` come from
    the eigendecomposition of the smaller Gram matrix (``M^T M`` or ``M M^T``); the
    other factor is ``M`` times them, so ``left @ right^T`` is ``M`` projected on the
    span of its top singular vectors: its truncated SVD. This is two to three times
    faster than ``tf.linalg.svd`` on CPU; as squared singular values enter, the
    directions are resolved to about ``sqrt(eps)`` of the largest singular value
    (exact at ``rank = min(rows, cols)``, where the projection is the identity).
    """
    rows, cols = int(matrices.shape[1]), int(matrices.shape[2])
    if cols <= rows:  # M = (M V) V^T with V the top eigenvectors of M^T M
        gram = tf.matmul(matrices, matrices, transpose_a=True)
        vectors = tf.linalg.eigh(gram)[1][:, :, cols - rank :]
        return tf.matmul(matrices, vectors), vectors
    gram = tf.matmul(matrices, matrices, transpose_b=True)
    vectors = tf.linalg.eigh(gram)[1][:, :, rows - rank :]
    return vectors, tf.matmul(matrices, vectors, transpose_a=True)
