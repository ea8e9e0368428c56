"""Hessian-vector products against the dense Hessian (float64, tiny MLP)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian, make_mlp

import tf_influence as tfi
from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData


@pytest.mark.parametrize("hvp", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("batch_size, damping", [(7, 0.0), (16, 0.3), (50, 0.0)])
def test_hvp_equals_dense_hessian_times_v(mlp, blobs, batch_size, damping, hvp):
    x, y = blobs
    objective = tfi.engine.Objective(mlp)
    operator = HessianOperator(objective, ExampleData(x, y, batch_size), damping, hvp=hvp)
    reference = dense_hessian(objective, x, y) + damping * np.eye(objective.num_params)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(objective.num_params, 3))
    np.testing.assert_allclose(
        operator.matvec(vectors).numpy(), reference @ vectors, rtol=1e-6, atol=1e-12
    )
    # One vector (rank 1) and the assembled dense matrix agree too.
    np.testing.assert_allclose(
        operator.matvec(vectors[:, 0]).numpy(), reference @ vectors[:, 0], rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose(
        operator.dense().numpy(), 0.5 * (reference + reference.T), rtol=1e-6, atol=1e-12
    )


def test_hessian_of_logistic_regression_matches_closed_form():
    """Binary logistic regression: H = X^T diag(p(1-p)) X / n + 2*l2*I (on the kernel)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3))
    y = (rng.random(40) > 0.5).astype("float64")
    l2 = 0.05
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(
                1, use_bias=False, dtype="float64", kernel_regularizer=keras.regularizers.L2(l2)
            ),
        ]
    )
    model.layers[0].kernel.assign(rng.normal(size=(3, 1)))
    objective = tfi.engine.Objective(model, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.0)
    w = model.layers[0].kernel.numpy()[:, 0]
    p = 1 / (1 + np.exp(-x @ w))
    # Keras >= 3.14 rounds the factor to float32 first; read back what this Keras does.
    l2_as_keras_stores_it = float(keras.regularizers.L2(l2)(tf.ones((1, 1), tf.float64)))
    closed_form = (x.T * (p * (1 - p))) @ x / len(x) + 2 * l2_as_keras_stores_it * np.eye(3)
    np.testing.assert_allclose(operator.dense().numpy(), closed_form, rtol=1e-10)


def test_batch_matvec_is_unbiased_estimate_on_one_batch(mlp, blobs):
    """On a batch that is the whole data, the stochastic product equals the full one."""
    x, y = blobs
    objective = tfi.engine.Objective(mlp)
    operator = HessianOperator(objective, ExampleData(x, y, 50), 0.2)
    vectors = np.random.default_rng(2).normal(size=(objective.num_params, 2))
    full = operator.matvec(vectors).numpy()
    single = operator.batch_matvec(tf.constant(vectors), (tf.constant(x), tf.constant(y))).numpy()
    np.testing.assert_allclose(single, full, rtol=1e-10)


def test_matvec_does_not_retrace(mlp, blobs):
    x, y = blobs
    objective = tfi.engine.Objective(mlp)
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.0)
    rng = np.random.default_rng(0)
    operator.matvec(rng.normal(size=(objective.num_params, 2)))
    operator.matvec(rng.normal(size=(objective.num_params, 2)))
    assert operator._matvec.experimental_get_tracing_count() == 1
    operator.matvec(rng.normal(size=(objective.num_params, 5)))  # traced per column count
    operator.matvec(rng.normal(size=(objective.num_params, 5)))
    assert operator._matvec.experimental_get_tracing_count() == 2


