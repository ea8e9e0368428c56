"""Factored per-example gradients of Dense and Conv2D layers equal pfor's, one example at a
time; models they cannot see through fall back to pfor."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def reference(objective, x, y, solutions):
    """Per-example gradients and scores by pfor alone (the reference path)."""
    plain = tfi.engine.PerExampleGradients(objective, scoring="jacobian", factored=False)
    assert plain.check_factored(x, y) is False
    grads = plain(x, y).numpy()
    return grads, -(grads @ solutions).T


def assert_factored_equal(model, x, y, num_tests=(1, 3, 40), params=None, factored=True):
    objective = tfi.engine.Objective(model, loss=LOSS, params=params)
    gradients = tfi.engine.PerExampleGradients(objective, scoring="jacobian")
    y = tf.constant(y)
    assert gradients.check_factored(x, y) is factored
    rng = np.random.default_rng(0)
    for k in num_tests:  # below and above max(fan_in, fan_out): ghost and materialised
        solutions = rng.normal(size=(objective.num_params, k))
        expected_grads, expected_scores = reference(objective, x, y, solutions)
        np.testing.assert_allclose(gradients(x, y).numpy(), expected_grads, rtol=1e-10, atol=1e-13)
        scores, finite = gradients.scores(x, y, tf.constant(solutions))
        np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-10, atol=1e-12)
        assert finite.numpy().all()
    return gradients


def test_dense_layers_both_ghost_orders():
    # 4 -> 9 (in < out) -> 6 (out <= in) -> 3
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(9, activation="tanh", dtype="float64"),
            keras.layers.Dense(6, activation="relu", dtype="float64"),
            keras.layers.Dense(3, dtype="float64", use_bias=False),
        ]
    )
    x = np.random.default_rng(1).normal(size=(11, 4))
    y = np.arange(11) % 3
    gradients = assert_factored_equal(model, x, y)
    assert gradients._pfor_indices == []


@pytest.mark.parametrize(
    "conv_args",
    [
        {"padding": "valid"},
        {"padding": "same", "strides": 2},
        {"padding": "valid", "dilation_rate": 2},
        {"padding": "same", "strides": (1, 2), "kernel_size": (2, 3)},
    ],
)
def test_conv2d_layers(conv_args):
    keras.utils.set_random_seed(0)
    args = {"kernel_size": 3, **conv_args}
    model = keras.Sequential(
        [
            keras.Input((7, 6, 2), dtype="float64"),
            keras.layers.Conv2D(3, activation="tanh", dtype="float64", **args),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 7, 6, 2))
    assert_factored_equal(model, x, np.arange(5) % 3)


def test_normalisation_scales_and_shifts():
    """BatchNormalization (inference: moving statistics) and LayerNormalization on images
    and vectors, with and without a scale or a shift: no variable is left to pfor."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 4, 2), dtype="float64")
    h = keras.layers.Conv2D(3, 3, padding="same", dtype="float64")(inputs)
    h = keras.layers.BatchNormalization(dtype="float64")(h)
    h = keras.layers.ReLU(dtype="float64")(h)
    h = keras.layers.LayerNormalization(dtype="float64", center=False)(h)
    h = keras.layers.Flatten(dtype="float64")(h)
    h = keras.layers.Dense(6, activation="tanh", dtype="float64")(h)
    h = keras.layers.BatchNormalization(dtype="float64", scale=False)(h)
    h = keras.layers.LayerNormalization(dtype="float64")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(h))
    rng = np.random.default_rng(1)
    for layer in model.layers:  # statistics and scales away from their initial values
        for name in ("moving_mean", "moving_variance", "gamma", "beta"):
            variable = getattr(layer, name, None)
            if variable is not None:
                variable.assign(rng.uniform(0.5, 1.5, size=variable.shape))
    x = rng.normal(size=(7, 5, 4, 2))
    gradients = assert_factored_equal(model, x, np.arange(7) % 3)
    assert gradients._pfor_indices == []


