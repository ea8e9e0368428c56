"""Scikit-learn's 8x8 digits and the two benchmark models trained on them.

Models (float32, fixed seeds, trained with Adam on the digits, standardised,
``train_test_split(test_size=0.2, random_state=0)``, 1437 training points):
``mlp`` 64 -> 128 tanh -> 128 tanh -> 10 logits and ``cnn`` Conv2D(16, 3, relu) ->
Conv2D(32, 3, relu) -> Flatten -> Dense(10), both with L2(1e-4) on kernels.
"""

from __future__ import annotations

import numpy as np

SEED = 0
L2 = 1e-4
EPOCHS = 30
NUM_TESTS = 20
MODELS = ("mlp", "cnn")
# Damping per model, so that CG converges on the trained model: the MLP needs ~20
# iterations at 1e-2 (tol 1e-5). On the relu CNN, CG with 1e-2 meets negative curvature
# (p^T (H + 1e-2 I) p / p^T p = -1.1e-3); 2e-2 / 3e-2 / 5e-2 need 94 / 44 / 28 iterations.
DAMPING = {"mlp": 1e-2, "cnn": 5e-2}
CG_TOL = 1e-5  # relative residual, same for our CG and SciPy's (float32 reaches it)
CG_MAX_ITER = 1000


def load_data():
    """Digits, split 80/20 with random_state=0, standardised with training statistics.

    Returns:
        ``(x_train (1437, 64) float32, y_train (1437,) int32, x_test (360, 64),
        y_test (360,))``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        y_train.astype(np.int32),
        scaler.transform(x_test).astype(np.float32),
        y_test.astype(np.int32),
    )


def grown(x_train, y_train, factor, seed=SEED):
    """The training set and ``factor - 1`` noisy copies of it (noise std 0.05), in order.

    Returns:
        ``(x (factor * n, 64) float32, y (factor * n,))``.
    """
    rng = np.random.default_rng(seed)
    copies = [x_train] + [
        (x_train + 0.05 * rng.standard_normal(x_train.shape)).astype(np.float32)
        for _ in range(factor - 1)
    ]
    return np.concatenate(copies), np.tile(y_train, factor)


def inputs(name, x):
    """The model's view of the 64 standardised pixels: flat for the MLP, 8x8x1 for the CNN."""
    return x if name == "mlp" else x.reshape(-1, 8, 8, 1)


def build_model(name, seed=SEED):
    """The untrained, compiled ``mlp`` or ``cnn``, seeded with ``seed`` (None: as Keras is)."""
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(L2)
    if name == "mlp":
        layers = [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(10, kernel_regularizer=reg),
        ]
    elif name == "cnn":
        layers = [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", kernel_regularizer=reg),
            keras.layers.Conv2D(32, 3, activation="relu", kernel_regularizer=reg),
            keras.layers.Flatten(),
            keras.layers.Dense(10, kernel_regularizer=reg),
        ]
    else:
        raise ValueError(f"Argument `name` must be one of {list(MODELS)}. Received: name={name!r}")
    model = keras.Sequential(layers, name=name)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(name, data, epochs=EPOCHS):
    """``build_model(name)`` trained on ``data`` (from ``load_data``); returns (model, test acc)."""
    x_train, y_train, x_test, y_test = data
    model = build_model(name)
    model.fit(inputs(name, x_train), y_train, epochs=epochs, batch_size=32, verbose=0)
    accuracy = model.evaluate(inputs(name, x_test), y_test, verbose=0)[1]
    return model, float(accuracy)
