"""InfluenceModel: invariances, model kinds, loss kinds, and the public surface."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi

SPARSE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fitted(model, x, y, solver="exact", damping=0.5, batch_size=16, loss=None):
    im = tfi.InfluenceModel(model, loss=loss)
    im.compile(solver=solver, damping=damping)
    im.fit(x, y, batch_size=batch_size, verbose=0)
    return im


def test_public_api_is_pinned():
    assert sorted(tfi.__all__) == sorted(
        [
            "Candidates",
            "InfluenceModel",
            "TopK",
            "TracIn",
            "__version__",
            "callbacks",
            "config",
            "distribute",
            "engine",
            "evaluation",
            "load_served_model",
            "solvers",
        ]
    )
    assert sorted(tfi.solvers.__all__) == sorted(
        [
            "Arnoldi",
            "CG",
            "CurvatureError",
            "CurvatureOperator",
            "Diagnostics",
            "EKFAC",
            "Exact",
            "IndexInverse",
            "KFAC",
            "LiSSA",
            "LowRankInverse",
            "LowRankQueries",
            "Projected",
            "Projection",
            "Solver",
            "deserialize",
            "get",
            "register",
            "serialize",
        ]
    )
    assert sorted(tfi.callbacks.__all__) == ["InfluenceCallback", "TracInCheckpoints"]


def test_scores_match_direct_formula(mlp, blobs):
    """scores[i, j] = -g_test_i^T inv(H + damping I) g_j with a dense H."""
    x, y = blobs
    im = fitted(mlp, x, y)
    scores = im.explain(x[:5], y[:5], verbose=0)
    grads = tfi.engine.PerExampleGradients(im.objective)
    g_train = grads(x, y).numpy()
    g_test = grads(x[:5], y[:5]).numpy()
    hessian = im.operator.dense().numpy()
    expected = -g_test @ np.linalg.solve(hessian, g_train.T)
    assert scores.shape == (5, 50)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "solver", ["exact", "cg", tfi.solvers.LiSSA(recursion_depth=300, num_repeats=4, batch_size=30)]
)
def test_self_influence_is_minus_diagonal_of_explain(mlp, blobs, solver):
    x, y = blobs
    im = fitted(mlp, x[:30], y[:30], solver=solver)
    pairwise = im.explain(x[:30], y[:30], verbose=0)
    self_influence = im.self_influence(verbose=0)
    assert self_influence.shape == (30,)
    if solver == "exact" or solver == "cg":
        np.testing.assert_allclose(self_influence, -np.diag(pairwise), rtol=1e-6)
        assert np.all(self_influence > 0)
    else:  # stochastic: each solve has its own noise; hold it to LiSSA's tolerance
        np.testing.assert_allclose(self_influence, -np.diag(pairwise), rtol=0.1)


# Block CG mixes the columns of a test batch, so batches differ at the solver's tolerance:
# a tight one makes the comparison about batching alone.
@pytest.mark.parametrize("solver", ["exact", tfi.solvers.CG(tol=1e-11)])
def test_scores_do_not_depend_on_batch_sizes_or_test_order(mlp, blobs, solver):
    x, y = blobs
    reference = fitted(mlp, x, y, solver=solver, batch_size=50).explain(x[:9], y[:9], verbose=0)
    im = fitted(mlp, x, y, solver=solver, batch_size=7)
    np.testing.assert_allclose(
        im.explain(x[:9], y[:9], batch_size=2, verbose=0), reference, rtol=1e-6
    )
    order = np.array([8, 3, 0, 5, 1, 7, 2, 6, 4])
    shuffled = im.explain(x[order], y[order], batch_size=4, verbose=0)
    np.testing.assert_allclose(shuffled, reference[order], rtol=1e-6)


def test_dataset_input_equals_arrays(mlp, blobs):
    x, y = blobs
    reference = fitted(mlp, x, y).explain(x[:4], y[:4], verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(13)
    im = tfi.InfluenceModel(mlp)
    im.compile("exact", damping=0.5)
    im.fit(dataset, verbose=0)
    assert im.num_train == 50
    test_ds = tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(3)
    np.testing.assert_allclose(im.explain(test_ds, verbose=0), reference, rtol=1e-10)


def test_y_test_none_explains_predicted_class(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y)
    predicted = np.argmax(mlp.predict(x[:6], verbose=0), axis=1)
    np.testing.assert_allclose(
        im.explain(x[:6], verbose=0), im.explain(x[:6], predicted, verbose=0)
    )


def test_top_k_ranks_scores(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y)
    scores = im.explain(x[:3], y[:3], verbose=0)
    top = im.top_k(x[:3], y[:3], k=4, verbose=0)
    assert top.helpful_indices.shape == (3, 4)
    for i in range(3):
        np.testing.assert_array_equal(top.helpful_indices[i], np.argsort(scores[i])[:4])
        np.testing.assert_array_equal(top.harmful_indices[i], np.argsort(-scores[i])[:4])
        np.testing.assert_allclose(top.helpful_scores[i], scores[i, top.helpful_indices[i]])
    assert np.all(np.diff(top.helpful_scores, axis=1) >= 0)
    assert np.all(np.diff(top.harmful_scores, axis=1) <= 0)
    assert im.top_k(x[:1], y[:1], k=500, verbose=0).harmful_indices.shape == (1, 50)


class SubclassedMLP(keras.Model):
    def __init__(self):
        super().__init__(dtype="float64")
        self.hidden = keras.layers.Dense(
            5, activation="tanh", dtype="float64", kernel_regularizer=keras.regularizers.L2(0.01)
        )
        self.out = keras.layers.Dense(3, dtype="float64")

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_sequential_functional_and_subclassed_agree(mlp, blobs):
    x, y = blobs
    reference = fitted(mlp, x, y, loss=SPARSE_LOGITS).explain(x[:4], y[:4], verbose=0)

    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.Dense(
        5, activation="tanh", dtype="float64", kernel_regularizer=keras.regularizers.L2(0.01)
    )(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(hidden))
    subclassed = SubclassedMLP()
    subclassed(x[:1])
    for other in (functional, subclassed):
        for target, source in zip(other.weights, mlp.weights, strict=True):
            target.assign(source)
        scores = fitted(other, x, y, loss=SPARSE_LOGITS).explain(x[:4], y[:4], verbose=0)
        np.testing.assert_allclose(scores, reference, rtol=1e-9)


def test_logits_and_probabilities_sparse_and_one_hot_agree(blobs):
    x, y = blobs
    logits_model = make_mlp()
    reference = fitted(logits_model, x, y, loss=SPARSE_LOGITS).explain(x[:4], y[:4], verbose=0)
    probs_model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            *logits_model.layers,
            keras.layers.Softmax(dtype="float64"),
        ]
    )
    one_hot = keras.utils.to_categorical(y, 3)
    for model, loss, labels in [
        (probs_model, "sparse_categorical_crossentropy", y),
        (logits_model, keras.losses.CategoricalCrossentropy(from_logits=True), one_hot),
        (probs_model, keras.losses.CategoricalCrossentropy(), one_hot),
    ]:
        scores = fitted(model, x, labels, loss=loss).explain(x[:4], labels[:4], verbose=0)
        np.testing.assert_allclose(scores, reference, rtol=1e-6)
    # y_test=None picks the predicted class in the loss's label format.
    im = fitted(probs_model, x, one_hot, loss="categorical_crossentropy")
    predicted = keras.utils.to_categorical(np.argmax(probs_model.predict(x[:4], verbose=0), 1), 3)
    np.testing.assert_allclose(
        im.explain(x[:4], verbose=0), im.explain(x[:4], predicted, verbose=0)
    )


def test_binary_logits_and_probabilities_agree(blobs):
    x, _ = blobs
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype("float64")
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(1, dtype="float64", kernel_regularizer=keras.regularizers.L2(0.1))
    logits = keras.Sequential([keras.Input((4,), dtype="float64"), dense])
    probs = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            dense,
            keras.layers.Activation("sigmoid", dtype="float64"),
        ]
    )
    a = fitted(logits, x, y, loss=keras.losses.BinaryCrossentropy(from_logits=True), damping=0.0)
    b = fitted(probs, x, y, loss="binary_crossentropy", damping=0.0)
    np.testing.assert_allclose(
        a.explain(x[:5], y[:5], verbose=0), b.explain(x[:5], y[:5], verbose=0), rtol=1e-5
    )
    predicted = (logits.predict(x[:5], verbose=0)[:, 0] > 0).astype("float64")
    np.testing.assert_allclose(a.explain(x[:5], verbose=0), a.explain(x[:5], predicted, verbose=0))


def test_regression_matches_closed_form_linear_regression():
    """Least squares with L2: influence has a closed form in X, residuals and H."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )
    w = np.linalg.solve(x.T @ x, x.T @ y)  # the exact minimiser of mean squared error
    model.layers[0].kernel.assign(w[:, None])
    im = fitted(model, x, y, loss="mse", damping=0.0)
    residual = x @ w - y
    g = 2 * residual[:, None] * x  # grad of (x.w - y)^2
    hessian = 2 * x.T @ x / len(x)
    expected = -g[:4] @ np.linalg.solve(hessian, g.T)
    np.testing.assert_allclose(im.explain(x[:4], y[:4], verbose=0), expected, rtol=1e-8)


