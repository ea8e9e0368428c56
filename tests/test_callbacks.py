"""InfluenceCallback on real model.fit runs."""

import glob
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi


def model_and_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    model = make_mlp(l2=0.05, dtype="float32")
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, x, y


def test_callback_analyses_every_n_epochs_and_at_the_end(tmp_path):
    model, x, y = model_and_data()
    cb = tfi.callbacks.InfluenceCallback(
        x, y, solver="exact", damping=0.5, every_n_epochs=2, top_k=5, log_dir=tmp_path
    )
    model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.history["epoch"] == [2, 4, 5]
    assert cb.history["error"] == [None, None, None]
    # After training, the influence model describes the final weights.
    fresh = tfi.InfluenceModel(model)
    fresh.compile(solver="exact", damping=0.5)
    fresh.fit(x, y, verbose=0)
    np.testing.assert_allclose(
        cb.influence_model.explain(x[:3], y[:3], verbose=0),
        fresh.explain(x[:3], y[:3], verbose=0),
        rtol=1e-5,
    )
    values = fresh.self_influence(verbose=0)
    np.testing.assert_array_equal(cb.history["suspicious_indices"][-1], np.argsort(-values)[:5])
    np.testing.assert_allclose(
        cb.history["suspicious_scores"][-1], np.sort(values)[::-1][:5], rtol=1e-5
    )
    # Earlier analyses saw earlier weights.
    first, last = cb.history["suspicious_scores"][0], cb.history["suspicious_scores"][2]
    assert not np.array_equal(first, last)
    tags = set()
    for path in glob.glob(str(tmp_path / "influence" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"self_influence", "self_influence/max", "suspicious_examples"} <= tags


def test_callback_only_at_the_end_by_default():
    model, x, y = model_and_data()
    cb = tfi.callbacks.InfluenceCallback(x, y, damping=0.5)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.history["epoch"] == [3]
    assert cb.self_influence_.shape == (40,)


def test_callback_with_ekfac_refits_the_factors_for_each_analysis():
    model, x, y = model_and_data()
    cb = tfi.callbacks.InfluenceCallback(x, y, solver="ekfac", damping=0.5, every_n_epochs=2)
    model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.history["epoch"] == [2, 4]
    assert cb.history["error"] == [None, None]
    assert cb.influence_model.get_compile_config()["curvature"] == "gauss_newton"
    fresh = tfi.InfluenceModel(model)
    fresh.compile(solver="ekfac", damping=0.5)
    fresh.fit(x, y, verbose=0)
    np.testing.assert_allclose(cb.self_influence_, fresh.self_influence(verbose=0), rtol=1e-5)


def test_curvature_error_is_warned_and_training_finishes():
    _, x, y = model_and_data()
    # Untrained and unregularised: the Hessian is indefinite.
    model = make_mlp(l2=0.0, seed=1, dtype="float32")
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    cb = tfi.callbacks.InfluenceCallback(x, y, solver="exact", damping=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 1
    assert cb.influence_model is None and "not positive definite" in cb.history["error"][0]
    assert any("no influence analysis at epoch 1" in str(w.message) for w in caught)


def test_callback_config_round_trip():
    _, x, y = model_and_data()
    cb = tfi.callbacks.InfluenceCallback(
        x, y, solver=tfi.solvers.CG(tol=1e-8), damping=0.1, every_n_epochs=3, top_k=4
    )
    rebuilt = tfi.callbacks.InfluenceCallback.from_config(cb.get_config(), x, y)
    assert rebuilt.get_config() == cb.get_config()
    with pytest.raises(ValueError, match=r"needs the training data"):
        tfi.callbacks.InfluenceCallback.from_config(cb.get_config())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"damping": -1}, r"`damping` must be a finite number >= 0. Received: damping=-1"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be a positive integer or None"),
        ({"top_k": 0}, r"`top_k` must be a positive integer. Received: top_k=0"),
        ({"solver": "newton"}, r"`solver` must be one of"),
        ({"verbose": 3}, r"`verbose` must be 0 or 1"),
    ],
)
def test_callback_checks_arguments_before_training(kwargs, message):
    _, x, y = model_and_data()
    with pytest.raises(ValueError, match=message):
        tfi.callbacks.InfluenceCallback(x, y, **kwargs)


def test_callback_checks_data_before_training():
    _, x, y = model_and_data()
    with pytest.raises(ValueError, match=r"same number of examples"):
        tfi.callbacks.InfluenceCallback(x, y[:-1])
