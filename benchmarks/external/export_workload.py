"""Trains the benchmark MLP once in Keras 3 and writes the shared workload file.

Every library of the external comparison reads the same ``workload.npz``: the
digits split, the trained weights (Keras layout: kernels are ``(in, out)``) and
the settings (L2 strength, damping, test points, batch size). Usage, with the
tf_influence venv::

    python -m benchmarks.external.export_workload [/tmp/workload.npz]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

L2 = 1e-3  # keras.regularizers.L2(L2) on every kernel: Omega = L2 * sum ||W||^2
DAMPING = 1e-3
N_TEST = 20
BATCH_SIZE = 128  # used by every library for its passes over the training data
HIDDEN = 128
SEED = 0
EPOCHS = 300


def load_digits_split():
    """Digits, split 80/20 with random_state=0, standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        y_train.astype(np.int64),
        scaler.transform(x_test).astype(np.float32),
        y_test.astype(np.int64),
    )


def build_model(keras, l2=L2):
    """64 -> 128 (tanh) -> 128 (tanh) -> 10 logits, L2 on kernels only."""
    reg = keras.regularizers.L2(l2)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(HIDDEN, activation="tanh", kernel_regularizer=reg, name="dense_1"),
            keras.layers.Dense(HIDDEN, activation="tanh", kernel_regularizer=reg, name="dense_2"),
            keras.layers.Dense(10, kernel_regularizer=reg, name="logits"),
        ],
        name="digits_mlp",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="/tmp/workload.npz")
    args = parser.parse_args(argv)

    import keras

    x_train, y_train, x_test, y_test = load_digits_split()
    keras.utils.set_random_seed(SEED)
    model = build_model(keras)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    start = time.perf_counter()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=64, shuffle=True, verbose=0)
    # Finish with full-batch steps at a small learning rate, so that theta is close
    # to a stationary point of R (mean loss + L2) and the Hessian is nearly PSD.
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=500, batch_size=len(x_train), verbose=0)
    seconds = time.perf_counter() - start

    import tensorflow as tf

    with tf.GradientTape() as tape:
        mean_loss = loss(y_train, model(x_train, training=False))
        objective = mean_loss + tf.add_n(model.losses)
    grad = tape.gradient(objective, model.trainable_variables)
    grad_norm = float(tf.linalg.global_norm(grad))
    train_acc = float(np.mean(np.argmax(model.predict(x_train, verbose=0), 1) == y_train))
    test_acc = float(np.mean(np.argmax(model.predict(x_test, verbose=0), 1) == y_test))

    arrays = {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test[:N_TEST],
        "y_test": y_test[:N_TEST],
        "l2": np.float64(L2),
        "damping": np.float64(DAMPING),
        "batch_size": np.int64(BATCH_SIZE),
    }
    for layer in model.layers:
        kernel, bias = layer.get_weights()
        arrays[f"{layer.name}/kernel"] = kernel
        arrays[f"{layer.name}/bias"] = bias
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    np.savez(args.output, **arrays)
    print(
        f"trained in {seconds:.1f} s: train accuracy {train_acc:.4f}, test accuracy "
        f"{test_acc:.4f}, mean loss {float(mean_loss):.4f}, objective {float(objective):.4f}, "
        f"|grad R| = {grad_norm:.2e}; {model.count_params()} parameters; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
