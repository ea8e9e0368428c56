"""K-FAC / EK-FAC query batching and factor dtypes against dense numpy references.

The reference for ``query_rank=r``: the exact solutions ``inv(G_approx + damping*I)
@ g_test`` (``inverse_hvp_tests``, which compression leaves alone), each Dense,
EinsumDense, Conv1D and Conv2D layer's part read as a ``(fan_in + 1, cols)`` matrix
(the kernel as input features by outputs, an EinsumDense's contracted axes by its
output axes, then the bias row), truncated with ``np.linalg.svd`` in float64 to rank
r (layers smaller than r kept, and DepthwiseConv2D and Embedding layers), then scored
against per-example training gradients taken by pfor (not from the layer factors).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.engine import factored
from tf_influence.solvers import _kronecker

DAMPING = 0.05
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fitted(model, x, y, solver, batch_size=7):
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver=solver, damping=DAMPING)
    im.fit(x, y, batch_size=batch_size, verbose=0)
    return im


def conv_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype="float64"),
            keras.layers.Conv2D(3, 3, activation="tanh", dtype="float64", name="conv"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )


def sequence_model():
    """A Dense layer applied at 4 positions of each example (factors of 4 rows)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4, 3), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64", name="tokens"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )


def sequence_layers_model():
    """A Conv1D (5 positions) then an EinsumDense over its steps, the attention projection's
    equation (5 positions, 2 x 3 outputs), then the logits."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6, 3), dtype="float64"),
            keras.layers.Conv1D(4, 2, activation="tanh", dtype="float64", name="conv1d"),
            keras.layers.EinsumDense(
                "abc,cde->abde", (5, 2, 3), bias_axes="de", activation="tanh", dtype="float64"
            ),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )


def tokens_model():
    """An Embedding, then a DepthwiseConv2D (two outputs per channel) over its rows."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype="float64", name="embedding"),
            keras.layers.Reshape((2, 3, 3), dtype="float64"),
            keras.layers.DepthwiseConv2D(
                2, depth_multiplier=2, activation="tanh", dtype="float64", name="depthwise"
            ),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )


MODELS = {
    "mlp": (make_mlp, (4,)),
    "conv": (conv_model, (5, 5, 2)),
    "sequence": (sequence_model, (4, 3)),
    "conv1d_einsum": (sequence_layers_model, (6, 3)),
    "tokens": (tokens_model, (6,)),
}


def model_data(kind, n=24):
    rng = np.random.default_rng(3)
    build, shape = MODELS[kind]
    if kind == "tokens":
        x = rng.integers(0, 7, size=(n, *shape)).astype("int32")
    else:
        x = rng.normal(size=(n, *shape))
    return build(), x, rng.integers(0, 3, size=n)


# The layers whose queries are compressed, by exact type.
MATRIX_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
)


def output_axes(layer):
    """How many trailing kernel axes are outputs: an EinsumDense's that are not in its input."""
    if type(layer) is not keras.layers.EinsumDense:
        return 1
    inputs, kernel = layer.equation.split("->")[0].split(",")
    return sum(c not in inputs for c in kernel)


def truncated_reference(im, solutions, rank):
    """``(p, k)`` solutions with each compressed layer's part truncated to ``rank``, numpy."""
    objective = im.operator.objective
    offsets = np.concatenate([[0], np.cumsum(objective.layout.sizes)])
    position = {id(v): i for i, v in enumerate(objective.variables)}
    out = solutions.copy()
    k = solutions.shape[1]
    for layer in im.model.layers:
        if type(layer) not in MATRIX_LAYERS:
            continue  # DepthwiseConv2D, Embedding, ...: kept exact
        kernel = position[id(layer.kernel)]
        bias = None if layer.bias is None else position[id(layer.bias)]
        cols = int(np.prod(layer.kernel.shape[-output_axes(layer) :]))
        matrices = solutions[offsets[kernel] : offsets[kernel + 1]].reshape(-1, cols, k)
        if bias is not None:
            row = solutions[offsets[bias] : offsets[bias + 1]]
            matrices = np.concatenate([matrices, row[None]])
        if rank > min(matrices.shape[:2]):
            continue  # smaller than the rank: kept exact
        for i in range(k):
            u, s, vt = np.linalg.svd(matrices[:, :, i], full_matrices=False)
            matrices[:, :, i] = (u[:, :rank] * s[:rank]) @ vt[:rank]
        if bias is not None:
            out[offsets[bias] : offsets[bias + 1]] = matrices[-1]
            matrices = matrices[:-1]
        out[offsets[kernel] : offsets[kernel + 1]] = matrices.reshape(-1, k)
    return out


