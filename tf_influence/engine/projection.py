"""Random projections of per-example gradients: ``P^T grad L(z_j)`` in ``dim`` numbers.

``P`` is a ``(p, dim)`` random matrix scaled so that ``E[P P^T] = I`` (a
Johnson-Lindenstrauss projection): dot products of projected gradients are
unbiased estimates of dot products of gradients. It is never stored whole when
``p`` is large. Two kinds of parts make it up, each acting on some variables:

* **Kronecker** (LoGra, Choe et al. 2024), for the matrix layers of
  ``engine.factored_layers`` (Dense, EinsumDense, Conv1D, Conv2D) with a chosen
  kernel: the layer's kernel and bias read as one ``(rows, cols)`` matrix (the
  kernel's ``(fan_in, cols)`` reshape, then the bias as a last row), projected by
  ``P_in^T G P_out`` with small seeded ``P_in (rows, k_in)`` and ``P_out (cols,
  k_out)``, entries ``N(0, 1/k_in)`` and ``N(0, 1/k_out)``. The layer's part of
  ``P`` is the Kronecker product ``P_in (x) P_out``. A training example's
  gradient there is ``sum_t a_t delta_t^T`` (input rows with a 1 for the bias,
  output gradients, over positions ``t``), so its projection is ``sum_t (P_in^T
  a_t) (P_out^T delta_t)^T``, taken from the factors of one batched forward and
  backward pass: no per-example gradient of the layer is formed. A convolution's
  ``P_in^T a_t`` (``a_t`` its input patches) is the layer's convolution with
  ``P_in`` as its kernel: the patches are not formed either.
* **Dense JL** for every other chosen variable (all of them with
  ``kind="gaussian"`` or ``"rademacher"``): their gradients, concatenated, times a
  ``(p_rest, dim_rest)`` matrix of ``N(0, 1/dim_rest)`` (or ``+-1/sqrt(dim_rest)``)
  entries, generated from the seed in blocks of ``JL_BLOCK_ROWS`` rows inside the
  graph (block ``i`` from the stateless seed ``(seed, JL_STREAM + i)``,
  ``engine.jl``), so only one block is held at a time. Below ``materialize_limit``
  values it is generated once and kept (the same values).

How ``dim`` is split (``kind="kronecker"``): each part gets a share in proportion to
its size, ``dim * size / p``; a layer's share ``s`` becomes ``k_out = round(sqrt(s *
cols / rows))`` (so both sides are compressed alike, ``k_out / cols ~= k_in / rows``)
and ``k_in = floor(s / k_out)``, each between 1 and its side; the dense part takes
what is left of ``dim``. A side whose ``k`` equals its size is not projected (the
identity), and with ``dim >= p`` nothing is: ``P = I``, the index holds the
gradients themselves. The index then has ``dim_total <= dim`` coordinates (fewer by
rounding; more only if many layers need the minimum of 1 per side).

References:
    Johnson & Lindenstrauss, "Extensions of Lipschitz mappings into a Hilbert
    space", 1984. Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing Model
    Behavior at Scale", ICML 2023. Choe et al., "What is Your Data Worth to GPT?
    LLM-Scale Data Valuation with Influence Functions" (LoGra), arXiv 2405.13954, 2024.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_influence.engine import jl
from tf_influence.engine.compile import BatchFunction
from tf_influence.engine.factored import MATRIX_KINDS, FactoredUnavailable, find_layers
from tf_influence.engine.factored_layers import input_rows, output_rows, projected_input_rows
from tf_influence.engine.gradients import PerExampleGradients
from tf_influence.engine.jl import JL_BLOCK_ROWS, JL_STREAM, jl_block, jl_matrix

__all__ = [
    "JL_BLOCK_ROWS",
    "JL_STREAM",
    "KINDS",
    "GradientProjection",
    "KroneckerUnit",
    "ProjectionWeights",
    "check_kind",
    "jl_block",
    "jl_matrix",
    "kind_of_dense",
    "split_dimensions",
]
from tf_influence.engine.objective import Objective

KINDS = ("kronecker", "gaussian", "rademacher")
# The dense JL matrix is generated once and kept when it has at most this many values
# (256 MiB in float32); larger ones are generated block by block at every use.
MATERIALIZE_LIMIT = 2**26
# When the dense part is generated at each use, the index is built in passes of up
# to MAX_PASS_ROWS examples whose per-example gradients hold at most this many values
# (64 MiB in float32): the generation is paid once per pass, not once per batch.
GENERATED_PASS_VALUES = 2**24
MAX_PASS_ROWS = 4096


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(
            f"Argument `projection` must be one of {list(KINDS)}. Received: "
            f"projection={kind!r}. Use 'kronecker' (per-layer factors, the cheapest) or "
            "'gaussian' / 'rademacher' (one dense random projection of all parameters)."
        )
    return kind


@dataclasses.dataclass(frozen=True)
class KroneckerUnit:
    """A matrix layer projected by ``P_in (x) P_out``.

    Attributes:
        kernel: index of the kernel among the objective's variables.
        bias: index of its bias, or None (then ``rows = fan_in``).
        rows: ``fan_in`` (+ 1 with a bias).
        cols: output units or channels.
        k_in: projected rows (``rows``: not projected).
        k_out: projected columns (``cols``: not projected).
        offset: where the unit's ``k_in * k_out`` coordinates start.
    """

    kernel: int
    bias: int | None
    rows: int
    cols: int
    k_in: int
    k_out: int
    offset: int

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out


def split_dimensions(
    shapes: list[tuple[int, int]], rest: int, dim: int
) -> tuple[list[tuple[int, int]], int]:
    """``([(k_in, k_out) per layer], dim of the dense part)`` for a budget of ``dim``.

    See the module docstring. With ``dim >= p`` every part keeps its full size.
    """
    total = sum(r * c for r, c in shapes) + rest
    if dim >= total:
        return list(shapes), rest
    fraction = dim / total
    sides = []
    for rows, cols in shapes:
        share = fraction * rows * cols
        k_out = min(cols, max(1, round(math.sqrt(share * cols / rows))))
        k_in = min(rows, max(1, math.floor(share / k_out)))
        sides.append((k_in, k_out))
    used = sum(a * b for a, b in sides)
    rest_dim = min(rest, max(1, dim - used)) if rest else 0
    return sides, rest_dim


class GradientProjection:
    """``P^T`` for the gradients of ``objective``'s variables (see the module docstring).

    Args:
        objective: the per-example loss and the parameters.
        dim: the budget of coordinates (a positive integer).
        kind: ``"kronecker"``, ``"gaussian"`` or ``"rademacher"``.
        seed: the integer every random matrix is drawn from.
        materialize_limit: keep the dense JL matrix when it has at most this many
            values (else generate it block by block at each use); None:
            ``MATERIALIZE_LIMIT``.

    Attributes:
        dim: the number of coordinates (``<= dim`` asked for, see the module docstring).
        units: the ``KroneckerUnit`` of each projected matrix layer, in order.
        rest: indices of the variables in the dense part, in order.
        rest_size: their total size ``p_rest``; ``rest_dim``: its coordinates (last).
        weights: the ``ProjectionWeights`` layer holding the stored matrices.
    """

    def __init__(
        self,
        objective: Objective,
        dim: int,
        kind: str = "kronecker",
        seed: int = 0,
        materialize_limit: int | None = None,
    ):
        self.objective = objective
        self.kind = check_kind(kind)
        self.seed = int(seed)
        self.dtype = objective.dtype
        self.gradients = PerExampleGradients(objective)
        layout = objective.layout
        entries = []
        if kind == "kronecker":
            entries = [
                e for e in find_layers(objective) if e.kind in MATRIX_KINDS and e.kernel is not None
            ]
        shapes = []
        for entry in entries:
            fan_in = layout.sizes[entry.kernel] // _columns(layout.shapes[entry.kernel], entry)
            cols = layout.sizes[entry.kernel] // fan_in
            shapes.append((fan_in + (entry.bias is not None), cols))
        covered = {i for e in entries for i in (e.kernel, e.bias) if i is not None}
        self.rest = [i for i in range(len(objective.variables)) if i not in covered]
        self.rest_size = sum(layout.sizes[i] for i in self.rest)
        sides, self.rest_dim = split_dimensions(shapes, self.rest_size, int(dim))
        self.units: list[KroneckerUnit] = []
        offset = 0
        for entry, (rows, cols), (k_in, k_out) in zip(entries, shapes, sides, strict=True):
            self.units.append(
                KroneckerUnit(entry.kernel, entry.bias, rows, cols, k_in, k_out, offset)
            )
            offset += k_in * k_out
        self.rest_offset = offset
        self.dim = offset + self.rest_dim
        self._entries = {e.kernel: e for e in entries}
        factors = [self._unit_factors(u, i) for i, u in enumerate(self.units)]
        dense = None
        limit = MATERIALIZE_LIMIT if materialize_limit is None else materialize_limit
        if 0 < self.rest_dim < self.rest_size and self.rest_size * self.rest_dim <= limit:
            dense = jl_matrix(kind_of_dense(kind), seed, self.rest_size, self.rest_dim, self.dtype)
        # Held as variables of one layer: a SavedModel of a graph that reads them
        # (``export``) tracks the layer and stores them as weights, not as constants.
        self.weights = ProjectionWeights(factors, dense)
        self._factors, self._dense = self.weights.factors, self.weights.dense
        self._examples = BatchFunction(self._examples_impl)
        self._factored: bool | None = None

    @property
    def rows_per_pass(self) -> int | None:
        """Examples per call of ``examples`` that amortise generating the dense part.

        None when nothing is generated per call (no dense part, or a kept one).
        Otherwise as many as keep the dense part's per-example gradients within
        ``GENERATED_PASS_VALUES`` values.
        """
        if self._dense is not None or self.rest_dim in (0, self.rest_size):
            return None
        return max(1, min(MAX_PASS_ROWS, GENERATED_PASS_VALUES // self.rest_size))

    @property
    def key(self) -> tuple:
        """What the projection's values depend on (its fingerprint with the layout)."""
        layout = self.objective.layout
        return ("projection", self.kind, self.seed, self.dim, tuple(layout.shapes))

    def factors(self, unit: int) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """``(P_in (rows, k_in), P_out (cols, k_out))`` of a unit; None for a side not projected."""
        return self._factors[unit]

    def _unit_factors(self, unit: KroneckerUnit, index: int):
        def draw(side, k, stream):
            if k == side:
                return None
            key = tf.constant([self.seed, stream], tf.int64)
            values = tf.random.stateless_normal([side, k], key, dtype=self.dtype)
            return values / tf.cast(math.sqrt(k), self.dtype)

        return draw(unit.rows, unit.k_in, 2 * index), draw(unit.cols, unit.k_out, 2 * index + 1)

    # -- flat vectors ---------------------------------------------------------------------
    def project(self, vectors: tf.Tensor) -> tf.Tensor:
        """``P^T vectors``: ``(p, k)`` gradients to ``(dim, k)`` coordinates. Traceable."""
        vectors = tf.convert_to_tensor(vectors, self.dtype)
        k = tf.shape(vectors)[1]
        blocks = tf.split(vectors, self.objective.layout.sizes, axis=0)
        parts = []
        for unit, (p_in, p_out) in zip(self.units, self._factors, strict=True):
            matrix = tf.reshape(blocks[unit.kernel], [-1, unit.cols, k])
            if unit.bias is not None:
                matrix = tf.concat([matrix, tf.reshape(blocks[unit.bias], [1, unit.cols, k])], 0)
            if p_in is not None:
                matrix = tf.einsum("rck,ri->ick", matrix, p_in)
            if p_out is not None:
                matrix = tf.einsum("ick,cl->ilk", matrix, p_out)
            parts.append(tf.reshape(matrix, [unit.dim, k]))
        if self.rest:
            rest = tf.concat([blocks[i] for i in self.rest], axis=0)
            parts.append(tf.transpose(self._project_rest(tf.transpose(rest))))
        return tf.concat(parts, axis=0)

    def expand(self, coefficients: tf.Tensor) -> tf.Tensor:
        """``P coefficients``: ``(dim, k)`` coordinates to ``(p, k)``. Traceable."""
        coefficients = tf.convert_to_tensor(coefficients, self.dtype)
        k = tf.shape(coefficients)[1]
        layout = self.objective.layout
        out: dict[int, tf.Tensor] = {}
        for unit, (p_in, p_out) in zip(self.units, self._factors, strict=True):
            part = coefficients[unit.offset : unit.offset + unit.dim]
            matrix = tf.reshape(part, [unit.k_in, unit.k_out, k])
            if p_out is not None:
                matrix = tf.einsum("ilk,cl->ick", matrix, p_out)
            if p_in is not None:
                matrix = tf.einsum("ick,ri->rck", matrix, p_in)
            fan_in = unit.rows - (unit.bias is not None)
            out[unit.kernel] = tf.reshape(matrix[:fan_in], [-1, k])
            if unit.bias is not None:
                out[unit.bias] = matrix[fan_in]
        if self.rest:
            rest = self._expand_rest(coefficients[self.rest_offset :])
            sizes = [layout.sizes[i] for i in self.rest]
            out.update(zip(self.rest, tf.split(rest, sizes, axis=0), strict=True))
        return tf.concat([out[i] for i in range(len(layout.sizes))], axis=0)

    # -- the dense part -------------------------------------------------------------------
    def _project_rest(self, rows: tf.Tensor) -> tf.Tensor:
        """``(b, p_rest) -> (b, rest_dim)``: rows times the dense JL matrix."""
        if self.rest_dim == self.rest_size:
            return rows
        if self._dense is not None:
            return tf.matmul(rows, self._dense)
        kind = kind_of_dense(self.kind)
        return jl.project_rows(rows, kind, self.seed, self.rest_dim, self.rest_size)

    def _expand_rest(self, coefficients: tf.Tensor) -> tf.Tensor:
        """``(rest_dim, k) -> (p_rest, k)``: the dense JL matrix times coefficients."""
        if self.rest_dim == self.rest_size:
            return coefficients
        if self._dense is not None:
            return tf.matmul(self._dense, coefficients)
        kind = kind_of_dense(self.kind)
        return jl.expand(coefficients, kind, self.seed, self.rest_size, self.rest_dim)

    # -- per-example projections ----------------------------------------------------------
    def examples(self, x: Any, y: Any) -> tf.Tensor:
        """``(b, dim)``: ``P^T grad L(z_j)`` for every example of a batch (compiled per structure).

        Kronecker units from the layers' factors (once a check on this first batch
        showed the factored gradients exact, as ``PerExampleGradients`` does), the rest
        from per-example gradients; without factors, all from per-example gradients.
        """
        if self._factored is None:
            self._factored = self.gradients.check_factored(x, y)
        return self._examples(x, y)

    def tracing_count(self) -> int:
        """Traces of the per-example function so far (for retracing checks)."""
        return self._examples.tracing_count()

    def _examples_impl(self, x, y):
        if self._factored:
            try:
                return self._factored_examples(x, y)
            except FactoredUnavailable:
                pass  # traced again without the factors below (this trace only)
        grads = self.gradients.graph_gradients(x, y)  # (b, p)
        return tf.transpose(self.project(tf.transpose(grads)))

    def _factored_examples(self, x, y):
        factored = self.gradients.factored
        uses, losses, _ = factored.uses(x, y)
        size = tf.shape(losses)[0]
        dtype = self.dtype
        by_kernel = {u.kernel: (u, f) for u, f in zip(self.units, self._factors, strict=True)}
        projected: dict[int, tf.Tensor] = {}
        others = []
        for use in uses:
            found = by_kernel.get(use.entry.kernel)
            if found is None:
                others.append(use)
                continue
            unit, (p_in, p_out) = found
            inputs = tf.cast(use.inputs, dtype)
            if p_in is None:
                inputs = input_rows(use.entry, inputs, size)  # (b, t, fan_in)
                if unit.bias is not None:
                    inputs = tf.concat([inputs, tf.ones_like(inputs[..., :1])], axis=-1)
            else:  # (b, t, k_in), a convolution's without its patches
                p_in = tf.convert_to_tensor(p_in)
                fan_in = unit.rows - (unit.bias is not None)
                inputs = projected_input_rows(use.entry, inputs, p_in[:fan_in], size)
                if unit.bias is not None:  # the bias row meets a constant 1
                    inputs += p_in[fan_in]
            delta = tf.cast(output_rows(use.entry, use.delta, size), dtype)  # (b, t, cols)
            if p_out is not None:
                delta = tf.einsum("bto,ol->btl", delta, p_out)
            value = tf.reshape(tf.einsum("btk,btl->bkl", inputs, delta), [size, unit.dim])
            projected[unit.kernel] = projected.get(unit.kernel, 0.0) + value
        parts = [projected.get(u.kernel, tf.zeros([size, u.dim], dtype)) for u in self.units]
        if self.rest:
            grads = factored.per_example(others, size, dtype) if others else {}
            missing = [i for i in self.rest if i not in grads]
            unfactored = [i for i in missing if i in self.gradients.pfor_indices]
            if unfactored:
                found = self.gradients.per_variable_gradients(x, y, unfactored)
                grads.update(
                    {i: g for i, g in zip(unfactored, found, strict=True) if g is not None}
                )
            sizes = self.objective.layout.sizes
            rest = tf.concat(
                [
                    tf.cast(grads[i], dtype) if i in grads else tf.zeros([size, sizes[i]], dtype)
                    for i in self.rest
                ],
                axis=1,
            )
            parts.append(self._project_rest(rest))
        return tf.concat(parts, axis=1)


