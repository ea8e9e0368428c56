"""The Projected solver against dense numpy: the empirical-Fisher influence, projected.

``fisher="empirical"`` throughout (the Gauss-Newton curvature, the default, is
checked in ``test_projected_gauss_newton.py``).

References are computed here from per-example gradients taken one example at a
time with a tape, and, below ``num_params`` dimensions, from the dense ``P``
(checked against ``np.kron`` and the JL generator in ``test_projection.py``).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, tape_gradients

import tf_influence as tfi
from tf_influence.engine import projection as projection_lib
from tf_influence.solvers import CurvatureError, Projected

DAMPING = 0.1


def fitted(blobs, solver, damping=DAMPING, **fit_args):
    x, y = blobs
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping)
    return im.fit(x, y, batch_size=16, verbose=0, **fit_args)


def projection_matrix(im):
    """``P`` as ``(p, dim)``: the projection of the identity's columns."""
    projection = im.state.index_inverse.projection
    return projection.project(tf.eye(im.num_params, dtype=tf.float64)).numpy().T


@pytest.mark.parametrize("kind", ["kronecker", "gaussian", "rademacher"])
def test_full_dimension_is_the_empirical_fisher_influence(blobs, kind):
    """At dim >= p nothing is projected (P = I, orthogonal): the scores are the
    influence with the curvature G^T G / n + damping*I, formed densely."""
    x, y = blobs
    im = fitted(blobs, Projected(dim=1000, projection=kind, fisher="empirical"))
    assert im.state.index.shape == (50, im.num_params)
    grads = tape_gradients(im.objective, x, y)
    tests = tape_gradients(im.objective, x[:6], y[:6])
    fisher = grads.T @ grads / len(x) + DAMPING * np.eye(im.num_params)
    expected = -tests @ np.linalg.solve(fisher, grads.T)
    scores = im.explain(x[:6], y[:6], verbose=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        im.self_influence(verbose=0),
        np.einsum("np,np->n", grads, np.linalg.solve(fisher, grads.T).T),
        rtol=1e-9,
    )
    top = im.top_k(x[:6], y[:6], k=4, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-expected, axis=1)[:, :4])
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(expected, axis=1)[:, :4])
    assert im.diagnostics.info["index_dim"] == im.num_params


@pytest.mark.parametrize("kind", ["kronecker", "gaussian", "gaussian-generated"])
def test_projected_scores_with_sample_weights(blobs, kind, monkeypatch):
    """Below p: -(P^T g_test)^T inv(sum_j w_j Phi_j Phi_j^T / n + damping) (w_j P^T g_j).

    "gaussian-generated": the dense matrix generated at each use, the index built in
    passes of 40 examples (batches of 16)."""
    if kind == "gaussian-generated":
        monkeypatch.setattr(projection_lib, "MATERIALIZE_LIMIT", 0)
        monkeypatch.setattr(projection_lib, "GENERATED_PASS_VALUES", 43 * 40)
        kind = "gaussian"
    x, y = blobs
    weights = np.random.default_rng(3).uniform(0.2, 2.0, size=len(x))
    weights[7] = 0.0  # a weight of zero: out of the curvature and of the scores
    im = fitted(
        blobs,
        Projected(dim=20, projection=kind, seed=4, fisher="empirical"),
        sample_weight=weights,
    )
    generated = im.state.index_inverse.projection.rows_per_pass
    assert generated == (40 if projection_lib.MATERIALIZE_LIMIT == 0 else None)
    matrix = projection_matrix(im)
    dim = matrix.shape[1]
    assert dim <= 20 and im.state.index.shape == (50, dim)
    coordinates = tape_gradients(im.objective, x, y) @ matrix  # unweighted P^T g_j
    tests = tape_gradients(im.objective, x[:5], y[:5]) @ matrix
    fisher = (coordinates.T * weights) @ coordinates / len(x) + DAMPING * np.eye(dim)
    expected = -tests @ np.linalg.solve(fisher, (coordinates * weights[:, None]).T)
    np.testing.assert_allclose(im.explain(x[:5], y[:5], verbose=0), expected, atol=1e-10)
    quadratic = np.einsum("nd,nd->n", coordinates, np.linalg.solve(fisher, coordinates.T).T)
    np.testing.assert_allclose(im.self_influence(verbose=0), weights * quadratic, atol=1e-10)
    # The solutions in parameter space score the training data the same way.
    solutions = im.inverse_hvp_tests(x[:5], y[:5], verbose=0).numpy()
    weighted = tape_gradients(im.objective, x, y) * weights[:, None]
    np.testing.assert_allclose(-solutions.T @ weighted.T, expected, atol=1e-10)


def test_auto_damping_is_ten_times_the_projected_mean_eigenvalue(blobs):
    x, y = blobs
    im = fitted(blobs, Projected(dim=24, fisher="empirical"), damping="auto")
    coordinates = tape_gradients(im.objective, x, y) @ projection_matrix(im)
    mean = np.trace(coordinates.T @ coordinates / len(x)) / coordinates.shape[1]
    np.testing.assert_allclose(im.damping, 10 * mean, rtol=1e-10)
    assert im.curvature == "gauss_newton"