def test_params_selects_layers_by_name(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp, params=["logits"])
    assert im.num_params == 5 * 3 + 3
    im.compile("exact", damping=0.5)
    im.fit(x, y, batch_size=16, verbose=0)
    scores = im.explain(x[:3], y[:3], verbose=0)
    full = fitted(mlp, x, y, damping=0.5)
    assert not np.allclose(scores, full.explain(x[:3], y[:3], verbose=0))
    # Same as differentiating the logits layer alone: the block of the full Hessian.
    grads = tfi.engine.PerExampleGradients(full.objective)
    block = slice(full.num_params - 18, full.num_params)
    hessian = full.operator.dense().numpy()[block, block]
    g_train = grads(x, y).numpy()[:, block]
    g_test = grads(x[:3], y[:3]).numpy()[:, block]
    np.testing.assert_allclose(scores, -g_test @ np.linalg.solve(hessian, g_train.T), rtol=1e-8)


def test_explain_does_not_retrace(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y, solver="cg")
    im.explain(x[:8], y[:8], batch_size=8, verbose=0)
    count = im.state.gradients.tracing_count()
    im.explain(x[8:13], y[8:13], batch_size=8, verbose=0)  # other sizes, same structure
    assert im.state.gradients.tracing_count() == count


def test_verbose_shows_progress_bar_only_on_slow_work(mlp, blobs, capsys, monkeypatch):
    x, y = blobs
    im = fitted(mlp, x, y)
    im.explain(x[:3], y[:3], verbose=1)
    assert capsys.readouterr().out == ""  # fast work stays quiet
    monkeypatch.setattr(tfi._progress, "SHOW_AFTER", 0.0)
    im.explain(x[:3], y[:3], verbose=1)
    out = capsys.readouterr().out
    assert "Scoring training examples" in out and "step" in out
    im.explain(x[:3], y[:3], verbose=2)
    # One step per scoring pass: all 50 examples at once when the MLP is factored.
    passes = im.state.data.num_batches(im.state.rows_per_pass(3))
    assert passes == 1 and im.state.data.num_batches() == 4
    assert "Scoring training examples 1 steps" in capsys.readouterr().out


def test_compile_after_fit_changes_damping(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y, damping=0.5)
    before = im.explain(x[:2], y[:2], verbose=0)
    im.compile("exact", damping=5.0)
    after = im.explain(x[:2], y[:2], verbose=0)
    assert np.all(np.abs(after) < np.abs(before))  # more damping shrinks influence here
    assert im.diagnostics.solver == "exact"
