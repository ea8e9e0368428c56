"""The passes behind ``KFAC`` / ``EKFAC``: factors, eigenbases, corrections, preconditioning.

See ``tf_influence.solvers.ekfac`` for the mathematics. Each pass is one compiled
step per batch (a forward pass recording the factored layers' inputs and outputs,
one backward pass per output draw); the sums stay on the device and are
accumulated in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence.solvers.base import CurvatureError, LowRankQueries, ProgressFactory
from tf_influence.solvers.ekfac import KFAC, KroneckerState, _Block, structure


# -- output draws ------------------------------------------------------------------------
def _output_draws(solver: KFAC, objective, outputs, y, seed) -> list[tuple[float, Any]]:
    """``[(weight, per-example pseudo-loss (b,))]`` whose gradients are the draws ``J^T u``.

    ``fisher="true"``: ``u = L eps`` with ``L L^T`` the loss's output Hessian per
    example; ``"exact"`` samples take ``eps`` as every column of the identity
    (weight 1 each: the columns of ``L`` sum ``u u^T`` to ``H_L``), an integer
    ``m`` takes ``m`` normal draws (weight ``1/m``). ``fisher="empirical"``: the
    training losses themselves.
    """
    flat = tf.nest.flatten(outputs)
    if solver.fisher == "empirical":
        return [(1.0, objective.loss_from_outputs(outputs, y))]
    from tf_influence.engine.gauss_newton import output_hessians

    hessians = output_hessians(objective, outputs, y)  # (b, K, K)
    if hessians is None:
        return []
    size = tf.shape(flat[0])[0]
    values, vectors = tf.linalg.eigh(tf.cast(hessians, tf.float64))
    root = vectors * tf.sqrt(tf.maximum(values, 0.0))[:, None, :]  # L, L L^T = H_L
    width = sum(int(np.prod(t.shape[1:], dtype=np.int64)) for t in flat)
    if solver.samples == "exact":
        columns, weight = [root[:, :, i] for i in range(width)], 1.0
    else:
        noise = tf.random.stateless_normal([size, width, solver.samples], seed, dtype=tf.float64)
        drawn = tf.matmul(root, noise)
        columns, weight = [drawn[:, :, i] for i in range(solver.samples)], 1.0 / solver.samples
    joined_outputs = tf.concat(
        [tf.reshape(tf.cast(t, tf.float64), [size, -1]) for t in flat], axis=1
    )
    draws = []
    for column in columns:
        # A pseudo-loss whose gradient is J^T u (u held constant).
        pseudo = tf.reduce_sum(tf.stop_gradient(column) * joined_outputs, axis=1)
        draws.append((weight, pseudo))
    return draws


def _rows_in(block: _Block, inputs: tf.Tensor, dtype) -> tf.Tensor:
    """``(b, t, rows)``: the layer's input (patches) per position, with a bias column."""
    from tf_influence.engine.factored import Use, _inputs_for

    found = _inputs_for(Use(block.entry, inputs, inputs))
    size = tf.shape(found)[0]
    rows = tf.reshape(tf.cast(found, dtype), [size, -1, block.fan_in])
    if block.bias:
        rows = tf.concat([rows, tf.ones_like(rows[:, :, :1])], axis=2)
    return rows


def _rows_out(block: _Block, delta: tf.Tensor, dtype) -> tf.Tensor:
    size = tf.shape(delta)[0]
    return tf.reshape(tf.cast(delta, dtype), [size, -1, block.cols])


