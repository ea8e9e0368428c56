"""tfi.evaluation.lds: the linear datamodeling score against real retrainings."""

import itertools

import keras
import numpy as np
import pytest
from scipy.stats import spearmanr

import tf_influence as tfi
from tf_influence.experiments import (
    L2,
    load_two_digits,
    logistic_loss,
    logistic_model,
    logistic_newton,
)


# -- a tiny problem whose retraining is a closed form ------------------------------------
# The "model" predicts the mean target of its training subset: it is trained exactly,
# and a test point far above every target has a squared error that falls with that
# mean, a linear function of the subset (its size is fixed).
def mean_model(value):
    model = keras.Sequential(
        [keras.Input((1,), dtype="float64"), keras.layers.Dense(1, dtype="float64")]
    )
    model.layers[0].kernel.assign(np.zeros((1, 1)))
    model.layers[0].bias.assign([value])
    model.compile(loss="mse")
    return model


def train_mean(x, y, seed):
    return mean_model(float(np.mean(y)))


CALLS = {"count": 0, "fail_at": None}


def train_mean_interrupted(x, y, seed):
    """``train_mean``, but Ctrl-C at the call ``CALLS["fail_at"]``."""
    CALLS["count"] += 1
    if CALLS["fail_at"] is not None and CALLS["count"] == CALLS["fail_at"]:
        raise KeyboardInterrupt
    return mean_model(float(np.mean(y)))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    n, n_test = 10, 6
    x_train = np.zeros((n, 1))
    y_train = rng.uniform(0.0, 1.0, n)
    x_test = np.zeros((n_test, 1))
    y_test = rng.uniform(5.0, 6.0, n_test)
    return x_train, y_train, x_test, y_test


def _exact_linear_datamodel(y_train, y_test, size):
    """Least-squares fit of every test loss on the masks of all subsets of ``size``."""
    n = len(y_train)
    subsets = list(itertools.combinations(range(n), size))
    masks = np.zeros((len(subsets), n))
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = 1.0
    means = masks @ y_train / size
    losses = (y_test[None, :] - means[:, None]) ** 2  # (subsets, n_test)
    design = np.hstack([masks, np.ones((len(masks), 1))])
    coefficients = np.linalg.lstsq(design, losses, rcond=None)[0][:n]  # (n, n_test)
    # loss_S = c + sum_{j in S} coefficient_j; in our convention that is scores / n.
    return coefficients.T * n


def test_exact_linear_datamodel_reaches_an_lds_near_one(tiny):
    x_train, y_train, x_test, y_test = tiny
    scores = _exact_linear_datamodel(y_train, y_test, 5)
    result = tfi.evaluation.lds(
        scores, x_train, y_train, x_test, y_test, train_mean, num_subsets=30, verbose=0
    )
    assert result.masks.shape == (30, 10) and (result.masks.sum(axis=1) == 5).all()
    assert result.actual.shape == result.predicted.shape == (30, 6)
    # The measured losses are the closed form on each subset.
    means = result.masks @ y_train / 5
    np.testing.assert_allclose(result.actual, (y_test[None] - means[:, None]) ** 2, rtol=1e-12)
    assert result.score > 0.98, result.per_test
    # Reversing the sign of the scores reverses the ranking.
    reversed_ = tfi.evaluation.lds(
        -scores, x_train, y_train, x_test, y_test, train_mean, num_subsets=30, verbose=0
    )
    assert reversed_.score < -0.98


def test_random_scores_give_an_lds_near_zero(tiny):
    x_train, y_train, x_test, _ = tiny
    rng = np.random.default_rng(1)
    y_test = rng.uniform(5.0, 6.0, 40)
    x_test = np.zeros((40, 1))
    scores = rng.normal(size=(40, 10))
    result = tfi.evaluation.lds(
        scores, x_train, y_train, x_test, y_test, train_mean, num_subsets=60, verbose=0
    )
    assert abs(result.score) < 0.1, result.score


