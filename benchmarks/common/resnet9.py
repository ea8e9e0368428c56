"""ResNet-9 on CIFAR-shaped images made from scikit-learn's digits (no download).

Data. The 1,797 8x8 digits are split into a training pool and a test pool
(stratified, 30% for the test pool). An example is a digit of its pool,
standardised, upsampled 4x to 32x32 (each pixel a 4x4 block), shifted by up to 2
pixels in each direction, tinted into three channels by a random colour (each
channel's weight uniform in [-1, 1]) and given Gaussian noise (std 0.3). So any
number of distinct 32x32x3 images of 10 classes can be drawn; the training set
cycles through its pool, each pass in a new order.

Models (float32, channels last; every ``conv_bn`` is ``Conv2D`` without bias,
``BatchNormalization`` (momentum 0.9, as PyTorch's 0.1) and ReLU; kernels carry
L2(5e-4), which is SGD's weight decay of 1e-3 written as a loss):

* ``"kronfluence"``: the ResNet-9 of kronfluence's CIFAR-10 example (taken from
  FFCV's and TRAK's): ``conv_bn(64)``, ``conv_bn(128, 5x5, stride 2)``, a residual
  pair of ``conv_bn(128)``, ``conv_bn(256)``, max pool, a residual pair of
  ``conv_bn(256)``, ``conv_bn(128, valid)``, global max pool, ``Dense(10)`` without
  bias, times 0.2. 2,277,568 parameters, 2,274,880 of them trained (the PyTorch
  model's count; the rest are BatchNormalization's moving statistics).
* ``"dawnbench"``: the ResNet-9 of Page's DAWNBench entry ("How to train your
  ResNet", 2018): ``conv_bn(64)``; ``conv_bn(128)``, max pool, a residual pair of
  ``conv_bn(128)``; ``conv_bn(256)``, max pool; ``conv_bn(512)``, max pool, a
  residual pair of ``conv_bn(512)``; global max pool, ``Dense(10)`` without bias,
  times 0.125. 6,577,600 parameters, 6,573,120 trained.

``width`` multiplies every layer's channels (rounded), so the parameters grow about
as ``width**2``: ``dawnbench`` at width 1.25 has 10,272,560 (10,266,960 trained).
"""

from __future__ import annotations

import numpy as np

SEED = 0
L2 = 5e-4
SIZE = 32
SHIFT = 2
NOISE = 0.3
TEST_POOL = 0.3
ARCHITECTURES = ("kronfluence", "dawnbench")


def load_data(num_train, num_test, seed=SEED):
    """``num_train`` and ``num_test`` 32x32x3 images drawn from disjoint pools of digits.

    Returns:
        ``(x_train (num_train, 32, 32, 3) float32, y_train (num_train,) int32,
        x_test (num_test, 32, 32, 3), y_test (num_test,))``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    pool_x, test_x, pool_y, test_y = train_test_split(
        x, y, test_size=TEST_POOL, random_state=seed, stratify=y
    )
    mean, std = pool_x.mean(), pool_x.std()
    rng = np.random.default_rng(seed)

    def draw(flat, labels, n):
        passes = -(-n // len(flat))
        order = np.concatenate([rng.permutation(len(flat)) for _ in range(passes)])[:n]
        small = ((flat[order] - mean) / std).reshape(-1, 8, 8)
        big = np.kron(small, np.ones((SIZE // 8, SIZE // 8)))
        shifts = rng.integers(-SHIFT, SHIFT + 1, size=(n, 2))
        big = np.stack(
            [np.roll(im, tuple(s), axis=(0, 1)) for im, s in zip(big, shifts, strict=True)]
        )
        tint = rng.uniform(-1.0, 1.0, size=(n, 1, 1, 3))
        images = big[..., None] * tint + NOISE * rng.standard_normal((n, SIZE, SIZE, 3))
        return images.astype(np.float32), labels[order].astype(np.int32)

    x_train, y_train = draw(pool_x, pool_y, num_train)
    x_test, y_test = draw(test_x, test_y, num_test)
    return x_train, y_train, x_test, y_test


def build_model(arch="kronfluence", width=1.0, seed=SEED):
    """The untrained ResNet-9 ``arch`` with channels times ``width``, compiled.

    Compiled with SGD (momentum 0.9, learning rate 0.05) and sparse cross-entropy on
    the logits.
    """
    import keras

    if arch not in ARCHITECTURES:
        raise ValueError(f"Argument `arch` must be one of {ARCHITECTURES}. Received: arch={arch!r}")
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    reg = keras.regularizers.L2(L2)
    names = iter(range(1, 100))

    def channels(c):
        return max(1, int(round(c * width)))

    def conv_bn(x, c, kernel=3, stride=1, padding="same"):
        n = next(names)
        x = layers.Conv2D(
            channels(c),
            kernel,
            strides=stride,
            padding=padding,
            use_bias=False,
            kernel_regularizer=reg,
            name=f"conv{n}",
        )(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{n}")(x)
        return layers.ReLU(name=f"relu{n}")(x)

    def residual(x, c):
        return layers.Add()([x, conv_bn(conv_bn(x, c), c)])

    inputs = keras.Input((SIZE, SIZE, 3))
    if arch == "kronfluence":
        x = conv_bn(inputs, 64)
        x = conv_bn(x, 128, kernel=5, stride=2)
        x = residual(x, 128)
        x = conv_bn(x, 256)
        x = layers.MaxPooling2D(2)(x)
        x = residual(x, 256)
        x = conv_bn(x, 128, padding="valid")
        scale = 0.2
    else:
        x = conv_bn(inputs, 64)
        x = layers.MaxPooling2D(2)(conv_bn(x, 128))
        x = residual(x, 128)
        x = layers.MaxPooling2D(2)(conv_bn(x, 256))
        x = layers.MaxPooling2D(2)(conv_bn(x, 512))
        x = residual(x, 512)
        scale = 0.125
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(10, use_bias=False, kernel_regularizer=reg, name="logits")(x)
    outputs = layers.Rescaling(scale)(x)
    model = keras.Model(inputs, outputs, name=f"resnet9_{arch}")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(data, arch="kronfluence", width=1.0, epochs=2, batch_size=64):
    """``build_model(arch, width)`` trained for ``epochs``; the last epoch is timed.

    Every epoch but the first (which traces) is timed; the median is returned.

    Returns:
        ``(model, test accuracy, seconds of one training epoch, [seconds of each epoch])``.
    """
    from benchmarks.common.timing import fit_epochs

    x_train, y_train, x_test, y_test = data
    model = build_model(arch, width)
    seconds = fit_epochs(model, x_train, y_train, epochs, batch_size)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    timed = seconds[1:] or seconds
    return model, float(accuracy), float(np.median(timed)), seconds
