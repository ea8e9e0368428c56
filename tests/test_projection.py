"""Random projections of per-example gradients, against dense matrices built here.

The reference is always the dense ``(p, dim)`` matrix ``P`` assembled in numpy
(the Kronecker products of each layer's factors with ``np.kron``, the dense JL
block from its generator) times per-example gradients taken one example at a
time with a tape.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tape_gradients

import tf_influence as tfi
from tf_influence.engine.projection import (
    JL_BLOCK_ROWS,
    GradientProjection,
    jl_matrix,
    kind_of_dense,
    split_dimensions,
)


def conv_model():
    """Conv1D (positions), LayerNormalization (not a matrix layer), Dense on a sequence,
    and an EinsumDense: every Kronecker kind besides Conv2D, plus a dense JL part."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 3), dtype="float64"),
            keras.layers.Conv1D(4, 2, activation="tanh", dtype="float64"),
            keras.layers.LayerNormalization(dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c", dtype="float64"),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def image_model():
    """Conv2D strided with "same" padding and a bias, Conv2D dilated without one, and a
    causal dilated Conv1D: the convolutions whose inputs are projected by convolving."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((7, 7, 2), dtype="float64"),
            keras.layers.Conv2D(
                4, 3, strides=2, padding="same", activation="tanh", dtype="float64"
            ),
            keras.layers.Conv2D(3, 2, dilation_rate=2, use_bias=False, dtype="float64"),
            keras.layers.Reshape((4, 3), dtype="float64"),
            keras.layers.Conv1D(3, 2, padding="causal", dilation_rate=2, dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def wide_mlp():
    """1,083 parameters: the dense JL part spans three generated blocks of 512 rows."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(40, activation="tanh", dtype="float64"),
            keras.layers.Dense(20, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def dense_matrix(projection):
    """The ``(p, dim)`` matrix: ``kron(P_in, P_out)`` per layer, the JL matrix for the rest."""
    layout = projection.objective.layout
    offsets = np.concatenate([[0], np.cumsum(layout.sizes)])
    matrix = np.zeros((layout.num_params, projection.dim))
    for u, unit in enumerate(projection.units):
        p_in, p_out = projection.factors(u)
        p_in = np.eye(unit.rows) if p_in is None else p_in.numpy()
        p_out = np.eye(unit.cols) if p_out is None else p_out.numpy()
        fan_in = unit.rows - (unit.bias is not None)
        # Row r * cols + c of the layer's [kernel; bias] matrix, in the flat layout.
        rows = [
            offsets[unit.kernel] + r * unit.cols + c
            for r in range(fan_in)
            for c in range(unit.cols)
        ]
        if unit.bias is not None:
            rows += [offsets[unit.bias] + c for c in range(unit.cols)]
        matrix[rows, unit.offset : unit.offset + unit.dim] = np.kron(p_in, p_out)
    if projection.rest:
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in projection.rest])
        if projection.rest_dim == projection.rest_size:
            block = np.eye(projection.rest_size)
        else:
            kind = kind_of_dense(projection.kind)
            block = jl_matrix(
                kind, projection.seed, projection.rest_size, projection.rest_dim, tf.float64
            )
            block = block.numpy()
        matrix[np.ix_(rows, np.arange(projection.rest_offset, projection.dim))] = block
    return matrix


def data(shape, n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)), rng.integers(0, 3, n)


def check_against_dense(projection, x, y):
    objective = projection.objective
    matrix = dense_matrix(projection)
    grads = tape_gradients(objective, x, y)
    expected = grads @ matrix
    np.testing.assert_allclose(projection.examples(x, y).numpy(), expected, atol=1e-12)
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(objective.num_params, 3))
    np.testing.assert_allclose(projection.project(vectors).numpy(), matrix.T @ vectors, atol=1e-12)
    coefficients = rng.normal(size=(projection.dim, 2))
    np.testing.assert_allclose(
        projection.expand(coefficients).numpy(), matrix @ coefficients, atol=1e-12
    )


def test_kronecker_projection_is_the_kronecker_product_of_each_layer():
    model = conv_model()
    objective = tfi.engine.Objective(model)
    projection = GradientProjection(objective, dim=60, kind="kronecker", seed=3)
    # Conv1D, Dense (on the sequence) and EinsumDense are projected by their factors,
    # each with its bias row; the LayerNormalization goes through the dense part.
    assert [(u.kernel, u.bias) for u in projection.units] == [(0, 1), (4, 5), (6, 7)]
    assert projection.rest == [2, 3] and 0 < projection.rest_dim < projection.rest_size
    assert all(u.k_in < u.rows and u.k_out <= u.cols for u in projection.units)
    assert projection.dim <= 60
    x, y = data((6, 3))
    check_against_dense(projection, x, y)
    assert projection.gradients.factored is not None  # the layers' factors were used