def test_lds_equals_an_independent_computation_on_a_convex_model_refit_exactly():
    x_train, y_train, x_test, y_test = load_two_digits()
    x_train, y_train, x_test, y_test = x_train[:80], y_train[:80], x_test[:15], y_test[:15]
    theta = logistic_newton(x_train, y_train, L2)
    im = tfi.InfluenceModel(logistic_model(theta))
    im.compile(solver="exact", damping=0.0)
    im.fit(x_train, y_train[:, None], verbose=0)
    scores = im.explain(x_test, y_test[:, None], verbose=0)

    def refit(x, y, seed):  # Newton's method to a gradient norm of 1e-13
        return logistic_model(logistic_newton(x, y[:, 0], L2))

    result = tfi.evaluation.lds(
        scores,
        x_train,
        y_train[:, None],
        x_test,
        y_test[:, None],
        refit,
        num_subsets=12,
        verbose=0,
    )
    # Independently: retrain on the same masks in NumPy and correlate with scipy.
    actual = np.array(
        [
            logistic_loss(logistic_newton(x_train[mask], y_train[mask], L2), x_test, y_test)
            for mask in result.masks
        ]
    )
    np.testing.assert_allclose(result.actual, actual, rtol=1e-9)
    predicted = result.masks @ scores.T
    expected = np.array([spearmanr(actual[:, i], predicted[:, i])[0] for i in range(15)])
    np.testing.assert_allclose(result.per_test, expected, atol=1e-12)
    assert result.score == pytest.approx(expected.mean(), abs=1e-12)
    # Exact influence on a convex model predicts the subsets well.
    assert result.score > 0.8, result.per_test