def training_gradients(im, x, y):
    """``(n, p)`` per-example gradients by pfor, not from the layers' factors."""
    return tfi.engine.PerExampleGradients(im.objective, "jacobian", factored=False)(x, y).numpy()


@pytest.fixture
def path(request, monkeypatch):
    """Forces the scoring of compressed layers from their factors, or from dense blocks.

    Yields the calls of the factor product seen while tracing (a fresh model per test,
    so the traces are new).
    """
    calls = []
    product = factored.FactoredGradients._low_rank_scores

    def recorded(*args):
        calls.append(args[0].entry.layer.name)
        return product(*args)

    monkeypatch.setattr(factored, "low_rank_pays", lambda *args: request.param == "factors")
    monkeypatch.setattr(factored.FactoredGradients, "_low_rank_scores", staticmethod(recorded))
    return request.param, calls


@pytest.mark.parametrize(
    ("kind", "rank", "path"),
    [
        ("mlp", 1, "factors"),
        ("mlp", 4, "dense"),
        ("conv", 2, "factors"),
        ("sequence", 2, "factors"),
        ("conv1d_einsum", 2, "factors"),
        ("conv1d_einsum", 2, "dense"),
        ("tokens", 1, "factors"),
    ],
    indirect=["path"],
)
def test_compressed_scores_equal_the_truncated_svd_reference(path, kind, rank):
    """Every kind of layer: Dense on vectors and on steps, Conv2D, Conv1D and EinsumDense
    compressed; DepthwiseConv2D (two outputs per channel, so rank 1 would change them)
    and Embedding kept exact."""
    model, x, y = model_data(kind)
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact", query_rank=rank))
    x_test, y_test = (x[:5], y[:5]) if kind == "tokens" else (x[:5] + 0.1, y[:5])
    scores = im.explain(x_test, y_test, verbose=0)
    solutions = im.inverse_hvp_tests(x_test, y_test, verbose=0).numpy()
    expected = -(training_gradients(im, x, y) @ truncated_reference(im, solutions, rank)).T
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())
    exact = -(training_gradients(im, x, y) @ solutions).T
    assert not np.allclose(scores, exact, rtol=1e-3)  # the truncation changed the scores
    ranks = im.diagnostics.info["query_ranks"]
    if kind == "tokens":
        assert ranks == {"embedding": None, "depthwise": None, "logits": 1}
    from_factors = sorted(name for name, r in ranks.items() if r is not None)
    assert sorted(set(path[1])) == (from_factors if path[0] == "factors" else [])
    top = im.top_k(x_test, y_test, k=3, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-scores, axis=1)[:, :3])


@pytest.mark.parametrize(
    ("kind", "path"), [("mlp", "factors"), ("mlp", "dense"), ("conv", "factors")], indirect=["path"]
)
def test_full_rank_queries_equal_the_exact_scores(path, kind):
    """Rank 3 = min(rows, cols) of every layer here: no truncation, the exact scores."""
    model, x, y = model_data(kind)
    if kind == "mlp":
        model = make_mlp(hidden=3)  # (4 + 1) x 3 and (3 + 1) x 3
    exact = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact", query_rank=3))
    scores = im.explain(x[:5], y[:5], verbose=0)
    assert set(im.diagnostics.info["query_ranks"].values()) == {3}
    expected = exact.explain(x[:5], y[:5], verbose=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    assert sorted(set(path[1])) == (
        sorted(im.diagnostics.info["query_ranks"]) if path[0] == "factors" else []
    )


def test_layers_smaller_than_the_rank_and_self_influence_stay_exact():
    model, x, y = model_data("mlp")
    im = fitted(model, x, y, tfi.solvers.KFAC(samples="exact", query_rank=4))
    exact = fitted(model, x, y, tfi.solvers.KFAC(samples="exact"))
    scores = im.explain(x[:4], y[:4], verbose=0)
    # hidden: (4 + 1) x 5, truncated to 4; logits: (5 + 1) x 3, of rank 3 < 4.
    assert im.diagnostics.info["query_ranks"] == {"hidden": 4, "logits": None}
    solutions = im.inverse_hvp_tests(x[:4], y[:4], verbose=0).numpy()
    expected = -(training_gradients(im, x, y) @ truncated_reference(im, solutions, 4)).T
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)
    logits = slice(25, 43)
    np.testing.assert_array_equal(truncated_reference(im, solutions, 4)[logits], solutions[logits])
    np.testing.assert_allclose(
        im.self_influence(verbose=0), exact.self_influence(verbose=0), rtol=1e-10
    )


