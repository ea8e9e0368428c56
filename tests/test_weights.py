"""fit(sample_weight=, class_weight=): the weighted objective (1/n) sum_j w_j L_j + Omega.

Ground truth is the closed-form weighted logistic regression of
``tf_influence.experiments`` (its Hessian, gradients and Newton refits, float64).
Training example j enters every score as ``w_j L_j``:

    scores[i, j] = -grad L(z_test_i)^T inv(H) (w_j grad L(z_j))

so removing example j (its whole ``w_j L_j``) changes test loss i by about
``-scores[i, j] / n``, and adding ``delta`` to its weight by about
``delta * scores[i, j] / (n * w_j)``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import experiments as ex
from tf_influence.engine.losses import WeightedTargets

L2 = 0.01
N = 60


@pytest.fixture(scope="module")
def problem():
    """Weighted logistic regression in 3-d, trained to |grad R| <= 1e-10 by Newton."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3))
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.7 * rng.normal(size=N) > 0).astype("float64")
    w = rng.uniform(0.2, 3.0, N)
    w[5] = 0.0  # an example left out of the objective by its weight
    theta = ex.logistic_newton(x, y, L2, weights=w)
    x_test = rng.normal(size=(4, 3))
    y_test = (x_test[:, 0] > 0).astype("float64")
    return x, y, w, theta, x_test, y_test


def _fitted(theta, x, y, solver="exact", **weights):
    im = tfi.InfluenceModel(ex.logistic_model(theta, L2))
    im.compile(solver, damping=0.0)
    return im.fit(x, y[:, None], batch_size=16, verbose=0, **weights)


def _closed_form(theta, x, y, w, x_test, y_test):
    hessian = ex.logistic_objective(theta, x, y, L2, w)[2]
    train = w[:, None] * ex.logistic_gradients(theta, x, y)
    test = ex.logistic_gradients(theta, x_test, y_test)
    return -test @ np.linalg.solve(hessian, train.T), hessian


def test_objective_is_what_keras_minimises(problem):
    x, y, w, theta, _, _ = problem
    model = ex.logistic_model(theta, L2)
    objective = tfi.InfluenceModel(model).objective
    ours = tf.reduce_mean(objective.per_example_loss(x, WeightedTargets(y[:, None], w)))
    ours += objective.regularization()
    # Keras's reduction of a weighted loss: sum_j w_j L_j / n, plus model.losses.
    loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64")
    keras_loss = loss(y[:, None], model(x), sample_weight=w) + tf.add_n(model.losses)
    assert float(ours) == pytest.approx(float(keras_loss), rel=1e-12)
    assert float(ours) == pytest.approx(ex.logistic_objective(theta, x, y, L2, w)[0], rel=1e-8)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_curvature_and_scores_against_the_closed_form(problem, curvature):
    x, y, w, theta, x_test, y_test = problem
    im = tfi.InfluenceModel(ex.logistic_model(theta, L2))
    im.compile("exact", damping=0.0, curvature=curvature)
    im.fit(x, y[:, None], batch_size=16, verbose=0, sample_weight=w)
    reference, hessian = _closed_form(theta, x, y, w, x_test, y_test)
    np.testing.assert_allclose(im.operator.dense().numpy(), hessian, atol=1e-12)
    scores = im.explain(x_test, y_test[:, None], verbose=0)
    np.testing.assert_allclose(scores, reference, atol=1e-8 * np.abs(reference).max())
    assert np.all(scores[:, 5] == 0.0)  # weight 0: no influence


def test_zero_weight_is_an_absent_example_for_the_curvature(problem):
    x, y, w, theta, _, _ = problem
    im = _fitted(theta, x, y, sample_weight=w)
    keep = np.arange(N) != 5
    # The same objective without the example (Keras still divides by all n).
    absent = ex.logistic_objective(theta, x[keep], y[keep], L2, w[keep], n=N)[2]
    np.testing.assert_allclose(im.operator.dense().numpy(), absent, atol=1e-12)


def test_self_influence_is_the_diagonal_and_weighted_once(problem):
    x, y, w, theta, _, _ = problem
    for solver in ("exact", tfi.solvers.Arnoldi(rank=4, seed=0)):
        im = _fitted(theta, x, y, solver=solver, sample_weight=w)
        values = im.self_influence(verbose=0)
        diagonal = -np.diag(im.explain(x, y[:, None], verbose=0))
        np.testing.assert_allclose(values, diagonal, rtol=1e-7, atol=1e-12)
    grads = ex.logistic_gradients(theta, x, y)
    hessian = ex.logistic_objective(theta, x, y, L2, w)[2]
    quadratic = np.einsum("np,np->n", grads, np.linalg.solve(hessian, grads.T).T)
    np.testing.assert_allclose(values, w * quadratic, rtol=1e-8)


