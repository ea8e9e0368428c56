"""damping="auto": chosen from the curvature's spectrum, against the dense eigenvalues.

The models here have p <= 16 parameters, so the trace is exact (the probes are the
identity's columns) and Lanczos finds the exact smallest eigenvalue: the chosen
damping equals the formula on the dense matrix's eigenvalues to rounding.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian

import tf_influence as tfi
from tf_influence.engine import damping as damping_lib


def _tiny_mlp(seed=4):
    """2 -> 2 (tanh) -> 2 logits: 12 parameters, random weights (not converged)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(2, activation="tanh", dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) * 2.0, rng.integers(0, 2, size=n)


def _expected(matrix):
    values = np.linalg.eigvalsh(matrix)
    mean = float(np.mean(values))
    f = damping_lib.FRACTION
    margin = damping_lib.NEGATIVE_MARGIN
    return max(f * abs(mean), -margin * values[0] + f * abs(mean)), values


def test_hessian_damping_equals_the_formula_on_the_dense_eigenvalues():
    x, y = _data()
    model = _tiny_mlp()
    im = tfi.InfluenceModel(model)
    im.compile(solver="exact", damping="auto")
    im.fit(x, y, verbose=0)
    hessian = dense_hessian(im.objective, tf.constant(x), tf.constant(y))
    expected, values = _expected(hessian)
    assert values[0] < 0  # indefinite: the smallest eigenvalue sets the damping
    assert im.num_params == 12 and isinstance(im.damping, float)
    np.testing.assert_allclose(im.damping, expected, rtol=1e-8)
    spectrum = im.state.spectrum
    np.testing.assert_allclose(spectrum.mean_eigenvalue, np.mean(values), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(spectrum.smallest_eigenvalue, values[0], rtol=1e-8)
    # The operator, the solver and the diagnostics use it.
    assert im.operator.damping == im.damping
    np.testing.assert_allclose(
        im.operator.dense().numpy(), hessian + im.damping * np.eye(12), atol=1e-10
    )
    im.explain(x[:2], y[:2], verbose=0)
    assert im.diagnostics.info["damping"] == im.damping
    assert im.diagnostics.info["curvature"] == "hessian"


def test_gauss_newton_damping_is_a_fraction_of_the_mean_eigenvalue():
    x, y = _data()
    im = tfi.InfluenceModel(_tiny_mlp())
    im.compile(solver="exact", damping="auto", curvature="gauss_newton")
    im.fit(x, y, verbose=0)
    ggn = im.operator.dense().numpy() - im.damping * np.eye(12)
    assert im.state.spectrum.smallest_eigenvalue is None  # PSD: no Lanczos
    np.testing.assert_allclose(im.damping, damping_lib.FRACTION * np.trace(ggn) / 12, rtol=1e-8)


def test_auto_answers_where_zero_damping_is_refused():
    """Exact refuses the indefinite Hessian at damping 0; "auto" answers, and right."""
    x, y = _data()
    model = _tiny_mlp()
    refused = tfi.InfluenceModel(model)
    refused.compile(solver="exact", damping=0.0)
    with pytest.raises(tfi.solvers.CurvatureError):
        refused.fit(x, y, verbose=0)
    im = tfi.InfluenceModel(model)
    im.compile(solver="exact", damping="auto")
    im.fit(x, y, verbose=0)
    tests = (x[:3] + 0.1, y[:3])
    grads = im.state.test_gradient_matrix(*tests).numpy().T
    matrix = dense_hessian(im.objective, tf.constant(x), tf.constant(y)) + im.damping * np.eye(12)
    assert np.linalg.eigvalsh(matrix)[0] > 0
    np.testing.assert_allclose(
        im.inverse_hvp_tests(*tests, verbose=0).numpy(), np.linalg.solve(matrix, grads), rtol=1e-6
    )


def test_cg_converges_with_auto_damping_on_an_indefinite_hessian():
    x, y = _data()
    im = tfi.InfluenceModel(_tiny_mlp())
    im.compile(solver="cg", damping="auto")
    im.fit(x, y, verbose=0)
    im.explain(x[:3], y[:3], verbose=0)
    assert im.diagnostics.all_converged


def test_hutchinson_estimate_on_more_parameters_is_unbiased_in_expectation(blobs, mlp):
    """p = 43 > NUM_PROBES: a seeded estimate, deterministic, near the dense trace."""
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="cg", damping=0.5, curvature="gauss_newton")
    im.fit(x, y, verbose=0)
    exact = np.trace(im.operator.dense().numpy()) / im.num_params - 0.5  # undamped
    first = damping_lib.mean_eigenvalue(im.operator)
    assert first == damping_lib.mean_eigenvalue(im.operator)
    estimates = [damping_lib.mean_eigenvalue(im.operator, 16, seed) for seed in range(8)]
    np.testing.assert_allclose(np.mean(estimates), exact, rtol=0.15)