class ProjectionWeights(keras.layers.Layer):
    """The projection's stored matrices as non-trainable weights (see ``GradientProjection``).

    Args:
        factors: ``[(P_in or None, P_out or None)]`` per Kronecker unit.
        dense: the kept dense JL matrix, or None.
    """

    def __init__(self, factors: list, dense: tf.Tensor | None):
        super().__init__(name="projection", trainable=False)
        self.factors = [
            tuple(
                None if m is None else self._weight(f"factor_{i}_{j}", m) for j, m in enumerate(f)
            )
            for i, f in enumerate(factors)
        ]
        self.dense = None if dense is None else self._weight("dense", dense)
        self.built = True

    def _weight(self, name: str, value: tf.Tensor) -> Any:
        weight = self.add_weight(
            name=name,
            shape=tuple(value.shape),
            initializer="zeros",
            dtype=value.dtype.name,
            trainable=False,
        )
        weight.assign(value)
        return weight


def kind_of_dense(kind: str) -> str:
    """The distribution of the dense JL part: Gaussian with Kronecker units, else ``kind``."""
    return "gaussian" if kind == "kronecker" else kind


def _columns(shape: tuple[int, ...], entry) -> int:
    """A matrix kind's output columns: the kernel's output axes."""
    if entry.kind == "einsum":
        return int(np.prod(shape[entry.einsum.split :], dtype=np.int64))
    return int(shape[-1])
