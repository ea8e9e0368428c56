"""Shared fixtures: small models and data whose curvature can be checked densely."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, so that MirroredStrategy has two replicas in
# tests/test_distribute.py. Only possible before TensorFlow initialises its devices
# (a worker process that created its strategy first keeps its own).
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:
    pass


def make_mlp(num_inputs=4, hidden=5, num_classes=3, dtype="float64", l2=0.01, seed=0):
    """A tiny tanh MLP with logits outputs, in ``dtype``."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((num_inputs,), dtype=dtype),
            keras.layers.Dense(
                hidden,
                activation="tanh",
                dtype=dtype,
                kernel_regularizer=keras.regularizers.L2(l2),
                name="hidden",
            ),
            keras.layers.Dense(num_classes, dtype=dtype, name="logits"),
        ]
    )


def dense_hessian(objective, x, y):
    """Reference Hessian of mean loss + regularisation, by two nested full-batch tapes."""
    variables = objective.variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(objective.per_example_loss(x, y)) + objective.regularization()
        grad = objective.layout.flatten(inner.gradient(loss, variables))
    jac = outer.jacobian(grad, variables)
    return objective.layout.flatten_batched(jac, objective.num_params, tf.float64).numpy()


def make_blobs():
    """50 float64 points in 4-d, 3 classes (the ``blobs`` fixture, for module fixtures)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = rng.integers(0, 3, size=50)
    return x, y


@pytest.fixture
def blobs():
    """50 float64 points in 4-d, 3 classes."""
    return make_blobs()


@pytest.fixture
def mlp():
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_exact(model, x, y, damping=0.5):
    """An InfluenceModel with the Exact solver, fitted on (x, y) in batches of 16."""
    import tf_influence as tfi

    im = tfi.InfluenceModel(model)
    im.compile(solver="exact", damping=damping)
    return im.fit(x, y, batch_size=16, verbose=0)


@pytest.fixture(scope="session")
def strategy():
    """One MirroredStrategy over the two logical CPUs for the whole run.

    Two strategy instances over the same devices in one process can give their
    collectives the same keys, so every test shares this one.
    """
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "conftest.py must create two logical CPU devices"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def tape_gradients(objective, x, y):
    """``(n, p)`` per-example loss gradients, one tape per example (the reference)."""
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(objective.per_example_loss(x[i : i + 1], y[i : i + 1]))
        rows.append(objective.layout.flatten(tape.gradient(loss, objective.variables)).numpy())
    return np.array(rows)