def test_convolutions_are_projected_without_their_patches():
    """A convolution's ``P_in^T a_t`` is the layer's convolution with ``P_in`` as its
    kernel: equal to the patches times ``P_in`` (the dense Kronecker product), and the
    traced index pass extracts no patches (which cost more than the forward pass)."""
    objective = tfi.engine.Objective(image_model())
    projection = GradientProjection(objective, dim=40, kind="kronecker", seed=4)
    assert [(u.kernel, u.bias) for u in projection.units] == [(0, 1), (2, None), (3, 4), (5, 6)]
    assert all(1 < u.k_in < u.rows for u in projection.units)
    x, y = data((7, 7, 2))
    check_against_dense(projection, x, y)
    assert projection.gradients.factored is not None
    traced = tf.function(projection.examples).get_concrete_function(tf.constant(x), y)
    graph = traced.graph.as_graph_def()
    ops = {node.op for node in graph.node}
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    assert "Conv2D" in ops and "ExtractImagePatches" not in ops


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("materialize_limit", [0, 2**26], ids=["generated", "kept"])
def test_dense_projection_is_the_materialised_matrix(kind, materialize_limit):
    model = wide_mlp()
    objective = tfi.engine.Objective(model)
    projection = GradientProjection(
        objective, dim=64, kind=kind, seed=7, materialize_limit=materialize_limit
    )
    assert projection.units == [] and projection.rest_size == objective.num_params == 1083
    assert projection.rest_size > 2 * JL_BLOCK_ROWS and projection.dim == 64
    x, y = data((4,))
    check_against_dense(projection, x, y)


def test_scaling_makes_dot_products_unbiased():
    """E[P P^T] = I: the diagonal of P P^T (squared row norms) averages 1.

    For a Kronecker part it is kron(|P_in rows|^2, |P_out rows|^2); for Rademacher
    every row norm is exactly 1."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((100,)), keras.layers.Dense(60, activation="tanh"), keras.layers.Dense(30)]
    )
    model.compile(loss="mse")
    objective = tfi.engine.Objective(model)
    norms = []
    for seed in range(10):
        projection = GradientProjection(objective, dim=1000, seed=seed)
        assert all(u.k_in < u.rows and u.k_out < u.cols for u in projection.units)
        for p_in, p_out in (projection.factors(u) for u in range(len(projection.units))):
            rows_in = np.sum(p_in.numpy() ** 2, axis=1)
            rows_out = np.sum(p_out.numpy() ** 2, axis=1)
            norms.append(np.kron(rows_in, rows_out))
    assert abs(np.mean(np.concatenate(norms)) - 1) < 0.03
    rademacher = jl_matrix("rademacher", 0, 1000, 64, tf.float64).numpy()
    np.testing.assert_allclose(np.sum(rademacher**2, axis=1), 1.0, rtol=1e-12)
    gaussian = jl_matrix("gaussian", 0, 4000, 64, tf.float64).numpy()
    assert abs(np.mean(np.sum(gaussian**2, axis=1)) - 1) < 0.02
    # Blocks are independent draws: no block repeats another.
    assert not np.allclose(gaussian[:JL_BLOCK_ROWS], gaussian[JL_BLOCK_ROWS : 2 * JL_BLOCK_ROWS])


@pytest.mark.parametrize("kind", ["kronecker", "gaussian"])
def test_dim_at_least_num_params_projects_nothing(kind):
    objective = tfi.engine.Objective(conv_model())
    projection = GradientProjection(objective, dim=10_000, kind=kind)
    assert projection.dim == objective.num_params
    x, y = data((6, 3))
    np.testing.assert_allclose(
        projection.examples(x, y).numpy() @ dense_matrix(projection).T,
        tape_gradients(objective, x, y),
        atol=1e-12,
    )
    np.testing.assert_array_equal(
        dense_matrix(projection) @ dense_matrix(projection).T, np.eye(objective.num_params)
    )


def test_split_follows_the_sizes_and_the_budget():
    shapes = [(65, 128), (129, 128), (129, 10)]  # the digits MLP, biases as rows
    sides, rest = split_dimensions(shapes, 0, 4096)
    sizes = [r * c for r, c in shapes]
    used = [a * b for a, b in sides]
    assert rest == 0 and sum(used) <= 4096 and sum(used) > 0.9 * 4096
    shares = np.array(used) / sum(used)
    np.testing.assert_allclose(shares, np.array(sizes) / sum(sizes), atol=0.03)
    for (rows, cols), (k_in, k_out) in zip(shapes, sides, strict=True):
        assert abs(k_in / rows - k_out / cols) < 0.15  # both sides compressed alike
    assert split_dimensions(shapes, 100, 10**6) == (shapes, 100)
    sides, rest = split_dimensions([(11, 1)], 50, 30)  # one output column: k_out = 1
    assert sides[0][1] == 1 and sides[0][0] * 1 + rest <= 30 and rest >= 1
