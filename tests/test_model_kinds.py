"""Every kind of Keras model gives the influence of the equivalent plain model."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.engine.objective import MIXED_PRECISION_KERAS, _keras_version

SPARSE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def scores(model, x, y, loss=None, params=None, damping=0.5, solver="exact"):
    im = tfi.InfluenceModel(model, loss=loss, params=params)
    im.compile(solver=solver, damping=damping)
    return im.fit(x, y, batch_size=16, verbose=0).explain(_take(x, 4), y[:4], verbose=0)


def _take(x, n):
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    if isinstance(x, list):
        return [v[:n] for v in x]
    return x[:n]


def test_multi_input_list_and_dict_equal_the_concatenated_model(mlp, blobs):
    x, y = blobs
    expected = scores(mlp, x, y, loss=SPARSE_LOGITS)
    hidden, logits = mlp.layers
    for as_dict in (False, True):
        a = keras.Input((1,), dtype="float64", name="a")
        b = keras.Input((3,), dtype="float64", name="b")
        merged = keras.layers.Concatenate(dtype="float64")([a, b])
        h = keras.layers.Dense(
            5, activation="tanh", dtype="float64", kernel_regularizer=keras.regularizers.L2(0.01)
        )(merged)
        out = keras.layers.Dense(3, dtype="float64")(h)
        model = keras.Model({"a": a, "b": b} if as_dict else [a, b], out)
        model.set_weights(mlp.get_weights())
        inputs = {"a": x[:, :1], "b": x[:, 1:]} if as_dict else [x[:, :1], x[:, 1:]]
        np.testing.assert_allclose(
            scores(model, inputs, y, loss=SPARSE_LOGITS), expected, rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize(
    "loss",
    [
        "sparse_categorical_crossentropy",
        keras.losses.SparseCategoricalCrossentropy(),
        keras.losses.sparse_categorical_crossentropy,
        lambda y_true, y_pred: keras.losses.sparse_categorical_crossentropy(y_true, y_pred),
    ],
    ids=["string", "object", "function", "lambda"],
)
def test_losses_as_strings_objects_and_functions_agree(blobs, loss):
    x, y = blobs
    keras.utils.set_random_seed(0)
    model = make_mlp()
    probabilities = keras.Sequential([model, keras.layers.Softmax(dtype="float64")])
    probabilities(x[:1])  # Keras < 3.7 does not build a nested Sequential by itself
    expected = scores(model, x, y, loss=SPARSE_LOGITS)
    # Keras clips probabilities to [1e-7, 1 - 1e-7]: agreement to about that.
    np.testing.assert_allclose(scores(probabilities, x, y, loss=loss), expected, rtol=1e-5)


def test_mixed_float16_model_is_analysed_in_float32(blobs):
    x, y = blobs
    x = x.astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        # float32 inputs: under a mixed policy, Keras 3.4's Input is float16 (it
        # rounds the inputs), newer Keras's is float32.
        inputs = keras.Input((4,), dtype="float32")
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        h = keras.layers.BatchNormalization()(h)
        out = keras.layers.Dense(3, dtype="float32")(h)
        return keras.Model(inputs, out)

    plain = build()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mixed = build()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert mixed.layers[1].compute_dtype == "float16"
    mixed.set_weights(plain.get_weights())
    if _keras_version() < MIXED_PRECISION_KERAS:
        with pytest.raises(ValueError, match=r"mixed-precision policy .* Upgrade Keras"):
            tfi.InfluenceModel(mixed, loss=SPARSE_LOGITS)
        return
    expected = scores(plain, x, y, loss=SPARSE_LOGITS, damping=1.0)
    im = tfi.InfluenceModel(mixed, loss=SPARSE_LOGITS)
    assert im.objective.mixed_precision and im.objective.dtype.name == "float32"
    np.testing.assert_allclose(
        scores(mixed, x, y, loss=SPARSE_LOGITS, damping=1.0), expected, rtol=1e-5, atol=1e-7
    )
    assert mixed.layers[1].compute_dtype == "float16"  # the model's own policy is restored
    # K-FAC's factors are taken in full precision too: the same factors, the same scores,
    # whether they are kept in float64 or float32.
    for factor_dtype in ("float64", "float32"):
        ekfac = tfi.solvers.EKFAC(samples="exact", factor_dtype=factor_dtype)
        np.testing.assert_allclose(
            scores(mixed, x, y, loss=SPARSE_LOGITS, damping=1.0, solver=ekfac),
            scores(plain, x, y, loss=SPARSE_LOGITS, damping=1.0, solver=ekfac),
            rtol=1e-5,
            atol=1e-7,
        )


def test_frozen_layers_are_held_fixed(mlp, blobs):
    x, y = blobs
    expected = scores(mlp, x, y, loss=SPARSE_LOGITS, params=["logits"])
    frozen = make_mlp()
    frozen.set_weights(mlp.get_weights())
    frozen.get_layer("hidden").trainable = False
    im = tfi.InfluenceModel(frozen, loss=SPARSE_LOGITS)
    assert im.num_params == 5 * 3 + 3
    np.testing.assert_allclose(scores(frozen, x, y, loss=SPARSE_LOGITS), expected, rtol=1e-10)


def test_batchnorm_and_dropout_models_are_deterministic(blobs):
    x, y = blobs
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, activation="relu", dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Dropout(0.5, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(loss=SPARSE_LOGITS, optimizer="adam")
    model.fit(x, y, epochs=2, verbose=0)
    moving = [w.copy() for w in model.get_weights()]
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.CG(tol=1e-12), damping=1.0)
    im.fit(x, y, batch_size=16, verbose=0)
    first = im.explain(x[:4], y[:4], verbose=0)
    np.testing.assert_array_equal(first, im.explain(x[:4], y[:4], verbose=0))  # cached
    # Fresh InfluenceModels (no cache) give identical results, equal to CG's.
    fresh = scores(model, x, y, loss=SPARSE_LOGITS, damping=1.0)
    np.testing.assert_array_equal(fresh, scores(model, x, y, loss=SPARSE_LOGITS, damping=1.0))
    np.testing.assert_allclose(first, fresh, rtol=1e-8, atol=1e-12)
    for before, after in zip(moving, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # moving statistics untouched


def _branching_loss(y_true, y_pred):
    """Branches in Python on a tensor, which traces only with autograph."""
    if tf.reduce_min(y_pred) > -1e30:  # always
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return tf.zeros_like(y_pred[:, 0])


def test_loss_that_branches_on_a_tensor_is_traced_with_autograph(mlp, blobs):
    """Our functions compile without autograph (Keras 3 models never get it: autograph
    does not enter Keras); a loss function that needs it gets it. (Products of several
    vectors at once cannot vectorise the derivative of a tf.cond, so one test point.)"""
    x, y = blobs
    results = {}
    for loss in (SPARSE_LOGITS, _branching_loss):
        im = tfi.InfluenceModel(mlp, loss=loss)
        im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=0.5)
        im.fit(x, y, batch_size=16, verbose=0)
        results[loss] = im.explain(x[:1], y[:1], verbose=0)
        assert im.operator._matvec.autograph == (loss is _branching_loss)
    expected = scores(mlp, x, y, loss=SPARSE_LOGITS)[:1]
    np.testing.assert_allclose(results[SPARSE_LOGITS], expected, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(results[_branching_loss], results[SPARSE_LOGITS], rtol=1e-9)
    # loo_check's L-BFGS runs without autograph; its objective gets it for this loss.
    # The largest predicted change (first) is retrained to within 10% (measured 5%).
    check = tfi.evaluation.loo_check(im, x[:1], y[:1], n_points=2, verbose=0)
    assert np.all(np.sign(check.actual) == np.sign(check.predicted))
    np.testing.assert_allclose(check.actual[0], check.predicted[0], rtol=0.1)
