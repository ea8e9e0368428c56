"""Train a Keras model on a tf.distribute strategy and explain it on the same strategy.

One machine, all its GPUs (or N logical CPU devices to try it without GPUs)::

    python examples/distributed.py --out top.npz
    python examples/distributed.py --logical-cpus 2 --out top.npz

Several machines (or processes): the same command on every worker, each with its
own TF_CONFIG; every worker computes the same result and worker 0 writes it::

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        python examples/distributed.py --out top.npz

The data is scikit-learn's bundled digits (nothing is downloaded); every worker
loads the same arrays, in the same order, as ``fit`` requires.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf


def make_strategy(logical_cpus: int) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy under TF_CONFIG, else MirroredStrategy on this machine.

    Must run before any other TensorFlow op (devices are fixed at start-up).
    """
    if "TF_CONFIG" in os.environ:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if logical_cpus > 1:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * logical_cpus,
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.MirroredStrategy()  # every GPU, or the CPU if there is none


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="top.npz")
    args = parser.parse_args(argv)
    strategy = make_strategy(args.logical_cpus)

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    import tf_influence as tfi

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train).astype("float32")
    x_test = scaler.transform(x_test).astype("float32")

    def build():
        return keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(128, activation="tanh"), keras.layers.Dense(10)]
        )

    # Train (or load a checkpoint) the usual way. Every worker must hold the same
    # weights: deterministic training from one seed gives them here. (Keras 3.15's
    # model.fit fails under MultiWorkerMirroredStrategy, so training is kept apart.)
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    trained = build()
    trained.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    trained.fit(x_train, y_train, epochs=args.epochs, batch_size=64, shuffle=False, verbose=0)

    with strategy.scope():  # variables mirrored on every replica, as for model.fit
        model = build()
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights(trained.get_weights())

    im = tfi.InfluenceModel(model)  # analysed with model.distribute_strategy
    im.compile(solver="cg", damping=0.05)
    im.fit(x_train, y_train, batch_size=256, verbose=0)
    top = im.top_k(x_test[:10], y_test[:10], k=5, verbose=0)

    task = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]
    if task.get("index", 0) == 0:  # every worker holds the result; one writes it
        np.savez(args.out, **top._asdict())
        print(
            f"{tfi.distribute.strategy_name(strategy)} with {strategy.num_replicas_in_sync} "
            "replicas; "
            f"most harmful training examples for test point 0: {top.harmful_indices[0].tolist()}"
        )


if __name__ == "__main__":
    main()