def test_float32_model_hvp_close_to_float64_reference(blobs):
    x, y = blobs
    model32 = make_mlp(dtype="float32")
    model64 = make_mlp(dtype="float64")
    for a, b in zip(model32.weights, model64.weights, strict=True):
        b.assign(a.numpy().astype("float64"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    op32 = HessianOperator(
        tfi.engine.Objective(model32, loss), ExampleData(x.astype("float32"), y, 16)
    )
    op64 = HessianOperator(tfi.engine.Objective(model64, loss), ExampleData(x, y, 16))
    assert op32.dtype == tf.float32
    np.testing.assert_allclose(op32.dense().numpy(), op64.dense().numpy(), atol=1e-5)


def test_xla_compiled_hvp_matches(mlp, blobs):
    x, y = blobs
    objective = tfi.engine.Objective(mlp)
    plain = HessianOperator(objective, ExampleData(x, y, 16), 0.1)
    xla = HessianOperator(objective, ExampleData(x, y, 16), 0.1, jit_compile=True)
    vectors = np.random.default_rng(3).normal(size=(objective.num_params, 2))
    np.testing.assert_allclose(
        xla.matvec(vectors).numpy(), plain.matvec(vectors).numpy(), rtol=1e-9
    )


def test_subsampled_operator_is_the_hessian_of_the_subset(mlp, blobs):
    x, y = blobs
    objective = tfi.engine.Objective(mlp)
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.1)
    sub = operator.subsample(20, seed=4)
    assert sub.num_examples == 20 and sub is operator.subsample(20, seed=4)
    # Which 20? Find them, and compare with the dense Hessian on exactly those rows.
    chosen = sub.data._tensors[0].numpy()
    rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in chosen]
    assert len(set(rows)) == 20
    reference = dense_hessian(objective, x[rows], y[rows]) + 0.1 * np.eye(objective.num_params)
    np.testing.assert_allclose(sub.dense().numpy(), reference, rtol=1e-6, atol=1e-12)


def test_hvp_mode_is_checked(mlp, blobs):
    x, y = blobs
    with pytest.raises(
        ValueError, match=r"`hvp` must be \"auto\" or one of .* Received: hvp='fast'"
    ):
        HessianOperator(tfi.engine.Objective(mlp), ExampleData(x, y, 16), hvp="fast")


class WithUnusedLayer(keras.Model):
    """A regularised tanh layer and a layer the loss never reaches (no gradient)."""

    def __init__(self):
        super().__init__()
        reg = keras.regularizers.L2(0.01)
        self.hidden = keras.layers.Dense(
            5, activation="tanh", kernel_regularizer=reg, dtype="float64"
        )
        self.unused = keras.layers.Dense(2, kernel_regularizer=reg, dtype="float64")
        self.logits = keras.layers.Dense(3, dtype="float64")
        self.unused.build((None, 1))

    def call(self, x):
        return self.logits(self.hidden(x))