def test_removal_and_reweighting_against_retraining(problem):
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, sample_weight=w)
    scores = im.explain(x_test, y_test[:, None], verbose=0)
    base = ex.logistic_loss(theta, x_test, y_test)
    chosen = np.argsort(-np.abs(scores).max(axis=0))[:8]
    removed, reweighted, delta = [], [], 1e-3
    for j in chosen:
        weights = w.copy()
        weights[j] = 0.0  # removing example j drops its whole w_j L_j
        refit = ex.logistic_newton(x, y, L2, weights=weights, theta0=theta)
        removed.append(ex.logistic_loss(refit, x_test, y_test) - base)
        weights = w.copy()
        weights[j] += delta
        refit = ex.logistic_newton(x, y, L2, weights=weights, theta0=theta)
        reweighted.append(ex.logistic_loss(refit, x_test, y_test) - base)
    removed, reweighted = np.array(removed).T, np.array(reweighted).T
    predicted = -scores[:, chosen] / N
    assert np.corrcoef(predicted.ravel(), removed.ravel())[0, 1] > 0.99
    # First order on a large step (weights up to 3 of n = 60): measured within 0.21.
    np.testing.assert_allclose(predicted, removed, atol=0.25 * np.abs(removed).max())
    # A small change of a weight: first order, so to about delta relative.
    small = delta * scores[:, chosen] / (N * w[chosen])
    np.testing.assert_allclose(small, reweighted, rtol=1e-2, atol=1e-3 * np.abs(small).max())
    # predict_removal of a group of one is the same quantity.
    one = im.predict_removal([[int(chosen[0])]], x_test, y_test[:, None], verbose=0)
    np.testing.assert_allclose(one[:, 0], predicted[:, 0], rtol=1e-8)


def test_group_removal_of_weighted_examples_against_retraining(problem):
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, sample_weight=w)
    rng = np.random.default_rng(1)
    groups = [rng.choice(N, size, replace=False) for size in (3, 6, 12)]
    predicted = im.predict_removal(groups, x_test, y_test[:, None], order=2, verbose=0)
    base = ex.logistic_loss(theta, x_test, y_test)
    for g, group in enumerate(groups):
        weights = w.copy()
        weights[group] = 0.0
        refit = ex.logistic_newton(x, y, L2, weights=weights, theta0=theta)
        actual = ex.logistic_loss(refit, x_test, y_test) - base
        # Second order (Basu et al.): measured within 0.13 of the largest change.
        np.testing.assert_allclose(predicted[:, g], actual, atol=0.2 * np.abs(actual).max())


def test_class_weight_equals_the_sample_weight_it_stands_for(problem):
    x, y, _, theta, x_test, y_test = problem
    class_weight = {0: 0.5, 1: 2.5}
    by_class = _fitted(theta, x, y, class_weight=class_weight)
    by_sample = _fitted(theta, x, y, sample_weight=np.where(y > 0.5, 2.5, 0.5))
    np.testing.assert_array_equal(
        by_class.explain(x_test, y_test[:, None], verbose=0),
        by_sample.explain(x_test, y_test[:, None], verbose=0),
    )
    # Classes missing from the dict weigh 1, as in Keras; one-hot labels by arg-max.
    sparse = _fitted(theta, x, y, class_weight={1: 2.5})
    ones = _fitted(theta, x, y, sample_weight=np.where(y > 0.5, 2.5, 1.0))
    np.testing.assert_array_equal(sparse.self_influence(verbose=0), ones.self_influence(verbose=0))


def test_class_weight_on_one_hot_and_sparse_labels(blobs):
    from conftest import make_mlp

    x, y = blobs
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    class_weight = {0: 1.0, 1: 3.0, 2: 0.5}
    weights = np.array([class_weight[c] for c in y])
    im = tfi.InfluenceModel(model)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    a = im.fit(x, y, class_weight=class_weight, verbose=0).self_influence(verbose=0)
    b = im.fit(x, y, sample_weight=weights, verbose=0).self_influence(verbose=0)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    one_hot = keras.losses.CategoricalCrossentropy(from_logits=True)
    im = tfi.InfluenceModel(model, loss=one_hot)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    c = im.fit(x, np.eye(3)[y], class_weight=class_weight, verbose=0).self_influence(verbose=0)
    np.testing.assert_allclose(c, a, rtol=1e-10)


