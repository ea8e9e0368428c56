"""Every bad input the package handles gets a clear error: argument, what was received, fix."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.solvers import CurvatureError


@pytest.fixture
def im(mlp):
    return tfi.InfluenceModel(mlp)


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"`model` must be built.*built=False.*model\(x\[:1\]\)"):
        tfi.InfluenceModel(model, loss="mse")


def test_not_a_keras_model():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model.*Received: model="):
        tfi.InfluenceModel(lambda x: x, loss="mse")


def test_non_tensorflow_backend(mlp, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match=r"TensorFlow backend.*Received: .*'jax'.*KERAS_BACKEND"):
        tfi.InfluenceModel(mlp)


def test_missing_loss():
    model = make_mlp()  # never compiled
    with pytest.raises(ValueError, match=r"No loss.*Received: loss=None.*Pass `loss=`"):
        tfi.InfluenceModel(model)


def test_unknown_loss_name(mlp):
    with pytest.raises(ValueError, match=r"Unknown loss name. Received: loss='crossentropyy'"):
        tfi.InfluenceModel(mlp, loss="crossentropyy")


def test_loss_reducing_over_batch(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp, loss=lambda yt, yp: tf.reduce_mean(yp))
    with pytest.raises(ValueError, match=r"one number for the whole batch.*one value per example"):
        im.fit(x, y, verbose=0)


def test_unknown_layer_in_params(mlp):
    with pytest.raises(ValueError, match=r"`params` names a layer .* Received: .*'nope'.*'hidden'"):
        tfi.InfluenceModel(mlp, params=["nope"])


def test_foreign_variable_in_params(mlp):
    other = make_mlp(seed=3)
    with pytest.raises(ValueError, match=r"`params` holds a variable that is not a trainable"):
        tfi.InfluenceModel(mlp, params=[other.trainable_variables[0]])


def test_activity_regularizer_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activity_regularizer="l2")])
    with pytest.raises(ValueError, match=r"activity_regularizer.*not supported.*Received"):
        tfi.InfluenceModel(model, loss="mse")


def test_label_shape_mismatch(im, blobs):
    x, y = blobs
    with pytest.raises(
        ValueError, match=r"`x` and `y` must hold the same number.*50 examples.*\(49,\)"
    ):
        im.fit(x, y[:49], verbose=0)
    one_hot = keras.utils.to_categorical(y, 3)
    with pytest.raises(
        ValueError, match=r"cannot be computed on the targets `y`.*\(16, 3\).*class indices"
    ):
        im.fit(x, one_hot, batch_size=16, verbose=0)


def test_empty_data(im):
    with pytest.raises(ValueError, match=r"Argument `x` is empty. Received: x with 0 examples"):
        im.fit(np.zeros((0, 4)), np.zeros((0,)), verbose=0)
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 4)), np.zeros((0,)))).batch(4)
    with pytest.raises(ValueError, match=r"`x` is an empty dataset"):
        im.fit(empty, verbose=0)


def test_nan_in_inputs_and_labels(im, blobs):
    x, y = blobs
    bad_x = x.copy()
    bad_x[17, 2] = np.nan
    with pytest.raises(ValueError, match=r"`x` holds NaN or inf at example 17"):
        im.fit(bad_x, y, verbose=0)
    bad_y = y.astype("float64")
    bad_y[3] = np.inf
    with pytest.raises(ValueError, match=r"`y` holds NaN or inf at example 3"):
        im.fit(x, bad_y, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((bad_x, y)).batch(8)
    with pytest.raises(ValueError, match=r"holds NaN or inf in its inputs at example 17"):
        im.fit(ds, verbose=0)
    im.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"`x_test` holds NaN or inf at example 17"):
        im.explain(bad_x, y, verbose=0)


def test_nan_in_weights(mlp, blobs):
    x, y = blobs
    kernel = mlp.get_layer("hidden").kernel
    kernel.assign(np.full(kernel.shape, np.nan))
    im = tfi.InfluenceModel(mlp)
    with pytest.raises(ValueError, match=r"weight 'sequential.*hidden/kernel' holds NaN or inf"):
        im.fit(x, y, verbose=0)


def test_nan_loss_names_example(blobs):
    x, y = blobs
    model = make_mlp()
    im = tfi.InfluenceModel(model, loss=lambda yt, yp: tf.math.log(yp[:, 0] - yp[:, 0]))
    with pytest.raises(ValueError, match=r"loss is NaN or inf at example 0 of `x`"):
        im.fit(x, y, verbose=0)


class WithUnusedLayer(keras.Model):
    def __init__(self):
        super().__init__(dtype="float64")
        self.used = keras.layers.Dense(3, dtype="float64")
        self.unused = keras.layers.Dense(3, dtype="float64", name="unused")

    def call(self, inputs):
        return self.used(inputs)


def test_variable_without_gradient_is_named(blobs):
    x, y = blobs
    model = WithUnusedLayer()
    model.unused.build((None, 4))
    model(x[:1])
    im = tfi.InfluenceModel(
        model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with pytest.raises(ValueError, match=r"get no gradient.*unused/kernel.*params="):
        im.fit(x, y, verbose=0)


def test_indefinite_hessian_through_influence_model(blobs):
    x, y = blobs
    model = make_mlp(l2=0.0, seed=1)
    for solver in ("exact", tfi.solvers.CG(), tfi.solvers.Arnoldi(rank=20)):
        im = tfi.InfluenceModel(
            model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        im.compile(solver, damping=0.0)
        with pytest.raises(CurvatureError, match=r"not positive definite.*damping=") as error:
            im.fit(x, y, verbose=0)
            im.explain(x[:3], y[:3], verbose=0)  # CG meets the curvature in a solve
        assert 'curvature="gauss_newton"' in str(error.value)


@pytest.mark.parametrize("damping", [-1.0, float("nan"), "a", True])
def test_bad_damping(im, damping):
    with pytest.raises(
        ValueError, match=r"`damping` must be a finite number >= 0. Received: damping="
    ):
        im.compile("cg", damping=damping)


def test_bad_batch_size_and_verbose(im, blobs):
    x, y = blobs
    with pytest.raises(
        ValueError, match=r"`batch_size` must be a positive integer. Received: batch_size=0"
    ):
        im.fit(x, y, batch_size=0)
    with pytest.raises(ValueError, match=r"`verbose` must be .* Received: verbose='loud'"):
        im.fit(x, y, verbose="loud")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(
        ValueError, match=r"`batch_size` must be None when `x` is a tf.data.Dataset"
    ):
        im.fit(ds, batch_size=8)
    with pytest.raises(ValueError, match=r"`y` must be None when `x` is a tf.data.Dataset"):
        im.fit(ds, y)
    with pytest.raises(ValueError, match=r"must yield tuples \(x, y\)"):
        im.fit(tf.data.Dataset.from_tensor_slices(x).batch(8))


def test_missing_training_targets(im, blobs):
    x, _ = blobs
    with pytest.raises(ValueError, match=r"Argument `y` is required.*Received: y=None"):
        im.fit(x, verbose=0)


def test_explain_before_fit(im, blobs):
    x, y = blobs
    with pytest.raises(RuntimeError, match=r"`explain` needs the training data. Call `fit"):
        im.explain(x[:2], y[:2])
    with pytest.raises(RuntimeError, match=r"`self_influence` needs the training data"):
        im.self_influence()


def test_regression_without_y_test():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    im = tfi.InfluenceModel(model, loss="mse")
    im.compile("exact", damping=0.01)
    im.fit(x, x[:, 0], verbose=0)
    with pytest.raises(
        ValueError, match=r"y_test=None.*classification loss.*'mean_squared_error'.*`y_test=`"
    ):
        im.explain(x[:2])


def test_bad_k(im, blobs):
    x, y = blobs
    im.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"`k` must be a positive integer. Received: k=0"):
        im.top_k(x[:1], y[:1], k=0)


def test_unconverged_cg_warns(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(tfi.solvers.CG(tol=1e-12, max_iter=2), damping=0.5)
    im.fit(x, y, verbose=0)
    with pytest.warns(
        RuntimeWarning, match=r"did not converge for 3 of 3 test points.*raise max_iter"
    ):
        im.explain(x[:3], y[:3], verbose=0)