def test_per_layer_scores_sum_to_the_compressed_total():
    x, y = model_data("mlp")[1:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64", name="hidden"),
            keras.layers.LayerNormalization(dtype="float64", name="norm"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact", query_rank=2))
    exact = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    total = im.explain(x[:4], y[:4], verbose=0)
    parts = im.explain(x[:4], y[:4], verbose=0, per_layer=True)
    assert list(parts) == ["hidden", "logits", "norm"]
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-10, atol=1e-12)
    # The diagonal parameters are not compressed: their part is the exact one.
    exact_parts = exact.explain(x[:4], y[:4], verbose=0, per_layer=True)
    np.testing.assert_allclose(parts["norm"], exact_parts["norm"], rtol=1e-10, atol=1e-14)
    assert not np.allclose(parts["hidden"], exact_parts["hidden"], rtol=1e-3)


def test_a_second_explain_does_not_trace_again():
    model, x, y = model_data("mlp")
    im = fitted(model, x, y, tfi.solvers.EKFAC(query_rank=2))
    im.explain(x[:5], y[:5], verbose=0)
    traces = im.state.gradients.tracing_count()
    im.explain(x[5:8], y[5:8], verbose=0)  # another number of test points
    assert im.state.gradients.tracing_count() == traces


def test_query_rank_above_every_layer_and_bad_arguments_are_refused():
    model, x, y = model_data("mlp")
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver=tfi.solvers.EKFAC(query_rank=6), damping=DAMPING)
    with pytest.raises(
        ValueError,
        match=r"`query_rank` is larger than every Kronecker-factored layer.*'hidden', holds "
        r"5 x 5 matrices.*rank at most 5\. Received: query_rank=6\. Pass query_rank <= 5",
    ):
        im.fit(x, y, verbose=0)
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match=r"`query_rank` must be.*Received: query_rank="):
            tfi.solvers.EKFAC(query_rank=bad)
    with pytest.raises(
        ValueError,
        match=r'`factor_dtype` must be "float64" or "float32". Received: factor_dtype=.float16.',
    ):
        tfi.solvers.KFAC(factor_dtype="float16")
    # Only layers whose queries are kept exact: nothing to compress.
    model, x, y = model_data("tokens")
    kept = [model.get_layer("embedding"), model.get_layer("depthwise")]
    im = tfi.InfluenceModel(model, loss=LOSS, params=kept)
    im.compile(solver=tfi.solvers.KFAC(query_rank=1), damping=DAMPING)
    with pytest.raises(
        ValueError,
        match=r"`query_rank` truncates the queries of Dense, EinsumDense, Conv1D and Conv2D "
        r"layers.*DepthwiseConv2D and Embedding layers keep exact queries.*"
        r"Received: query_rank=1\. Pass query_rank=None",
    ):
        im.fit(x, y, verbose=0)


def test_float32_factors_solve_as_the_float64_ones():
    model, x, y = model_data("mlp")
    solvers = [tfi.solvers.EKFAC(samples="exact", factor_dtype=d) for d in ("float64", "float32")]
    wide, narrow = (fitted(model, x, y, s) for s in solvers)
    state = narrow.settings.solver.state(narrow.operator)
    assert {t.dtype for t in state.qa + state.qs + state.values + state.diagonals} == {tf.float32}
    p = wide.operator.num_params
    identity = tf.eye(p, dtype=tf.float64)
    inverses = [im.settings.solver.solve(im.operator, identity)[0].numpy() for im in (wide, narrow)]
    # Rounding the factors to float32 (relative 6e-8) moves the inverse by about that
    # times its condition number (largest eigenvalue / damping).
    np.testing.assert_allclose(
        inverses[1], inverses[0], rtol=1e-5, atol=1e-5 * np.abs(inverses[0]).max()
    )
    assert not np.array_equal(inverses[1], inverses[0])


