"""tfi.evaluation.loo_check: real leave-one-out retraining against the prediction."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import spearmanr
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import tf_influence as tfi
from tf_influence import evaluation
from tf_influence.experiments import keras_logistic

C = 0.1


@pytest.fixture(scope="module")
def problem():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_test, y_test, x, y = x[:20], y[:20], x[20:320], y[20:320]
    clf = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(x, y)
    # The test point the model gets most wrong: its loss moves the most.
    z = x_test @ clf.coef_.ravel() + clf.intercept_[0]
    worst = int(np.argmax(np.logaddexp(0, z) - y_test * z))
    return x, y, x_test[worst : worst + 1], y_test[worst : worst + 1], clf


def _influence_model(x, y, clf):
    model = keras_logistic(clf, len(x))
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile("exact", damping=0.0)
    return im.fit(x, y.astype("float64")[:, None], verbose=0)


def _test_loss(coef, intercept, x_test, y_test):
    z = x_test @ coef + intercept
    return float(np.mean(np.logaddexp(0, z) - y_test * z))


def test_loo_check_equals_exact_refitting(problem, monkeypatch):
    x, y, x_test, y_test, clf = problem
    im = _influence_model(x, y, clf)
    targets = y_test.astype("float64")[:, None]
    # The objective is traced once for every retraining, though L-BFGS evaluates it
    # at 10 places in its graph.
    traces = []
    objective = evaluation._LbfgsRetraining._value_and_gradient
    monkeypatch.setattr(
        evaluation._LbfgsRetraining,
        "_value_and_gradient",
        lambda self, *args: traces.append(1) or objective(self, *args),
    )
    check = tfi.evaluation.loo_check(im, x_test, targets, n_points=12, verbose=0)
    assert len(traces) == 1
    assert len(check.indices) == 12 and len(set(check.indices.tolist())) == 12
    scores = im.explain(x_test, targets, verbose=0)
    np.testing.assert_allclose(check.predicted, -scores[0, check.indices] / len(x), rtol=1e-12)
    # The top half are the largest predicted changes.
    assert np.abs(check.predicted[:6]).min() >= np.sort(np.abs(scores[0]))[-6] / len(x) * (
        1 - 1e-12
    )
    # Its default (L-BFGS, warm-started) retraining equals scikit-learn refitting
    # with the example's weight set to zero, to tight tolerance.
    full = LogisticRegression(C=C, tol=1e-14, max_iter=100000).fit(x, y)
    reference = _test_loss(full.coef_.ravel(), full.intercept_[0], x_test, y_test)
    actual = []
    for index in check.indices:
        weights = np.ones(len(x))
        weights[index] = 0.0
        refit = LogisticRegression(C=C, tol=1e-14, max_iter=100000).fit(x, y, sample_weight=weights)
        actual.append(
            _test_loss(refit.coef_.ravel(), refit.intercept_[0], x_test, y_test) - reference
        )
    actual = np.array(actual)
    np.testing.assert_allclose(check.actual, actual, atol=1e-4 * np.abs(actual).max())
    assert check.pearson == pytest.approx(np.corrcoef(check.predicted, check.actual)[0, 1])
    assert check.spearman == pytest.approx(spearmanr(check.predicted, check.actual).statistic)
    assert check.pearson > 0.9 and check.spearman > 0.9  # Pearson measured 0.919
    # The weights are restored.
    np.testing.assert_array_equal(im.model.weights[0].numpy().ravel(), clf.coef_.ravel())


def test_loo_check_with_a_custom_retraining(problem):
    x, y, x_test, y_test, clf = problem
    im = _influence_model(x, y, clf)
    calls = []

    def retrain(model, x_kept, y_kept):
        calls.append((x_kept.copy(), y_kept.copy()))
        refit = LogisticRegression(C=C * len(x_kept) / len(x), tol=1e-12, max_iter=10000)
        refit.fit(x_kept, y_kept.ravel())
        model.set_weights([refit.coef_.T, refit.intercept_])

    targets = y_test.astype("float64")[:, None]
    check = tfi.evaluation.loo_check(im, x_test, targets, n_points=4, retrain=retrain, verbose=0)
    assert len(calls) == 5 and len(calls[0][0]) == len(x)  # the reference, then 4 removals
    for (x_kept, _), index in zip(calls[1:], check.indices, strict=True):
        assert len(x_kept) == len(x) - 1
        assert not np.any(np.all(x_kept == x[index], axis=1))
    assert np.all(np.isfinite(check.actual))
    np.testing.assert_array_equal(im.model.weights[0].numpy().ravel(), clf.coef_.ravel())


def test_loo_check_errors(problem):
    x, y, x_test, y_test, clf = problem
    im = _influence_model(x, y, clf)
    targets = y_test.astype("float64")[:, None]
    for bad in (1, len(x) + 1, 2.5, True):
        with pytest.raises(ValueError, match=r"`n_points` must be an integer from 2 to the 300"):
            tfi.evaluation.loo_check(im, x_test, targets, n_points=bad)
    with pytest.raises(TypeError, match=r"`retrain` must be None .* Received: retrain='lbfgs'"):
        tfi.evaluation.loo_check(im, x_test, targets, retrain="lbfgs")
    dataset = tf.data.Dataset.from_tensor_slices((x, y.astype("float64")[:, None])).batch(50)
    im.fit(dataset, verbose=0)
    with pytest.raises(ValueError, match=r"needs the training data as arrays"):
        tfi.evaluation.loo_check(im, x_test, targets)
