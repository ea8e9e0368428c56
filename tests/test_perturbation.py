"""Perturbation influence (I_pert,loss) against the dense formula and against refitting."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.experiments import keras_logistic


def test_perturbation_equals_dense_formula(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="exact", damping=0.5)
    im.fit(x, y, batch_size=16, verbose=0)
    chosen = [3, 0, 41]
    result = im.explain_perturbation(chosen, x[:2], y[:2])
    assert result.shape == (2, 3, 4)
    objective = im.objective
    g_test = im.state.gradients(x[:2], y[:2]).numpy()
    solved = np.linalg.solve(im.operator.dense().numpy(), g_test.T)  # (p, 2)
    for r, j in enumerate(chosen):
        xj = tf.constant(x[j : j + 1])
        with tf.GradientTape() as outer:
            outer.watch(xj)
            with tf.GradientTape() as inner:
                loss = objective.per_example_loss(xj, y[j : j + 1])[0]
            grad = objective.layout.flatten(inner.gradient(loss, objective.variables))
        mixed = outer.jacobian(grad, xj).numpy().reshape(len(grad), -1)  # (p, 4)
        np.testing.assert_allclose(result[:, r], -solved.T @ mixed, rtol=1e-9, atol=1e-13)


@pytest.mark.slow
def test_perturbing_a_training_image_moves_the_test_loss_as_predicted():
    """Koh & Liang 2017, section 5.2, on digits 3 vs 8 with refitting to high precision."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, [3, 8])
    x, y = images[keep] / 16.0, (labels[keep] == 8).astype("float64")
    x_test, y_test, x, y = x[:5], y[:5], x[5:305], y[5:305]
    n, c = len(x), 1.0

    def refit(inputs):
        clf = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(inputs, y)
        z = x_test @ clf.coef_.ravel() + clf.intercept_[0]
        return np.logaddexp(0, z) - y_test * z

    base = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(x, y)
    model = keras_logistic(base, n)
    im = tfi.InfluenceModel(model, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    im.compile(solver="exact", damping=0.0)
    im.fit(x, y, verbose=0)
    before = refit(x)

    # The 8 training images most influential on test point 0, each moved along I_pert.
    scores = im.explain(x_test[:1], y_test[:1], verbose=0)[0]
    chosen = np.argsort(-np.abs(scores))[:8]
    directions = im.explain_perturbation(chosen, x_test[:1], y_test[:1])[0]  # (8, 64)
    predicted, actual = [], []
    for r, j in enumerate(chosen):
        delta = 0.005 * directions[r] / np.abs(directions[r]).max()
        moved = x.copy()
        moved[j] += delta
        predicted.append(float(np.sum(directions[r] * delta)) / n)
        actual.append(refit(moved)[0] - before[0])
    predicted, actual = np.array(predicted), np.array(actual)
    assert np.all(actual > 0)  # moving along I_pert raises the test loss
    np.testing.assert_allclose(actual, predicted, rtol=0.1)


def test_perturbation_bad_input(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="exact", damping=0.5)
    im.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"holds index 50, outside the 50 training"):
        im.explain_perturbation([1, 50], x[:2], y[:2])
    with pytest.raises(ValueError, match=r"non-empty 1-D list of integer training indices"):
        im.explain_perturbation([], x[:2], y[:2])