def test_resume_after_an_interrupted_run_gives_the_identical_result(tiny, tmp_path):
    x_train, y_train, x_test, y_test = tiny
    scores = _exact_linear_datamodel(y_train, y_test, 5)
    arguments = (scores, x_train, y_train, x_test, y_test, train_mean_interrupted)
    store = str(tmp_path / "runs.npz")
    CALLS.update(count=0, fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        tfi.evaluation.lds(*arguments, num_subsets=6, seeds_per_subset=2, store=store, verbose=0)
    with np.load(store) as saved:
        assert int(saved["done"].sum()) == 7  # every retraining before the interruption
    CALLS.update(count=0, fail_at=None)
    resumed = tfi.evaluation.lds(
        *arguments, num_subsets=6, seeds_per_subset=2, store=store, verbose=0
    )
    assert CALLS["count"] == 12 - 7  # only what was missing
    CALLS.update(count=0)
    whole = tfi.evaluation.lds(*arguments, num_subsets=6, seeds_per_subset=2, verbose=0)
    for name in ("masks", "actual", "predicted", "per_test", "seeds", "per_seed"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
    assert resumed.score == whole.score
    # A second method is judged against the same retrainings, with none run again.
    CALLS.update(count=0)
    other = tfi.evaluation.lds(
        scores[:, ::-1], *arguments[1:], num_subsets=6, seeds_per_subset=2, store=store, verbose=0
    )
    assert CALLS["count"] == 0 and other.seconds == 0.0
    np.testing.assert_array_equal(other.actual, whole.actual)


def test_shared_init_gives_every_subset_the_same_seeds(tiny):
    x_train, y_train, x_test, y_test = tiny
    scores = np.ones((6, 10))
    seen = []

    def train(x, y, seed):
        seen.append(seed)
        return mean_model(float(np.mean(y)))

    shared = tfi.evaluation.lds(
        scores,
        x_train,
        y_train,
        x_test,
        y_test,
        train,
        num_subsets=4,
        seeds_per_subset=2,
        shared_init=True,
        verbose=0,
    )
    assert (shared.seeds == shared.seeds[0]).all() and shared.seeds[0, 0] != shared.seeds[0, 1]
    independent = tfi.evaluation.lds(
        scores,
        x_train,
        y_train,
        x_test,
        y_test,
        train,
        num_subsets=4,
        seeds_per_subset=2,
        verbose=0,
    )
    assert len(np.unique(independent.seeds)) == 8
    assert seen == list(shared.seeds.ravel()) + list(independent.seeds.ravel())


def _build_classifier():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_keras_trainer_is_seeded_and_lds_measures_loss_and_margin(blobs):
    x, y = blobs
    train_fn = tfi.evaluation.keras_trainer(_build_classifier, epochs=3, batch_size=8)
    first, again, other = train_fn(x, y, 3), train_fn(x, y, 3), train_fn(x, y, 4)
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first.get_weights()[0], other.get_weights()[0])
    assert (
        train_fn.fingerprint
        != tfi.evaluation.keras_trainer(_build_classifier, epochs=4).fingerprint
    )

    x_test, y_test = x[:5], y[:5]
    scores = np.random.default_rng(0).normal(size=(5, 50))
    loss = tfi.evaluation.lds(scores, x, y, x_test, y_test, train_fn, num_subsets=3, verbose=0)
    margin = tfi.evaluation.lds(
        scores, x, y, x_test, y_test, train_fn, num_subsets=3, measure="margin", verbose=0
    )
    # Both measured on the same retrained models (same masks and seeds): the margin
    # from the logits, the loss from the compiled loss.
    logits = []
    for mask, seed in zip(loss.masks, loss.seeds[:, 0], strict=True):
        model = train_fn(x[mask], y[mask], int(seed))
        logits.append(model(x_test, training=False).numpy().astype(np.float64))
    logits = np.array(logits)
    correct = logits[:, np.arange(5), y_test]
    others = np.where(np.eye(3, dtype=bool)[y_test][None], -np.inf, logits).max(axis=2)
    np.testing.assert_allclose(margin.actual, correct - others, rtol=1e-5, atol=1e-6)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    np.testing.assert_allclose(loss.actual, -log_softmax[:, np.arange(5), y_test], rtol=1e-4)
    np.testing.assert_allclose(margin.predicted, -loss.predicted)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, words",
    [
        (
            {"scores": np.zeros((6, 9))},
            ValueError,
            "`scores` must have shape (n_test, n_train) = (6, 10)",
        ),
        ({"fraction": 1.0}, ValueError, "`fraction` must be a number in (0, 1)"),
        ({"fraction": 0.0}, ValueError, "`fraction` must be a number in (0, 1)"),
        ({"fraction": 0.01}, ValueError, "keeps 0 of the 10"),
        ({"num_subsets": 1}, ValueError, "`num_subsets` must be at least 2"),
        ({"train_fn": lambda x, y, seed: np.mean(y)}, TypeError, "`train_fn` must return"),
        ({"train_fn": "model"}, TypeError, "`train_fn` must be a callable"),
        ({"measure": "accuracy"}, ValueError, "`measure` must be"),
        ({"store": "runs.json"}, ValueError, "ending in .npz"),
        ({"scores": np.full((6, 10), np.nan)}, ValueError, "non-finite"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny, change, error, words):
    x_train, y_train, x_test, y_test = tiny
    arguments = {
        "scores": np.ones((6, 10)),
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "train_fn": train_mean,
        "num_subsets": 3,
        "verbose": 0,
    }
    arguments.update(change)
    with pytest.raises(error, match=None) as caught:
        tfi.evaluation.lds(**arguments)
    assert words in str(caught.value)


def test_a_store_made_with_other_data_is_refused(tiny, tmp_path):
    x_train, y_train, x_test, y_test = tiny
    store = str(tmp_path / "runs.npz")
    scores = np.ones((6, 10))
    tfi.evaluation.lds(
        scores, x_train, y_train, x_test, y_test, train_mean, num_subsets=3, store=store, verbose=0
    )
    with pytest.raises(ValueError, match="made with other settings than this call: data differ"):
        tfi.evaluation.lds(
            scores,
            x_train,
            y_train + 1.0,
            x_test,
            y_test,
            train_mean,
            num_subsets=3,
            store=store,
            verbose=0,
        )
    with pytest.raises(ValueError, match="masks, seeds differ"):
        tfi.evaluation.lds(
            scores,
            x_train,
            y_train,
            x_test,
            y_test,
            train_mean,
            num_subsets=4,
            store=store,
            verbose=0,
        )


def test_a_diverged_retraining_is_an_error_and_keeps_the_runs_before_it(tiny, tmp_path):
    x_train, y_train, x_test, y_test = tiny
    calls = []

    def diverging(x, y, seed):
        calls.append(seed)
        return mean_model(np.nan if len(calls) == 2 else float(np.mean(y)))

    store = str(tmp_path / "runs.npz")
    with pytest.raises(
        ValueError, match="non-finite loss on 6 test points: the retraining diverged"
    ):
        tfi.evaluation.lds(
            np.ones((6, 10)),
            x_train,
            y_train,
            x_test,
            y_test,
            diverging,
            num_subsets=3,
            store=store,
            verbose=0,
        )
    with np.load(store) as saved:
        assert int(saved["done"].sum()) == 1
