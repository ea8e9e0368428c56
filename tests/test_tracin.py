"""TracIn against a hand-computed sum over checkpoints, and its checkpoints callback."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.8)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 3)), rng.integers(0, 2, 12)


def by_hand(model, checkpoints, x_test, y_test, x, y):
    """-sum_t lr_t g_t(test) . g_t(train), one tape per example."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    own = model.get_weights()

    def grad(xj, yj):
        with tf.GradientTape() as tape:
            value = loss(yj[None], model(xj[None]))
        return np.concatenate([g.numpy().ravel() for g in tape.gradient(value, model.weights)])

    total = np.zeros((len(x_test), len(x)))
    for weights, lr in checkpoints:
        model.set_weights(weights)
        for i in range(len(x_test)):
            gi = grad(x_test[i], y_test[i])
            for j in range(len(x)):
                total[i, j] -= lr * gi @ grad(x[j], y[j])
    model.set_weights(own)
    return total


def test_tracin_equals_hand_computed_sum_over_checkpoints(data):
    x, y = data
    model = tiny_model()
    checkpoints = tfi.callbacks.TracInCheckpoints(every_n_epochs=1)
    model.fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0, callbacks=[checkpoints])
    assert checkpoints.epochs_recorded == [1, 2, 3]
    rates = [lr for _, lr in checkpoints.checkpoints]
    # The schedule decays per step (3 steps per epoch): lr = 0.5 * 0.8**(3 * epoch).
    np.testing.assert_allclose(rates, [0.5 * 0.8 ** (3 * e) for e in (1, 2, 3)], rtol=1e-6)
    final = [w.copy() for w in model.get_weights()]

    tracin = tfi.TracIn(model, checkpoints).fit(x, y, batch_size=5, verbose=0)
    scores = tracin.explain(x[:4], y[:4], verbose=0)
    expected = by_hand(model, checkpoints.checkpoints, x[:4], y[:4], x, y)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(tracin.self_influence(verbose=0)[:4], -np.diag(expected[:, :4]))
    # The model keeps its own (final) weights.
    for w, f in zip(model.get_weights(), final, strict=True):
        np.testing.assert_array_equal(w, f)
    top = tracin.top_k(x[:4], y[:4], k=3, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-expected, axis=1)[:, :3])


def test_checkpoints_on_disk_equal_in_memory(data, tmp_path):
    x, y = data
    model = tiny_model()
    memory = tfi.callbacks.TracInCheckpoints(epochs=[2, 3])
    disk = tfi.callbacks.TracInCheckpoints(epochs=[2, 3], directory=tmp_path / "ckpts")
    model.fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0, callbacks=[memory, disk])
    reread = tfi.callbacks.TracInCheckpoints.from_directory(tmp_path / "ckpts")
    assert reread.epochs_recorded == [2, 3]
    a = tfi.TracIn(model, memory).fit(x, y).explain(x[:2], y[:2], verbose=0)
    b = tfi.TracIn(model, reread).fit(x, y).explain(x[:2], y[:2], verbose=0)
    np.testing.assert_array_equal(a, b)
    rebuilt = tfi.callbacks.TracInCheckpoints.from_config(memory.get_config())
    assert rebuilt.get_config() == memory.get_config()


def test_tracin_bad_input(data):
    x, y = data
    model = tiny_model()
    with pytest.raises(ValueError, match=r"holds no checkpoint.*callbacks=\[...\]"):
        tfi.TracIn(model, tfi.callbacks.TracInCheckpoints())
    with pytest.raises(ValueError, match=r"Checkpoint 0 .* does not fit the model"):
        tfi.TracIn(model, [([np.zeros((2, 2))], 0.1)])
    with pytest.raises(ValueError, match=r"learning rate -1.0; it must be a positive"):
        tfi.TracIn(model, [(model.get_weights(), -1.0)])
    with pytest.raises(ValueError, match=r"must be a TracInCheckpoints callback"):
        tfi.TracIn(model, 3)
    with pytest.raises(RuntimeError, match=r"Call `fit\(x_train, y_train\)`"):
        tfi.TracIn(model, [(model.get_weights(), 0.1)]).explain(x[:2], y[:2])
    fitted = tfi.TracIn(model, [(model.get_weights(), 0.1)]).fit(x, y)
    with pytest.raises(ValueError, match=r"`top_k` must be a positive integer"):
        fitted.explain(x[:2], y[:2], top_k=0)
    with pytest.raises(ValueError, match=r"`top_k` and `output` cannot be combined"):
        fitted.explain(x[:2], y[:2], top_k=3, output="scores.npy")
    with pytest.raises(ValueError, match=r"`every_n_epochs` must be a positive integer"):
        tfi.callbacks.TracInCheckpoints(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"`epochs` must be a non-empty list of 1-based"):
        tfi.callbacks.TracInCheckpoints(epochs=[0, 2])