def test_a_dataset_of_x_y_w_equals_arrays_with_weights(problem):
    x, y, w, theta, x_test, y_test = problem
    arrays = _fitted(theta, x, y, sample_weight=w)
    dataset = tf.data.Dataset.from_tensor_slices((x, y[:, None], w)).batch(16)
    im = tfi.InfluenceModel(ex.logistic_model(theta, L2))
    im.compile("exact", damping=0.0)
    im.fit(dataset, verbose=0)
    np.testing.assert_allclose(
        im.explain(x_test, y_test[:, None], verbose=0),
        arrays.explain(x_test, y_test[:, None], verbose=0),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        im.self_influence(verbose=0), arrays.self_influence(verbose=0), rtol=1e-10
    )
    # class_weight on a dataset of (x, y) is mapped in, as Keras does.
    plain = tf.data.Dataset.from_tensor_slices((x, y[:, None])).batch(16)
    im.fit(plain, class_weight={0: 0.5, 1: 2.5}, verbose=0)
    reference = _fitted(theta, x, y, sample_weight=np.where(y > 0.5, 2.5, 0.5))
    np.testing.assert_allclose(
        im.self_influence(verbose=0), reference.self_influence(verbose=0), rtol=1e-10
    )


def test_tracin_uses_the_weighted_gradients(problem):
    x, y, w, theta, x_test, y_test = problem
    model = ex.logistic_model(theta, L2)
    tracin = tfi.TracIn(model, [(model.get_weights(), 0.1)])
    tracin.fit(x, y[:, None], sample_weight=w)
    grads = ex.logistic_gradients(theta, x, y)
    test = ex.logistic_gradients(theta, x_test, y_test)
    expected = -0.1 * test @ (w[:, None] * grads).T
    np.testing.assert_allclose(tracin.explain(x_test, y_test[:, None], verbose=0), expected)
    np.testing.assert_allclose(
        tracin.self_influence(verbose=0), 0.1 * w * np.sum(grads**2, axis=1), rtol=1e-10
    )


def test_save_and_load_keep_the_weights(problem, tmp_path):
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, sample_weight=w)
    expected = im.explain(x_test, y_test[:, None], verbose=0)
    im.save(tmp_path / "with_data.npz", include_data=True)
    im.save(tmp_path / "without_data.npz", include_data=False)
    model = im.model
    loaded = tfi.InfluenceModel.load(tmp_path / "with_data.npz", model, verbose=0)
    np.testing.assert_allclose(loaded.explain(x_test, y_test[:, None], verbose=0), expected)
    loaded = tfi.InfluenceModel.load(tmp_path / "without_data.npz", model, x, y[:, None], verbose=0)
    np.testing.assert_allclose(loaded.explain(x_test, y_test[:, None], verbose=0), expected)
    # Other weights are other training data.
    assert im.training_fingerprint() != _fitted(theta, x, y).training_fingerprint()


def test_resume_fingerprints_cover_the_weights(problem):
    x, y, w, theta, x_test, y_test = problem
    other = w.copy()
    other[0] += 1.0
    first = _fitted(theta, x, y, sample_weight=w).state
    second = _fitted(theta, x, y, sample_weight=other).state
    tests = first.test_data(x_test, y_test[:, None])
    a, b = first.fingerprints(tests, {}), second.fingerprints(tests, {})
    assert [name for name in a if a[name] != b[name]] == ["training data"]


def test_callback_takes_the_weights():
    from conftest import make_mlp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    model = make_mlp(l2=0.05, dtype="float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    class_weight = {0: 1.0, 1: 0.5, 2: 4.0}
    callback = tfi.callbacks.InfluenceCallback(
        x, y, solver="exact", damping=0.5, curvature="hessian", class_weight=class_weight
    )
    model.fit(
        x, y, epochs=2, batch_size=8, verbose=0, class_weight=class_weight, callbacks=[callback]
    )
    fresh = tfi.InfluenceModel(model)
    fresh.compile(solver="exact", damping=0.5, curvature="hessian")
    expected = fresh.fit(x, y, class_weight=class_weight, verbose=0).self_influence(verbose=0)
    np.testing.assert_allclose(callback.self_influence_, expected, rtol=1e-4)
    unweighted = fresh.fit(x, y, verbose=0).self_influence(verbose=0)
    assert not np.allclose(callback.self_influence_, unweighted, rtol=1e-2)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones(N - 1), r"sample_weight` must have shape \(60,\).*shape \(59,\)"),
        (np.ones((N, 2)), r"sample_weight` must have shape \(60,\)"),
        (np.where(np.arange(N) == 7, -1.0, 1.0), r"negative weight at training example 7"),
        (np.where(np.arange(N) == 3, np.nan, 1.0), r"holds nan at training example 3"),
        (np.where(np.arange(N) == 4, np.inf, 1.0), r"holds inf at training example 4"),
        (["a"] * N, r"one number per training example"),
    ],
)
def test_bad_sample_weights_are_refused(problem, weights, message):
    x, y, _, theta, _, _ = problem
    with pytest.raises(ValueError, match=message):
        _fitted(theta, x, y, sample_weight=weights)