def _zero_loss(y_true, y_pred):
    return 0.0 * tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_auto_damping_on_a_zero_curvature_is_refused(curvature):
    x, _ = _data()
    y = np.zeros((40, 2))
    im = tfi.InfluenceModel(_tiny_mlp(), loss=_zero_loss)
    im.compile(solver="cg", damping="auto", curvature=curvature)
    with pytest.raises(ValueError, match=r'damping="auto".*curvature is zero.*positive float'):
        im.fit(x, y, verbose=0)


@pytest.mark.parametrize("damping", ["automatic", -1.0, float("nan"), True])
def test_bad_damping_values(damping):
    im = tfi.InfluenceModel(_tiny_mlp())
    with pytest.raises(
        ValueError, match=r'damping. must be a finite number >= 0. Received.*"auto"'
    ):
        im.compile(damping=damping)


def test_callback_accepts_curvature_and_auto_damping():
    x, y = _data()
    model = _tiny_mlp()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    callback = tfi.callbacks.InfluenceCallback(
        x, y, solver="exact", damping="auto", curvature="gauss_newton"
    )
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    im = callback.influence_model
    assert im is not None and im.curvature == "gauss_newton" and im.damping > 0
    config = callback.get_config()
    assert config["curvature"] == "gauss_newton" and config["damping"] == "auto"
    again = tfi.callbacks.InfluenceCallback.from_config(config, x, y)
    assert again.curvature == "gauss_newton"
    with pytest.raises(ValueError, match="curvature"):
        tfi.callbacks.InfluenceCallback(x, y, curvature="fisher")


def test_mid_training_batchnorm_dropout_model_answers_with_gauss_newton_and_auto():
    """The issue's case: a Functional ReLU + BatchNormalization + Dropout model analysed
    by InfluenceCallback after a few epochs. CG with the Gauss-Newton curvature and
    damping="auto" answers, and agrees with Exact on the same matrix."""
    x, y = _data(60)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((2,), dtype="float64")
    hidden = keras.layers.Dense(6, activation="relu", dtype="float64")(inputs)
    hidden = keras.layers.BatchNormalization(dtype="float64")(hidden)
    hidden = keras.layers.Dropout(0.2, dtype="float64")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, dtype="float64")(hidden))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    callback = tfi.callbacks.InfluenceCallback(
        x, y, solver=tfi.solvers.CG(tol=1e-10), damping="auto", curvature="gauss_newton"
    )
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert callback.history["error"] == [None]
    im = callback.influence_model
    exact = tfi.InfluenceModel(model)
    exact.compile(solver="exact", damping=im.damping, curvature="gauss_newton")
    exact.fit(x, y, verbose=0)
    tests = (x[:3] + 0.1, y[:3])
    expected = exact.explain(*tests, verbose=0)
    actual = im.explain(*tests, verbose=0)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())
