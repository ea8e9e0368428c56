"""Koh & Liang (2017, section 5.4) on scikit-learn data: finding flipped labels.

Breast-cancer data (569 examples), standardised, expanded to all degree-2
products (495 features) so that, as with the paper's bag-of-words spam data,
the model has the capacity to fit some flipped labels; 10% of the labels are
flipped; L2-regularised logistic regression is fitted to the noisy labels.
Training examples are then inspected in three orders: self-influence
(``InfluenceModel.self_influence``), training loss, and random.

The weights are found by scikit-learn's LBFGS on exactly the objective Keras
would minimise (``C = 1`` in scikit-learn is ``L2(1 / (2 n))`` on the kernel of a
Keras ``Dense(1)`` with a mean loss), then loaded into the Keras model: a precise
minimum in a second, which the check of the gradient below confirms.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from conftest import keras_logistic

import tf_influence as tfi
from tf_influence.evaluation import mislabel_curve

FLIP_FRACTION = 0.10
C = 1.0


def load_features():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    return PolynomialFeatures(2, include_bias=False).fit_transform(x), y


def run_seed(seed: int, x=None, y=None):
    """Curves ``{"self-influence", "training loss", "random"}`` and the gradient norm."""
    from sklearn.linear_model import LogisticRegression

    if x is None:
        x, y = load_features()
    rng = np.random.default_rng(seed)
    n = len(x)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(FLIP_FRACTION * n)), replace=False)] = True
    noisy = np.where(flipped, 1 - y, y).astype("float64")

    clf = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(x, noisy)
    keras.utils.set_random_seed(seed)
    model = keras_logistic(clf, n)
    im = tfi.InfluenceModel(model, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    im.compile(solver="exact")
    im.fit(x, noisy, batch_size=256, verbose=0)

    objective = im.objective
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(objective.per_example_loss(x, noisy)) + objective.regularization()
    gradient = objective.layout.flatten(tape.gradient(value, objective.variables))
    losses = objective.per_example_loss(x, noisy).numpy()
    rankings = {
        "self-influence": im.self_influence(verbose=0),
        "training loss": losses,
        "random": rng.random(n),
    }
    curves = {name: mislabel_curve(values, flipped) for name, values in rankings.items()}
    return curves, float(tf.norm(gradient))