def test_save_load_and_config_keep_the_query_rank_and_factor_dtype(tmp_path, monkeypatch):
    model, x, y = model_data("mlp")
    solver = tfi.solvers.EKFAC(samples="exact", query_rank=2, factor_dtype="float32")
    config = tfi.solvers.serialize(solver)
    assert config["config"]["query_rank"] == 2 and config["config"]["factor_dtype"] == "float32"
    rebuilt = tfi.solvers.deserialize(config)
    assert rebuilt.get_config() == solver.get_config()
    im = fitted(model, x, y, solver)
    expected = im.explain(x[:4], y[:4], verbose=0)
    arrays = im.settings.solver.get_state(im.operator)
    assert arrays["block0_qa"].dtype == np.float32
    path = tmp_path / "state.npz"
    im.save(path, include_data=True)

    def refuse(*args):
        raise AssertionError("the factors were computed again")

    monkeypatch.setattr(_kronecker, "fit", refuse)
    loaded = tfi.InfluenceModel.load(path, model, loss=LOSS, verbose=0)
    assert loaded.settings.solver.get_config() == solver.get_config()
    state = loaded.settings.solver.state(loaded.operator)
    assert state.qa[0].dtype == tf.float32
    np.testing.assert_allclose(loaded.explain(x[:4], y[:4], verbose=0), expected, rtol=1e-10)


def test_float32_factors_of_depthwise_and_embedding_blocks_solve_and_round_trip(
    tmp_path, monkeypatch
):
    """A depthwise block's grouped eigenbases and an Embedding's eigenvalues (no ``Q_A``)
    in float32: the solve within float32 rounding of the float64 one, saved and loaded
    in float32."""
    model, x, y = model_data("tokens")
    solvers = [tfi.solvers.EKFAC(samples="exact", factor_dtype=d) for d in ("float64", "float32")]
    wide, narrow = (fitted(model, x, y, s) for s in solvers)
    state = narrow.settings.solver.state(narrow.operator)
    assert [b.entry.layer.name for b in state.blocks] == ["embedding", "depthwise", "logits"]
    assert state.qa[0] is None and state.qa[1].shape == (3, 5, 5)  # 3 channels, 2 x 2 + 1
    kept = [t for t in state.qa + state.qs + state.values + state.diagonals if t is not None]
    assert {t.dtype for t in kept} == {tf.float32}
    identity = tf.eye(wide.operator.num_params, dtype=tf.float64)
    inverses = [im.settings.solver.solve(im.operator, identity)[0].numpy() for im in (wide, narrow)]
    np.testing.assert_allclose(
        inverses[1], inverses[0], rtol=1e-5, atol=1e-5 * np.abs(inverses[0]).max()
    )
    assert not np.array_equal(inverses[1], inverses[0])
    expected = narrow.explain(x[:3], y[:3], verbose=0)
    arrays = narrow.settings.solver.get_state(narrow.operator)
    assert "block0_qa" not in arrays
    assert {a.dtype for name, a in arrays.items() if name != "num_blocks"} == {np.dtype("float32")}
    path = tmp_path / "state.npz"
    narrow.save(path, include_data=True)

    def refuse(*args):
        raise AssertionError("the factors were computed again")

    monkeypatch.setattr(_kronecker, "fit", refuse)
    loaded = tfi.InfluenceModel.load(path, model, loss=LOSS, verbose=0)
    state = loaded.settings.solver.state(loaded.operator)
    assert state.qa[0] is None
    kept = [t for t in state.qa + state.qs + state.values + state.diagonals if t is not None]
    assert {t.dtype for t in kept} == {tf.float32}
    np.testing.assert_allclose(loaded.explain(x[:3], y[:3], verbose=0), expected, rtol=1e-10)