@pytest.mark.parametrize("hvp", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("source", ["arrays", "tf.data"])
def test_hvp_per_variable_accumulation_equals_dense(blobs, hvp, source):
    """Products summed per variable over batches, Omega on the last batch, equal the dense H.

    Covers a variable without gradient from the loss (but with one from Omega), one
    column given as a (p, 1) matrix, several columns, XLA, and a tf.data input (whose
    batches are not folded with a separate last batch).
    """
    x, y = blobs
    keras.utils.set_random_seed(0)
    model = WithUnusedLayer()
    model(x[:1])
    objective = tfi.engine.Objective(
        model, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    if source == "arrays":
        data = ExampleData(x, y, 16)
        assert data.folds_last_separately
    else:
        data = ExampleData(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
        assert not data.folds_last_separately
    reference = dense_hessian(objective, x, y) + 0.1 * np.eye(objective.num_params)
    unused = objective.num_params - 5 * 4 - 5 - 5 * 3 - 3
    assert unused == 4  # kernel (1, 2) and bias (2,): only the kernel is regularised
    vectors = np.random.default_rng(4).normal(size=(objective.num_params, 3))
    for jit_compile in (False, True):
        operator = HessianOperator(objective, data, 0.1, hvp=hvp, jit_compile=jit_compile)
        np.testing.assert_allclose(
            operator.matvec(vectors).numpy(), reference @ vectors, rtol=1e-7, atol=1e-12
        )
        np.testing.assert_allclose(
            operator.matvec(vectors[:, :1]).numpy(),
            reference @ vectors[:, :1],
            rtol=1e-7,
            atol=1e-12,
        )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_regularizer_products_closed_form_and_by_tapes_equal_the_dense_hessian(blobs, dtype):
    """L1L2 / L1 / L2 products are taken in closed form, any other regularizer by tapes."""
    from tf_influence.engine.curvature import regularizer_curvatures

    x, y = blobs
    keras.utils.set_random_seed(0)

    def quartic(w):
        return 0.03 * tf.reduce_sum(w**4)

    layers = [
        keras.Input((4,), dtype=dtype),
        keras.layers.Dense(
            5, "tanh", dtype=dtype, kernel_regularizer=keras.regularizers.L1L2(0.02, 0.07)
        ),
        keras.layers.Dense(
            4,
            "tanh",
            dtype=dtype,
            kernel_regularizer=keras.regularizers.L1(0.05),
            bias_regularizer=keras.regularizers.L2(0.3),
        ),
        keras.layers.Dense(3, dtype=dtype, kernel_regularizer=keras.regularizers.L2(1e-3)),
    ]
    model = keras.Sequential(layers)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    objective = tfi.engine.Objective(model, loss=loss)
    scales = regularizer_curvatures(objective)
    assert scales is not None and scales[2] == 0.0 and scales[1] == 0.0  # L1, no bias reg.
    reference = dense_hessian(objective, x, y)
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.0)
    rtol = 1e-6 if dtype == "float64" else 1e-3
    np.testing.assert_allclose(operator.dense().numpy(), reference, rtol=rtol, atol=rtol * 1e-3)

    # A regularizer of its own: no closed form, its product goes through tapes.
    model.layers[2].kernel.regularizer = quartic
    objective = tfi.engine.Objective(model, loss=loss)
    assert regularizer_curvatures(objective) is None
    reference = dense_hessian(objective, x, y)
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.0)
    np.testing.assert_allclose(operator.dense().numpy(), reference, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_broadcast_matmul_conversion_equals_a_loop_and_is_removed_after(transpose_a, transpose_b):
    """pfor's MatMul with only ``b`` varying, as the block products trace it: per-slice values."""
    from tensorflow.python.ops.parallel_for import pfor as pfor_lib

    from tf_influence.engine import vectorize

    original = pfor_lib._pfor_converter_registry["MatMul"]
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(4, 3)))  # fixed
    c = tf.constant(rng.normal(size=(4, 3)))  # varies with the slice too (a_stacked path)
    b = tf.constant(rng.normal(size=(5, 4, 3)))  # varies with the slice

    def fixed_a(b_i):
        left = tf.transpose(a) if transpose_a else a
        right = b_i if transpose_b else tf.transpose(b_i)
        product = tf.matmul(left, right, transpose_a=transpose_a, transpose_b=transpose_b)
        # And one product with both factors varying, which keeps TensorFlow's converter.
        return product, tf.matmul(b_i, b_i * c, transpose_b=True)

    mapped = tf.function(lambda b: vectorize.vectorized_map(fixed_a, b, broadcast_matmul=True))
    products, both = mapped(b)
    for i in range(5):
        expected, expected_both = fixed_a(b[i])
        np.testing.assert_allclose(products[i].numpy(), expected.numpy(), rtol=1e-12)
        np.testing.assert_allclose(both[i].numpy(), expected_both.numpy(), rtol=1e-12)

    # The fixed-a product alone: a broadcast batched product, where TensorFlow's own
    # converter multiplies once between transposes.
    def types(broadcast):
        only = tf.function(
            lambda b: vectorize.vectorized_map(
                lambda b_i: fixed_a(b_i)[0], b, broadcast_matmul=broadcast
            )
        )
        return {op.type for op in only.get_concrete_function(b).graph.get_operations()}

    assert types(True) & {"BatchMatMulV2", "BatchMatMulV3"}
    assert not types(False) & {"BatchMatMulV2", "BatchMatMulV3"}
    assert pfor_lib._pfor_converter_registry["MatMul"] is original  # restored