def test_target_output_file_and_save_load(blobs, tmp_path):
    x, y = blobs
    im = fitted(blobs, Projected(dim=30, seed=2, fisher="empirical"))
    matrix = projection_matrix(im)
    coordinates = tape_gradients(im.objective, x, y) @ matrix
    fisher = coordinates.T @ coordinates / len(x) + DAMPING * np.eye(matrix.shape[1])

    def logit(model, inputs):
        return model(inputs)[:, 1]

    with tf.GradientTape(persistent=True) as tape:
        values = logit(im.model, x[:3])
        parts = [values[i] for i in range(3)]
    targets = np.array(
        [im.objective.layout.flatten(tape.gradient(v, im.objective.variables)) for v in parts]
    )
    expected = -(targets @ matrix) @ np.linalg.solve(fisher, coordinates.T)
    np.testing.assert_allclose(im.explain(x[:3], target=logit, verbose=0), expected, atol=1e-10)
    scores = im.explain(x[:5], y[:5], verbose=0)
    written = im.explain(x[:5], y[:5], output=str(tmp_path / "scores.npy"), verbose=0)
    np.testing.assert_allclose(np.asarray(written), scores, atol=1e-12)
    im.save(tmp_path / "state.npz", include_data=True)
    loaded = tfi.InfluenceModel.load(tmp_path / "state.npz", im.model, verbose=0)
    assert loaded.get_compile_config() == im.get_compile_config()
    np.testing.assert_allclose(loaded.explain(x[:5], y[:5], verbose=0), scores, atol=1e-12)
    np.testing.assert_allclose(loaded.self_influence(verbose=0), im.self_influence(verbose=0))


def test_a_second_explain_does_not_retrace(blobs):
    x, y = blobs
    im = fitted(blobs, Projected(dim=30))
    projector = im.solver.projector(im.operator)
    im.explain(x[:5], y[:5], verbose=0)
    assert projector.tracing_count() == 1  # the index pass and the test points share it

    def count():
        return tfi.engine.compile.tracing_count() + projector.tracing_count()

    before = count()
    im.explain(x[10:14], y[10:14], verbose=0)
    im.self_influence(verbose=0)
    assert count() == before


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dim": 0}, r"`dim` must be a positive integer. Received: dim=0"),
        ({"dim": 2.5}, r"`dim` must be a positive integer. Received: dim=2.5"),
        ({"dim": True}, r"`dim` must be a positive integer. Received: dim=True"),
        ({"projection": "fourier"}, r"`projection` must be one of .*projection='fourier'"),
        ({"seed": 1.5}, r"`seed` must be an integer. Received: seed=1.5"),
        ({"checkpoints": []}, r"`checkpoints` holds no member"),
        ({"checkpoints": 3}, r"`checkpoints` must be a TracInCheckpoints .* Received"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        Projected(**arguments)


def test_singular_projected_curvature_suggests_a_damping(blobs):
    """dim 43 > 20 training examples and no damping: Phi^T Phi is singular."""
    x, y = blobs
    with pytest.raises(CurvatureError, match=r"not positive definite.*damping=0.0.*damping="):
        fitted((x[:20], y[:20]), Projected(dim=1000), damping=0.0)
    with pytest.raises(ValueError, match=r"approximates the 'gauss_newton' curvature"):
        tfi.InfluenceModel(make_mlp(), loss="mse").compile(solver=Projected(), curvature="hessian")


@pytest.mark.parametrize("members", [1, 3])
def test_index_inverse_of_a_cholesky_factor_equals_the_inverse(members):
    # `IndexInverse(cholesky=L)` applies inv(L L^T) by triangular solves: the same
    # products as the explicit inverse, block by block for an ensemble's members.
    rng = np.random.default_rng(0)
    d, k = 6, 4
    halves = rng.normal(size=(members, d, d))
    matrices = halves @ np.transpose(halves, (0, 2, 1)) + 0.1 * np.eye(d)
    factors = np.linalg.cholesky(matrices)
    coordinates = tf.constant(rng.normal(size=(members * d, k)))
    dense = np.zeros((members * d, members * d))
    for m in range(members):
        dense[m * d : (m + 1) * d, m * d : (m + 1) * d] = np.linalg.inv(matrices[m])
    projection = tfi.solvers.Projection(members * d, members=members)
    squeeze = (lambda a: a[0]) if members == 1 else (lambda a: a)
    spec = tfi.solvers.IndexInverse(projection, cholesky=tf.constant(squeeze(factors)))
    expected = dense @ coordinates.numpy()
    np.testing.assert_allclose(spec.apply(coordinates).numpy(), expected, rtol=1e-9)
    quadratic = np.einsum("ik,ik->k", coordinates.numpy(), expected)
    np.testing.assert_allclose(spec.quadratic(coordinates).numpy(), quadratic, rtol=1e-9)
    explicit = tfi.solvers.IndexInverse(projection, tf.constant(squeeze(np.linalg.inv(matrices))))
    np.testing.assert_allclose(explicit.apply(coordinates).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(explicit.quadratic(coordinates).numpy(), quadratic, rtol=1e-9)
    with pytest.raises(ValueError, match=r"exactly one of `inverse` and `cholesky`.*None"):
        tfi.solvers.IndexInverse(projection)