def test_shared_layer_and_sequence_inputs():
    """A Dense layer called twice, and a Dense on (batch, time, features) inputs."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 4), dtype="float64")
    shared = keras.layers.Dense(4, activation="tanh", dtype="float64")
    hidden = shared(shared(inputs))  # (b, 5, 4) twice through the same weights
    pooled = keras.layers.GlobalAveragePooling1D(dtype="float64")(hidden)
    outputs = keras.layers.Dense(3, dtype="float64")(pooled)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(size=(6, 5, 4))
    assert_factored_equal(model, x, np.arange(6) % 3)


def test_only_some_parameters_and_other_layers_by_pfor():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 3), dtype="float64"),
            keras.layers.Conv1DTranspose(4, 2, activation="tanh", dtype="float64"),  # pfor
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64", name="hidden"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(7, 6, 3))
    y = np.arange(7) % 3
    gradients = assert_factored_equal(model, x, y)
    assert gradients._pfor_indices == [0, 1]  # the Conv1DTranspose kernel and bias
    kernel_only = [model.get_layer("hidden").kernel, model.layers[0]]
    assert_factored_equal(model, x, y, params=kernel_only)


class TiedOutput(keras.layers.Layer):
    """Scores against the transposed kernel of a Dense layer: the kernel is read twice."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, inputs):
        return keras.ops.matmul(inputs, keras.ops.transpose(self.dense.kernel))


def test_kernel_read_outside_its_layer_falls_back_to_pfor():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,), dtype="float64")
    dense = keras.layers.Dense(4, activation="tanh", dtype="float64")
    outputs = TiedOutput(dense, dtype="float64")(dense(inputs))  # back to 3 classes
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(size=(8, 3))
    assert_factored_equal(model, x, np.arange(8) % 3, factored=False)


def test_check_runs_on_a_few_examples_then_factors_the_whole_batch(monkeypatch):
    # The check holds float64 per-example gradients, so it takes CHECK_ROWS examples of
    # the batch (eagerly), never all of them; what it decides holds for the whole batch.
    from tf_influence.engine.gradients import CHECK_ROWS

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype="float64"),
            keras.layers.Conv2D(3, 3, activation="tanh", dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(3 * CHECK_ROWS, 5, 5, 2))
    y = tf.constant(np.arange(len(x)) % 3)
    objective = tfi.engine.Objective(model, loss=LOSS)
    gradients = tfi.engine.PerExampleGradients(objective, scoring="jacobian")
    seen = []
    check = gradients._factored_check_impl

    def spy(xs, ys):
        seen.append((int(xs.shape[0]), int(ys.shape[0])))
        return check(xs, ys)

    monkeypatch.setattr(gradients, "_factored_check_impl", spy)
    assert gradients.check_factored(x, y) is True
    assert seen == [(CHECK_ROWS, CHECK_ROWS)]
    solutions = np.random.default_rng(2).normal(size=(objective.num_params, 4))
    expected_grads, expected_scores = reference(objective, x, y, solutions)
    np.testing.assert_allclose(gradients(x, y).numpy(), expected_grads, rtol=1e-10, atol=1e-13)
    scores, _ = gradients.scores(x, y, tf.constant(solutions))
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-10, atol=1e-12)


def test_time_distributed_steps_are_uses():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 3), dtype="float64"),
            keras.layers.TimeDistributed(keras.layers.Dense(2, dtype="float64"), dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 4, 3))
    assert_factored_equal(model, x, np.arange(5) % 3)


class Folded(keras.layers.Layer):
    """Applies a Dense to (batch * time) rows: its rows are not the batch's examples."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2, dtype=self.dtype_policy)

    def call(self, inputs):
        rows = self.dense(keras.ops.reshape(inputs, (-1, 3)))
        return keras.ops.reshape(rows, (-1, 8))


def test_rows_that_are_not_examples_fall_back_to_pfor():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 3), dtype="float64"),
            Folded(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 4, 3))
    assert_factored_equal(model, x, np.arange(5) % 3, factored=False)


def test_auto_scoring_and_passes_over_several_batches(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="exact", damping=0.5)
    im.fit(x, y, batch_size=8, verbose=0)
    assert im.state.gradients.mode_for(1) == "jacobian"  # factored throughout
    assert im.state.rows_per_pass(5) >= 48  # all 50 examples in one or two passes
    scores = im.explain(x[:5], y[:5], verbose=0)
    jvp = tfi.InfluenceModel(mlp)
    jvp.compile(solver="exact", damping=0.5, scoring="jvp")
    jvp.fit(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(scores, jvp.explain(x[:5], y[:5], verbose=0), rtol=1e-9)
    top = im.explain(x[:5], y[:5], top_k=4, verbose=0)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(scores, axis=1)[:, :4])


def test_nonfinite_training_example_is_named(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="exact", damping=0.5)
    im.fit(x, y, batch_size=8, verbose=0)
    solutions = np.zeros((im.num_params, 2))
    bad = x.copy()
    bad[3, 1] = np.inf
    _, finite = im.state.gradients.scores(bad[:8], tf.constant(y[:8]), solutions)
    assert finite.numpy().tolist() == [j != 3 for j in range(8)]


class SideBranch(keras.Model):
    """Calls a Dense layer whose output the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.side = keras.layers.Dense(2, dtype="float64")
        self.out = keras.layers.Dense(3, dtype="float64")

    def call(self, inputs):
        self.side(inputs)
        return self.out(inputs)


