"""The residual CNN of issue 18 on 32x32x3 images made from scikit-learn's digits.

The 8x8 digits are standardised, upsampled 4x (each pixel a 4x4 block) and put in
three channels scaled 1, 0.5 and -0.5, so that the channels differ. The model
(about 1.65M parameters, float32) is a small ResNet: a 3x3 stem of 64 channels,
then three stages of residual blocks (64, 128 and 256 channels; the last two
start with a stride-2 block whose shortcut is a 1x1 convolution), each block
``Conv2D -> BatchNormalization -> ReLU -> Conv2D -> BatchNormalization``, added to
its shortcut and passed through a ReLU; then global average pooling and
``Dense(10)`` logits. Kernels carry L2(1e-4).

``SMALL_STAGES`` with ``size=16`` is the network of ``notebooks/06_ekfac_cnn.ipynb``
(one block per stage of 32, 64 and 128 channels, about 310k parameters; the notebook
takes one grey channel, resized bilinearly, where this module takes three).
"""

from __future__ import annotations

import numpy as np

SEED = 0
L2 = 1e-4
NUM_TRAIN = 1500
SIZE = 32
CHANNEL_SCALES = (1.0, 0.5, -0.5)
# Blocks per stage: (channels, stride of the first block, number of blocks).
STAGES = ((64, 1, 2), (128, 2, 2), (256, 2, 1))
SMALL_STAGES = ((32, 1, 1), (64, 2, 1), (128, 2, 1))


def load_data(num_train=NUM_TRAIN, size=SIZE):
    """The digits as ``(n, size, size, 3)`` images: ``num_train`` to train on, the rest to test.

    Args:
        num_train: training examples (stratified split, ``random_state=SEED``).
        size: side of the images, a multiple of 8 (each pixel a block).

    Returns:
        ``(x_train (num_train, size, size, 3) float32, y_train (num_train,) int32,
        x_test (1797 - num_train, size, size, 3), y_test)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=num_train, random_state=SEED, stratify=y
    )
    mean, std = x_train.mean(), x_train.std()

    def images(flat):
        small = ((flat - mean) / std).reshape(-1, 8, 8)
        big = np.kron(small, np.ones((size // 8, size // 8)))
        return np.stack([scale * big for scale in CHANNEL_SCALES], axis=-1).astype(np.float32)

    return images(x_train), y_train.astype(np.int32), images(x_test), y_test.astype(np.int32)


def _block(x, channels, stride, reg, name, momentum=0.99):
    import keras

    layers = keras.layers
    shortcut = x
    y = layers.Conv2D(
        channels,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_regularizer=reg,
        name=f"{name}_conv1",
    )(x)
    y = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(
        channels, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_conv2"
    )(y)
    y = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != channels:
        shortcut = layers.Conv2D(
            channels,
            1,
            strides=stride,
            use_bias=False,
            kernel_regularizer=reg,
            name=f"{name}_shortcut",
        )(shortcut)
        shortcut = layers.BatchNormalization(momentum=momentum, name=f"{name}_shortcut_bn")(
            shortcut
        )
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def build_model(stages=STAGES, size=SIZE, momentum=0.99, seed=SEED):
    """The untrained residual CNN, compiled with Adam(1e-3) and sparse cross-entropy.

    Args:
        stages: ``(channels, stride of the first block, blocks)`` per stage; the
            stem has the first stage's channels.
        size: side of the input images.
        momentum: of the ``BatchNormalization`` layers (0.9 follows the moving
            statistics over a few hundred steps; Keras's default is 0.99).
        seed: the initialisation's seed.
    """
    import keras

    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(L2)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(
        stages[0][0], 3, padding="same", use_bias=False, kernel_regularizer=reg
    )(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=momentum)(x))
    for stage, (channels, stride, blocks) in enumerate(stages, start=1):
        for index in range(blocks):
            stride_here = stride if index == 0 else 1
            x = _block(x, channels, stride_here, reg, f"stage{stage}_{index}", momentum)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, kernel_regularizer=reg, name="logits")(x)
    model = keras.Model(inputs, outputs, name="residual_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(data, epochs=2, batch_size=32):
    """``build_model()`` trained for ``epochs``; the last epoch is timed (the first traces).

    Returns:
        ``(model, test accuracy, seconds of the last training epoch)``.
    """
    from benchmarks.common.timing import fit_epochs

    x_train, y_train, x_test, y_test = data
    model = build_model()
    seconds = fit_epochs(model, x_train, y_train, epochs, batch_size)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    return model, float(accuracy), seconds[-1] if seconds else None
