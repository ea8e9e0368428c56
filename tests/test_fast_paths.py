"""The fast paths (forward-mode scoring, streaming top-k, memmap output, cache, subsampled
CG) give the same numbers as the reference paths."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi


def fitted(model, x, y, **compile_args):
    im = tfi.InfluenceModel(model)
    im.compile(**{"solver": "exact", "damping": 0.5, **compile_args})
    im.fit(x, y, batch_size=16, verbose=0)
    return im


@pytest.mark.parametrize("num_tests", [1, 3, 12])
def test_jvp_and_jacobian_scoring_agree(mlp, blobs, num_tests):
    x, y = blobs
    jvp = fitted(mlp, x, y, scoring="jvp").explain(x[:num_tests], y[:num_tests], verbose=0)
    jac = fitted(mlp, x, y, scoring="jacobian").explain(x[:num_tests], y[:num_tests], verbose=0)
    np.testing.assert_allclose(jvp, jac, rtol=1e-9, atol=1e-12)


class TwoInputs(keras.Model):
    """Dict inputs, a Conv1D branch, and a layer the loss never reaches (no gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv1D(2, 2, dtype="float64")
        self.dense = keras.layers.Dense(3, dtype="float64")
        self.unused = keras.layers.Dense(2, dtype="float64")
        self.unused.build((None, 1))

    def call(self, inputs):
        seq = keras.ops.reshape(self.conv(inputs["seq"]), (-1, 4))
        return self.dense(keras.ops.concatenate([seq, inputs["flat"]], axis=1))


def test_per_example_gradients_equal_one_tape_per_example():
    keras.utils.set_random_seed(0)
    model = TwoInputs()
    rng = np.random.default_rng(1)
    x = {"seq": rng.normal(size=(6, 3, 1)), "flat": rng.normal(size=(6, 2))}
    model(x)
    y = rng.integers(0, 3, size=6)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    objective = tfi.engine.Objective(model, loss=loss)
    batched = tfi.engine.PerExampleGradients(objective)(x, tf.constant(y)).numpy()
    for j in range(6):
        xj = {k: tf.constant(v[j : j + 1]) for k, v in x.items()}
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(objective.per_example_loss(xj, tf.constant(y[j : j + 1])))
        expected = objective.layout.flatten(tape.gradient(value, objective.variables)).numpy()
        np.testing.assert_allclose(batched[j], expected, rtol=1e-12, atol=1e-14)
    unused = sum(int(np.prod(v.shape)) for v in model.unused.trainable_variables)
    assert unused and np.all(batched[:, -unused:] == 0)
    solutions = tf.constant(rng.normal(size=(objective.num_params, 4)))
    for mode in ("jacobian", "jvp"):
        scores, finite = tfi.engine.PerExampleGradients(objective, mode).scores(
            x, tf.constant(y), solutions
        )
        np.testing.assert_allclose(scores.numpy(), -(batched @ solutions.numpy()).T, rtol=1e-10)
        assert finite.numpy().all()


def test_auto_scoring_picks_by_number_of_tests(mlp):
    # Without factored layers (factored scoring would win at any number of tests).
    gradients = tfi.engine.PerExampleGradients(tfi.engine.Objective(mlp), factored=False)
    assert gradients.mode_for(1) == "jvp"
    assert gradients.mode_for(500) == "jacobian"


def test_fast_paths_together_equal_reference(mlp, blobs):
    x, y = blobs
    reference = fitted(
        mlp, x, y, solver="cg", hvp="reverse_over_reverse", scoring="jacobian"
    ).explain(x[:5], y[:5], verbose=0)
    fast = fitted(
        mlp, x, y, solver="cg", hvp="forward_over_reverse", scoring="jvp", jit_compile=True
    )
    np.testing.assert_allclose(fast.explain(x[:5], y[:5], verbose=0), reference, rtol=1e-6)


def test_top_k_streaming_equals_full_ranking(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y)
    scores = im.explain(x[:6], y[:6], verbose=0)
    top = im.explain(x[:6], y[:6], top_k=7, verbose=0)
    assert isinstance(top, tfi.TopK)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(scores, axis=1)[:, :7])
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-scores, axis=1)[:, :7])
    np.testing.assert_allclose(top.harmful_scores, -np.sort(-scores, axis=1)[:, :7])


def test_output_file_equals_in_memory(mlp, blobs, tmp_path):
    x, y = blobs
    im = fitted(mlp, x, y)
    scores = im.explain(x[:4], y[:4], verbose=0)
    path = tmp_path / "scores.npy"
    written = im.explain(x[:4], y[:4], output=path, verbose=0)
    assert isinstance(written, np.memmap) and written.shape == (4, 50)
    np.testing.assert_array_equal(np.load(path), scores)
    with pytest.raises(ValueError, match=r"`output` must be a path ending in .npy"):
        im.explain(x[:4], y[:4], output=tmp_path / "scores.csv", verbose=0)
    with pytest.raises(ValueError, match=r"`top_k` and `output` cannot be combined"):
        im.explain(x[:4], y[:4], output=path, top_k=3, verbose=0)


def test_second_explain_reuses_solutions(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y, solver="cg")
    calls = []
    solve = im.solver.solve
    im.solver.solve = lambda *args: calls.append(1) or solve(*args)
    first = im.explain(x[:5], y[:5], verbose=0)
    assert len(calls) == 1
    np.testing.assert_array_equal(im.explain(x[:5], y[:5], verbose=0), first)
    assert len(calls) == 1  # cached
    im.explain(x[:5], (y[:5] + 1) % 3, verbose=0)  # other labels: a new solve
    assert len(calls) == 2
    im.compile(im.solver, damping=0.7)  # new curvature: the cache is cleared
    im.explain(x[:5], y[:5], verbose=0)
    assert len(calls) == 3


def test_subsampled_cg_solves_the_subsampled_system(mlp, blobs):
    x, y = blobs
    solver = tfi.solvers.CG(tol=1e-10, hessian_sample_size=25, seed=1)
    im = fitted(mlp, x, y, solver=solver)
    rhs = tf.constant(np.random.default_rng(0).normal(size=(im.num_params, 2)))
    solution, _ = solver.solve(im.operator, rhs)
    sub = im.operator.subsample(25, seed=1)
    np.testing.assert_allclose(
        solution.numpy(), np.linalg.solve(sub.dense().numpy(), rhs.numpy()), rtol=1e-7
    )
    # With the whole data as the sample it is plain CG.
    full = tfi.solvers.CG(tol=1e-10, hessian_sample_size=50).solve(im.operator, rhs)[0]
    np.testing.assert_allclose(full.numpy(), np.linalg.solve(im.operator.dense(), rhs), rtol=1e-7)