def test_called_layer_without_gradient_scores_zero():
    keras.utils.set_random_seed(0)
    model = SideBranch()
    x = np.random.default_rng(1).normal(size=(6, 4))
    model(x)
    gradients = assert_factored_equal(model, x, np.arange(6) % 3)
    side = sum(int(np.prod(v.shape)) for v in model.side.trainable_variables)
    assert np.all(gradients(x, tf.constant(np.arange(6) % 3)).numpy()[:, :side] == 0)


@pytest.mark.parametrize(
    "conv_args",
    [
        {"padding": "valid"},
        {"padding": "same", "strides": 2},
        {"padding": "causal", "dilation_rate": 2},
    ],
)
def test_conv1d_layers(conv_args):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((7, 2), dtype="float64"),
            keras.layers.Conv1D(3, 3, activation="tanh", dtype="float64", **conv_args),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 7, 2))
    gradients = assert_factored_equal(model, x, np.arange(5) % 3)
    assert gradients._pfor_indices == []


@pytest.mark.parametrize(
    "conv_args",
    [
        {"padding": "valid", "depth_multiplier": 2},
        {"padding": "same", "strides": 2, "kernel_size": (2, 3)},
        {"padding": "valid", "dilation_rate": 2, "use_bias": False},
    ],
)
def test_depthwise_conv2d_layers(conv_args):
    keras.utils.set_random_seed(0)
    args = {"kernel_size": 3, **conv_args}
    model = keras.Sequential(
        [
            keras.Input((6, 5, 3), dtype="float64"),
            keras.layers.DepthwiseConv2D(activation="tanh", dtype="float64", **args),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 6, 5, 3))
    gradients = assert_factored_equal(model, x, np.arange(5) % 3)
    assert gradients._pfor_indices == []


@pytest.mark.parametrize(
    ("equation", "output_shape", "bias_axes", "bias_factored"),
    [
        ("abc,cde->abde", (4, 2, 3), "de", True),  # MultiHeadAttention's projections
        ("abc,cd->adb", (2, 4), "d", False),  # output axes before positions: bias by pfor
        ("...c,cd->...d", 2, "d", True),
        ("abc,cd->abd", (4, 2), "b", False),  # a bias over positions: by pfor
        ("abc,cd->abd", (4, 2), None, False),
    ],
)
def test_einsum_dense_layers(equation, output_shape, bias_axes, bias_factored):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3), dtype="float64")
    h = keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes, activation="tanh", dtype="float64"
    )(inputs)
    h = keras.layers.Flatten(dtype="float64")(h)
    h = keras.layers.EinsumDense("ab,bc->ac", 3, bias_axes="c", dtype="float64")(h)
    model = keras.Model(inputs, h)
    x = np.random.default_rng(1).normal(size=(6, 4, 3))
    gradients = assert_factored_equal(model, x, np.arange(6) % 3)
    expected = [] if bias_factored or bias_axes is None else [1]
    assert gradients._pfor_indices == expected


def test_einsum_dense_outside_the_covered_equations_goes_through_pfor():
    """A kernel axis that is also an input and output axis (one matrix per position)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3), dtype="float64")
    h = keras.layers.EinsumDense("abc,bcd->abd", (4, 2), dtype="float64", name="per_step")(inputs)
    h = keras.layers.Flatten(dtype="float64")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(h))
    x = np.random.default_rng(1).normal(size=(6, 4, 3))
    gradients = assert_factored_equal(model, x, np.arange(6) % 3)
    assert gradients._pfor_indices == [0]


def test_embedding_with_repeated_tokens():
    """Tokens repeated within an example add up; unused rows get zero gradients; scores by
    gathering (one vector) and by the gradients (more vectors than the vocabulary allows)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(9, 3, dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).integers(0, 7, size=(6, 5)).astype("int32")
    x[0, :3] = 2
    gradients = assert_factored_equal(model, x, np.arange(6) % 3)
    assert gradients._pfor_indices == []


def test_attention_with_biases_is_factored():
    """The key bias's gradient is 0 in exact arithmetic (softmax ignores a shift): its
    rounding noise passes the check, which judges it against every factored gradient."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3), dtype="float64")
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype="float64")(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D(dtype="float64")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(h))
    x = np.random.default_rng(0).normal(size=(6, 4, 3))
    assert_factored_equal(model, x, np.arange(6) % 3, num_tests=(1, 5))