def test_bad_class_weights_are_refused(problem):
    x, y, w, theta, _, _ = problem
    with pytest.raises(ValueError, match=r"classes the model does not have: \[2\].*2 classes"):
        _fitted(theta, x, y, class_weight={0: 1.0, 2: 3.0})
    with pytest.raises(ValueError, match="class indices"):
        _fitted(theta, x, y, class_weight={"cat": 1.0})
    with pytest.raises(ValueError, match=r"finite weights >= 0.*-1.0"):
        _fitted(theta, x, y, class_weight={0: -1.0})
    with pytest.raises(ValueError, match="cannot both be given"):
        _fitted(theta, x, y, class_weight={0: 1.0}, sample_weight=w)
    dataset = tf.data.Dataset.from_tensor_slices((x, y[:, None], w)).batch(16)
    im = tfi.InfluenceModel(ex.logistic_model(theta, L2))
    with pytest.raises(ValueError, match="sample_weight` must be None when `x` is a tf.data"):
        im.fit(dataset, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match="class_weight` cannot be combined"):
        im.fit(dataset, class_weight={0: 2.0}, verbose=0)
    bad = tf.data.Dataset.from_tensor_slices((x, y[:, None], -w)).batch(16)
    with pytest.raises(ValueError, match="negative weight at training example 0"):
        im.fit(bad, verbose=0)


@pytest.mark.slow
def test_weights_under_a_strategy(problem, strategy):
    x, y, w, theta, x_test, y_test = problem
    expected = _fitted(theta, x, y, sample_weight=w)
    im = tfi.InfluenceModel(ex.logistic_model(theta, L2), strategy=strategy)
    im.compile("exact", damping=0.0)
    im.fit(x, y[:, None], batch_size=16, sample_weight=w, verbose=0)
    assert im.operator.replicas.num_replicas == 2
    np.testing.assert_allclose(
        im.explain(x_test, y_test[:, None], verbose=0),
        expected.explain(x_test, y_test[:, None], verbose=0),
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        im.self_influence(verbose=0), expected.self_influence(verbose=0), rtol=1e-9
    )


@pytest.mark.slow
def test_loo_check_removes_the_whole_weighted_term(problem):
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, sample_weight=w)
    check = tfi.evaluation.loo_check(im, x_test[:1], y_test[:1, None], n_points=4, verbose=0)
    base = ex.logistic_loss(theta, x_test[:1], y_test[:1])
    actual = []
    for j in check.indices:
        weights = w.copy()
        weights[j] = 0.0
        refit = ex.logistic_newton(x, y, L2, weights=weights, theta0=theta)
        actual.append(ex.logistic_loss(refit, x_test[:1], y_test[:1])[0] - base[0])
    np.testing.assert_allclose(check.actual, actual, atol=1e-4 * np.abs(actual).max())


@pytest.mark.parametrize(
    ("solver", "tolerance"),
    [
        (tfi.solvers.CG(tol=1e-12), 1e-7),
        (tfi.solvers.Arnoldi(rank=4, seed=0), 1e-7),
        (
            tfi.solvers.LiSSA(recursion_depth=300, num_repeats=4, batch_size=30, seed=0, tol=0.2),
            0.1,
        ),
    ],
    ids=["cg", "arnoldi", "lissa"],
)
def test_every_solver_sees_the_weights(problem, solver, tolerance):
    """LiSSA samples weighted batches; CG and Arnoldi use the weighted products."""
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, solver=solver, sample_weight=w)
    reference, _ = _closed_form(theta, x, y, w, x_test, y_test)
    scores = im.explain(x_test, y_test[:, None], verbose=0)
    np.testing.assert_allclose(scores, reference, atol=tolerance * np.abs(reference).max())


def test_loo_check_gives_a_custom_retrain_the_weights_of_the_kept_examples(problem):
    x, y, w, theta, x_test, y_test = problem
    im = _fitted(theta, x, y, sample_weight=w)
    with pytest.raises(TypeError, match=r"`retrain` must take a `sample_weight` keyword"):
        tfi.evaluation.loo_check(im, x_test[:1], y_test[:1, None], 2, lambda m, x, y: None)
    seen = []

    def retrain(model, x_kept, y_kept, sample_weight=None):
        seen.append((len(x_kept), np.asarray(y_kept), np.asarray(sample_weight)))

    check = tfi.evaluation.loo_check(
        im, x_test[:1], y_test[:1, None], n_points=2, retrain=retrain, verbose=0
    )
    (n_all, y_all, w_all), *removed = seen
    assert n_all == len(x)
    np.testing.assert_array_equal(w_all, w)
    np.testing.assert_array_equal(y_all, np.asarray(y).reshape(y_all.shape))
    for (size, _, kept), j in zip(removed, check.indices, strict=True):
        assert size == len(x) - 1
        np.testing.assert_array_equal(kept, np.delete(w, j))
