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
from tf_influence.engine.settings import Settings


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
    im.compile(solver="exact", damping="auto", curvature="hessian")
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
    im.compile(solver="exact", damping="auto", curvature="hessian")
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
    im.compile(solver="cg", damping="auto", curvature="hessian")
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


def test_defaults_are_gauss_newton_with_auto_damping():
    """compile() with no argument, and no compile at all: Gauss-Newton, damping "auto"."""
    x, y = _data()
    model = _tiny_mlp()
    explicit = tfi.InfluenceModel(model)
    explicit.compile(solver="exact", damping="auto", curvature="gauss_newton")
    explicit.fit(x, y, verbose=0)
    expected = explicit.explain(x[:3] + 0.1, y[:3], verbose=0)
    defaults = tfi.InfluenceModel(model)
    defaults.compile(solver="exact")
    assert defaults.curvature == "gauss_newton" and defaults.damping == "auto"
    defaults.fit(x, y, verbose=0)
    assert defaults.damping == explicit.damping > 0
    np.testing.assert_allclose(
        defaults.explain(x[:3] + 0.1, y[:3], verbose=0), expected, rtol=1e-10, atol=1e-12
    )
    plain = tfi.InfluenceModel(model).fit(x, y, verbose=0)  # no compile: CG, the same matrix
    assert plain.curvature == "gauss_newton" and plain.damping == explicit.damping
    np.testing.assert_allclose(
        plain.operator.dense().numpy(), explicit.operator.dense().numpy(), rtol=1e-12
    )
    callback = tfi.callbacks.InfluenceCallback(x, y)
    assert callback.damping == "auto" and callback.curvature == "gauss_newton"


@pytest.mark.parametrize(
    "kwargs, curvature",
    [
        ({}, "gauss_newton"),
        ({"damping": "auto"}, "gauss_newton"),
        ({"damping": 0.1}, "hessian"),
        ({"damping": 0}, "hessian"),
        ({"damping": "auto", "curvature": "hessian"}, "hessian"),
        ({"damping": 0.1, "curvature": "gauss_newton"}, "gauss_newton"),
    ],
)
def test_curvature_default_follows_the_damping(kwargs, curvature):
    """A damping given as a number keeps the Hessian it was tuned for."""
    x, y = _data()
    im = tfi.InfluenceModel(_tiny_mlp())
    im.compile(**kwargs)
    assert im.curvature == curvature
    callback = tfi.callbacks.InfluenceCallback(x, y, **kwargs)
    assert callback.curvature == curvature and callback.get_config()["curvature"] == curvature


def test_convex_model_with_the_defaults_gets_its_hessian():
    """Logistic regression (outputs linear in the parameters): the default Gauss-Newton
    matrix is the Hessian, so the defaults answer with the Hessian and the damping chosen."""
    x, y = _data(50)
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(
                2,
                dtype="float64",
                kernel_regularizer=keras.regularizers.L2(1e-2),
                bias_regularizer=keras.regularizers.L2(1e-2),  # positive definite at 0
            ),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver="exact")
    im.fit(x, y, verbose=0)
    hessian = dense_hessian(im.objective, tf.constant(x), tf.constant(y))
    np.testing.assert_allclose(
        damping_lib.FRACTION * np.trace(hessian) / 6, im.damping, rtol=1e-10
    )  # exact trace
    matrix = hessian + im.damping * np.eye(6)
    np.testing.assert_allclose(im.operator.dense().numpy(), matrix, rtol=1e-10, atol=1e-13)
    tests = (x[:3] + 0.1, y[:3])
    grads = im.state.test_gradient_matrix(*tests).numpy().T
    np.testing.assert_allclose(
        im.inverse_hvp_tests(*tests, verbose=0).numpy(),
        np.linalg.solve(matrix, grads),
        rtol=1e-9,
    )
    undamped = tfi.InfluenceModel(model)
    undamped.compile(solver="exact", damping=0.0)  # the classical, undamped influence
    undamped.fit(x, y, verbose=0)
    assert undamped.curvature == "hessian"
    np.testing.assert_allclose(undamped.operator.dense().numpy(), hessian, rtol=1e-10, atol=1e-13)


def test_records_without_curvature_read_as_the_hessian():
    """Records written before the defaults changed list no curvature: they meant the
    Hessian, also with damping "auto"; a record of the defaults names Gauss-Newton."""
    defaults = Settings()
    config = defaults.to_config()
    assert config["curvature"] == "gauss_newton" and config["damping"] == "auto"
    assert Settings.from_config(config).to_config() == config
    for damping in ("auto", 0.0, 0.5):
        old = {**config, "damping": damping}
        del old["curvature"]
        assert Settings.from_config(old).curvature == "hessian"
        assert "curvature" not in Settings.from_config(old).to_config()
    im = tfi.InfluenceModel(_tiny_mlp())
    im.compile_from_config({**config, "damping": "auto", "curvature": "hessian"})
    assert im.curvature == "hessian" and "curvature" not in im.get_compile_config()


def test_trace_on_many_examples_is_estimated_on_a_seeded_subset():
    """Over ``num_examples`` examples the trace comes from a fixed subset of them.

    p = 12 <= NUM_PROBES, so on any set of examples the estimate is that set's exact
    trace: the subset's, which differs from the full data's, and whose mean over
    subsets approaches it (C is a mean over examples).
    """
    x, y = _data(n=60)
    im = tfi.InfluenceModel(_tiny_mlp())
    im.compile(solver="cg", damping=0.0, curvature="gauss_newton")
    im.fit(x, y, verbose=0)
    full = np.trace(im.operator.dense().numpy()) / 12
    np.testing.assert_allclose(
        damping_lib.mean_eigenvalue(im.operator, num_examples=None), full, rtol=1e-6
    )
    np.testing.assert_allclose(
        damping_lib.mean_eigenvalue(im.operator, num_examples=60), full, rtol=1e-6
    )
    subsets = []
    for seed in range(12):
        estimate = damping_lib.mean_eigenvalue(im.operator, seed=seed, num_examples=20)
        subset = im.operator.subsample(20, seed)
        assert subset.num_examples == 20
        np.testing.assert_allclose(estimate, np.trace(subset.dense().numpy()) / 12, rtol=1e-6)
        subsets.append(estimate)
    assert np.std(subsets) > 1e-3 * full  # really different examples
    np.testing.assert_allclose(np.mean(subsets), full, rtol=0.15)