class _Steps:
    """The compiled per-batch steps of the factor and correction passes."""

    def __init__(self, solver: KFAC, objective, blocks: list[_Block], diagonal: list[int]):
        from tf_influence.engine.compile import SpecFunction
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
        self.factors = SpecFunction(self._factors, relaxed=(0, 1))
        self.corrections = SpecFunction(self._corrections, relaxed=(0, 1))

    def _forward(self, x, y, seed, with_diagonal):
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
            draws = _output_draws(self.solver, self.objective, outputs, y, seed)
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

    def _factors(self, x, y, seed):
        """Batch sums of ``A`` (position means), ``S`` (position sums) and the diagonals."""
        records, results = self._forward(x, y, seed, with_diagonal=True)
        dtype = self.dtype
        a_sums, s_sums = [], []
        for block, calls in zip(
            self.blocks, self._by_block(records, [None] * len(records)), strict=True
        ):
            rows = [_rows_in(block, inputs, dtype) for inputs, _ in calls]
            a_sum = tf.zeros([block.rows, block.rows], tf.float64)
            for r in rows:
                a_sum += tf.cast(tf.einsum("bti,btj->ij", r, r), tf.float64)
            # A averages over positions (and calls) within an example.
            positions = tf.add_n([tf.shape(r)[1] for r in rows]) if rows else 1
            a_sums.append(a_sum / tf.cast(positions, tf.float64))
            s_sums.append(tf.zeros([block.cols, block.cols], tf.float64))
        diagonal_sums = [
            tf.zeros([int(np.prod(self.objective.layout.shapes[i]))], tf.float64)
            for i in self.diagonal
        ]
        for weight, deltas, per_example in results:
            for index, (block, calls) in enumerate(
                zip(self.blocks, self._by_block(records, deltas), strict=True)
            ):
                for _, delta in calls:
                    rows = _rows_out(block, delta, dtype)
                    s_sums[index] += weight * tf.cast(
                        tf.einsum("bto,btp->op", rows, rows), tf.float64
                    )
            for index, grads in enumerate(per_example):
                diagonal_sums[index] += weight * tf.reduce_sum(tf.square(grads), axis=0)
        return a_sums, s_sums, diagonal_sums

    def _corrections(self, x, y, seed, qa, qs):
        """Batch sums of the squared gradients in each block's Kronecker eigenbasis."""
        records, results = self._forward(x, y, seed, with_diagonal=False)
        dtype = self.dtype
        sums = [tf.zeros([b.rows, b.cols], tf.float64) for b in self.blocks]
        for weight, deltas, _ in results:
            for index, (block, calls) in enumerate(
                zip(self.blocks, self._by_block(records, deltas), strict=True)
            ):
                if not calls:
                    continue
                rows = [
                    (_rows_in(block, inputs, dtype), _rows_out(block, delta, dtype))
                    for inputs, delta in calls
                ]
                total = _rotated_squares(rows, qa[index], qs[index], block)
                sums[index] += weight * tf.cast(total, tf.float64)
        return sums


def _rotated_squares(rows, qa, qs, block: _Block) -> tf.Tensor:
    """``sum_j (Q_A^T G_j Q_S)^2`` over a batch, ``G_j = sum_t a_jt delta_jt^T`` (all calls).

    The factors are rotated first (``Q_A^T a``, ``Q_S^T delta``), then multiplied into
    the rotated per-example gradient of this layer alone. One vector per example (a
    Dense layer) needs no gradient at all. (Forming the per-example gradient first
    and rotating it needs fewer multiplications for a convolution with many
    positions, but measured slower on CPU.)
    """
    if len(rows) == 1 and rows[0][0].shape[1] == 1:
        # (a~ d~^T)^2 = a~^2 d~^2^T, summed over examples.
        a = tf.matmul(rows[0][0][:, 0], qa)
        d = tf.matmul(rows[0][1][:, 0], qs)
        return tf.matmul(tf.square(a), tf.square(d), transpose_a=True)
    grads = tf.add_n(
        [
            tf.matmul(
                tf.reshape(tf.matmul(tf.reshape(a, [-1, block.rows]), qa), tf.shape(a)),
                tf.reshape(tf.matmul(tf.reshape(d, [-1, block.cols]), qs), tf.shape(d)),
                transpose_a=True,
            )
            for a, d in rows
        ]
    )  # (b, rows, cols)
    return tf.reduce_sum(tf.square(grads), axis=0)


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
            f"{type(solver).__name__} approximates the curvature of Dense and Conv2D layers, "
            f"and the analysed parameters of model {objective.model.name!r} hold none. "
            "Received: variables "
            f"{[v.path if hasattr(v, 'path') else v.name for v in objective.variables][:8]}. "
            'Use solver="cg" or solver="arnoldi" for this model.'
        )
    data = operator.data
    batch_size = solver.batch_size or data.batch_size
    num_batches = data.num_batches(batch_size)
    steps = _Steps(solver, objective, blocks, diagonal)
    passes = 2 if solver.corrected else 1
    bar = progress(num_batches * passes, f"{type(solver).__name__} factors")
    a_sums = [tf.zeros([b.rows, b.rows], tf.float64) for b in blocks]
    s_sums = [tf.zeros([b.cols, b.cols], tf.float64) for b in blocks]
    d_sums = [tf.zeros([objective.layout.sizes[i]], tf.float64) for i in diagonal]
    step = 0
    for number, batch in enumerate(data.batches(batch_size)):
        seed = tf.constant([solver.seed, 2 * number], tf.int64)
        a, s, d = steps.factors(batch[0], batch[1], seed)
        a_sums = [t + u for t, u in zip(a_sums, a, strict=True)]
        s_sums = [t + u for t, u in zip(s_sums, s, strict=True)]
        d_sums = [t + u for t, u in zip(d_sums, d, strict=True)]
        step += 1
        bar.update(step)
    n = float(operator.num_examples)
    qa, qs, values = [], [], []
    for a_sum, s_sum in zip(a_sums, s_sums, strict=True):
        la, va = tf.linalg.eigh(a_sum / n)
        ls, vs = tf.linalg.eigh(s_sum / n)
        qa.append(va)
        qs.append(vs)
        values.append(tf.maximum(la, 0.0)[:, None] * tf.maximum(ls, 0.0)[None, :])
    diagonals = [d / n for d in d_sums]
    if solver.corrected:
        compute = objective.dtype
        qa_c = [tf.cast(q, compute) for q in qa]
        qs_c = [tf.cast(q, compute) for q in qs]
        sums = [tf.zeros_like(v) for v in values]
        for number, batch in enumerate(data.batches(batch_size)):
            seed = tf.constant([solver.seed, 2 * number + 1], tf.int64)
            found = steps.corrections(batch[0], batch[1], seed, qa_c, qs_c)
            sums = [t + u for t, u in zip(sums, found, strict=True)]
            step += 1
            bar.update(step)
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
        [tf.cast(t, stored) for t in tensors] for tensors in (qa, qs, values, diagonals)
    )
    return KroneckerState(blocks, diagonal, qa, qs, values, diagonals)


def _projected(regular: list[tf.Tensor], block: _Block, qa, qs) -> tf.Tensor:
    """The diagonal of ``Q^T D Q`` for the block's part ``D`` of the regulariser diagonal."""
    kernel = tf.reshape(regular[block.entry.kernel], [block.fan_in, block.cols])
    if block.bias:
        kernel = tf.concat([kernel, tf.reshape(regular[block.entry.bias], [1, block.cols])], 0)
    return tf.matmul(tf.matmul(tf.square(qa), kernel, transpose_a=True), tf.square(qs))


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
        shapes = [(block.rows, block.rows), (block.cols, block.cols), (block.rows, block.cols)]
        if any(f is None or tuple(f.shape) != s for f, s in zip(found, shapes, strict=True)):
            problems.append(f"layer {block.entry.layer.name!r} has other shapes")
            break
        qa.append(tf.constant(found[0], dtype))
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
        qa_c, qs_c = tf.cast(qa, dtype), tf.cast(qs, dtype)
        inverse = tf.cast(1.0 / (values + damping), dtype)
        kernel = tf.reshape(parts[block.entry.kernel], [block.fan_in, block.cols, -1])
        if block.bias:
            kernel = tf.concat([kernel, parts[block.entry.bias][None]], axis=0)
        matrices = tf.transpose(kernel, [2, 0, 1])  # (k, rows, cols)
        rotated = tf.matmul(tf.matmul(qa_c, matrices, transpose_a=True), qs_c)
        solved = tf.matmul(tf.matmul(qa_c, rotated * inverse), qs_c, transpose_b=True)
        solved = tf.transpose(solved, [1, 2, 0])  # (rows, cols, k)
        out[block.entry.kernel] = tf.reshape(solved[: block.fan_in], [-1, tf.shape(rhs)[1]])
        if block.bias:
            out[block.entry.bias] = solved[block.fan_in]
    for index, diagonal in zip(state.diagonal, state.diagonals, strict=True):
        out[index] = parts[index] / tf.cast(diagonal + damping, dtype)[:, None]
    return tf.concat(out, axis=0)


def compress(
    operator, blocks: list[_Block], ranks: list[int | None], solutions: tf.Tensor
) -> tuple[tf.Tensor, list[LowRankQueries]]:
    """Each block's part of ``(p, k)`` solutions truncated to its rank (None: kept).

    Returns the truncated solutions and, per truncated block, its ``LowRankQueries``
    (``left @ right^T`` is the block's part of the truncated solutions).
    """
    layout = operator.objective.layout
    k = tf.shape(solutions)[1]
    parts = list(tf.split(solutions, layout.sizes, axis=0))
    queries = []
    for block, rank in zip(blocks, ranks, strict=True):
        if rank is None:
            continue
        kernel = tf.reshape(parts[block.entry.kernel], [block.fan_in, block.cols, k])
        if block.bias:
            kernel = tf.concat([kernel, parts[block.entry.bias][None]], axis=0)
        left, right = truncated(tf.transpose(kernel, [2, 0, 1]), rank)
        queries.append(LowRankQueries(block.entry.kernel, block.entry.bias, left, right))
        product = tf.transpose(tf.matmul(left, right, transpose_b=True), [1, 2, 0])
        parts[block.entry.kernel] = tf.reshape(product[: block.fan_in], [-1, k])
        if block.bias:
            parts[block.entry.bias] = product[block.fan_in]
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
