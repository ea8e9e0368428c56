"""Projected(fisher="true"): the Gauss-Newton matrix in the projected space, against numpy.

    F = P^T G P + damping*I,   G = (1/n) sum_j w_j J_j^T H_L,j J_j

``G`` is built from full Jacobians (``test_gauss_newton.dense_ggn``; these models
have no regulariser), ``P`` materialised by projecting the identity's columns.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, tape_gradients
from test_gauss_newton import dense_ggn, dense_ggn_parts

import tf_influence as tfi
from tf_influence.engine import PerExampleGradients
from tf_influence.engine import projection as projection_lib
from tf_influence.engine.output_draws import example_noise
from tf_influence.engine.projected_gauss_newton import DRAW_STREAM
from tf_influence.solvers import Projected

DAMPING = 0.1


def fitted(x, y, solver, damping=DAMPING, batch_size=16, model=None, **fit_args):
    model = make_mlp(l2=0.0) if model is None else model
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping)
    return im.fit(x, y, batch_size=batch_size, verbose=0, **fit_args)


def prelu_mlp():
    """Dense -> PReLU -> Dense: the PReLU's slopes have no layer factors (pfor)."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, dtype="float64"),
            keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.3), dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def projection_matrix(im):
    """``P`` as ``(p, dim)``: the projection of the identity's columns."""
    projection = im.state.index_inverse.projection
    return projection.project(tf.eye(im.num_params, dtype=tf.float64)).numpy().T


def projected_curvature(im):
    """``F - damping*I`` as the solver keeps it (its saved Gram over n)."""
    state = im.solver.get_state(im.operator)
    return state["gram"][0] / int(state["num_examples"])


@pytest.mark.parametrize(
    ("kind", "model"),
    [("kronecker", "mlp"), ("gaussian", "prelu"), ("kronecker-unfactored", "prelu")],
)
def test_full_dimension_is_the_gauss_newton_influence(blobs, kind, model, monkeypatch):
    """At dim >= p nothing is projected (P = I; the Kronecker units come first, so a
    permutation with the PReLU's slopes): with the exact expectation over the draws,
    the scores are -g_test^T inv(G + damping*I) g_j.

    "prelu": the slopes' draws by pfor; "unfactored": every gradient by pfor."""
    if kind == "kronecker-unfactored":
        monkeypatch.setattr(PerExampleGradients, "check_factored", lambda self, x, y: False)
        kind = "kronecker"
    x, y = blobs
    solver = Projected(dim=1000, projection=kind, samples="exact")
    im = fitted(x, y, solver, model=prelu_mlp() if model == "prelu" else None)
    assert im.state.index.shape == (50, im.num_params)
    matrix = projection_matrix(im)  # the identity, up to the order of the coordinates
    np.testing.assert_array_equal(matrix.T @ matrix, np.eye(im.num_params))
    ggn = dense_ggn(im.objective, x, y)
    np.testing.assert_allclose(
        projected_curvature(im), matrix.T @ ggn @ matrix, rtol=1e-9, atol=1e-12
    )
    curvature = ggn + DAMPING * np.eye(im.num_params)
    grads = tape_gradients(im.objective, x, y)
    tests = tape_gradients(im.objective, x[:6], y[:6])
    expected = -tests @ np.linalg.solve(curvature, grads.T)
    np.testing.assert_allclose(im.explain(x[:6], y[:6], verbose=0), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        im.self_influence(verbose=0),
        np.einsum("np,np->n", grads, np.linalg.solve(curvature, grads.T).T),
        rtol=1e-9,
    )


@pytest.mark.parametrize("kind", ["kronecker", "gaussian-generated"])
def test_projected_curvature_is_p_transpose_g_p(blobs, kind, monkeypatch):
    """Below p, with sample weights: F = P^T G P + damping*I (G with w_j), and the
    scores -(P^T g_test)^T inv(F) (w_j P^T g_j).

    "gaussian-generated": the dense matrix generated at each use, the curvature pass
    in steps of 96 // 3 outputs = 32 examples."""
    if kind == "gaussian-generated":
        monkeypatch.setattr(projection_lib, "MATERIALIZE_LIMIT", 0)
        monkeypatch.setattr(projection_lib, "GENERATED_PASS_VALUES", 43 * 96)
        kind = "gaussian"
    x, y = blobs
    weights = np.random.default_rng(3).uniform(0.2, 2.0, size=len(x))
    weights[7] = 0.0
    im = fitted(
        x,
        y,
        Projected(dim=20, projection=kind, seed=4, samples="exact"),
        sample_weight=weights,
    )
    matrix = projection_matrix(im)
    dim = matrix.shape[1]
    assert dim <= 20 and im.state.index.shape == (50, dim)
    reduced = matrix.T @ dense_ggn(im.objective, x, y, weights) @ matrix
    np.testing.assert_allclose(projected_curvature(im), reduced, rtol=1e-9, atol=1e-12)
    coordinates = tape_gradients(im.objective, x, y) @ matrix
    tests = tape_gradients(im.objective, x[:5], y[:5]) @ matrix
    curvature = reduced + DAMPING * np.eye(dim)
    expected = -tests @ np.linalg.solve(curvature, (coordinates * weights[:, None]).T)
    np.testing.assert_allclose(im.explain(x[:5], y[:5], verbose=0), expected, atol=1e-10)


def test_sampled_draws_follow_their_definition_whatever_the_batch_size(blobs):
    """samples=m: G ~= (1/n) sum_j (1/m) sum_d J_j^T u_jd u_jd^T J_j, u = H_L^(1/2) eps_j,
    eps_j seeded by the example's position; batches of 16 and of 7 agree."""
    x, y = blobs
    solver = Projected(dim=24, samples=3, seed=5)
    im = fitted(x, y, solver, damping="auto")
    jac, hessians = dense_ggn_parts(im.objective, x, y)
    values, vectors = np.linalg.eigh(hessians)
    roots = np.einsum("nab,nb,ncb->nac", vectors, np.sqrt(np.maximum(values, 0)), vectors)
    noise = example_noise(5, tf.range(50, dtype=tf.int64), DRAW_STREAM, [3, 3]).numpy()
    draws = np.einsum("nap,nab,nbd->npd", jac, roots, noise)  # J^T u, (n, p, m)
    sampled = np.einsum("npd,nqd->pq", draws, draws) / (3 * len(x))
    matrix = projection_matrix(im)
    expected = matrix.T @ sampled @ matrix
    # H_L is singular (softmax): the root of its zero eigenvalue is sqrt(rounding),
    # about 1e-8 of the largest entry in either computation (seen at 1.2e-7 relative
    # on small entries on one CPU), so the tolerance is relative to the largest.
    np.testing.assert_allclose(
        projected_curvature(im), expected, rtol=1e-7, atol=1e-6 * np.abs(expected).max()
    )
    # damping="auto": ten times the mean eigenvalue of P^T G P.
    np.testing.assert_allclose(
        im.damping, 10 * np.trace(matrix.T @ sampled @ matrix) / matrix.shape[1], rtol=1e-7
    )
    # The same up to rounding: H_L is singular (softmax), so its root's smallest
    # direction holds sqrt(rounding) ~ 1e-8.
    again = fitted(x, y, Projected(dim=24, samples=3, seed=5), damping="auto", batch_size=7)
    np.testing.assert_allclose(projected_curvature(again), projected_curvature(im), rtol=1e-6)
    other = fitted(x, y, Projected(dim=24, samples=3, seed=6), damping="auto")
    assert not np.allclose(projected_curvature(other), projected_curvature(im), rtol=1e-3)


def test_save_load_and_config_keep_the_curvature(blobs, tmp_path):
    x, y = blobs
    im = fitted(x, y, Projected(dim=30, seed=2, samples=2))
    config = im.solver.get_config()
    assert config["fisher"] == "true" and config["samples"] == 2
    assert Projected.from_config(config).get_config() == config
    scores = im.explain(x[:5], y[:5], verbose=0)
    im.save(tmp_path / "state.npz", include_data=True)
    loaded = tfi.InfluenceModel.load(tmp_path / "state.npz", im.model, verbose=0)
    assert loaded.get_compile_config() == im.get_compile_config()
    np.testing.assert_allclose(projected_curvature(loaded), projected_curvature(im))
    np.testing.assert_allclose(loaded.explain(x[:5], y[:5], verbose=0), scores, atol=1e-12)
    # The empirical Fisher on the same index is another curvature, kept apart.
    empirical = fitted(x, y, Projected(dim=30, seed=2, fisher="empirical"))
    np.testing.assert_allclose(empirical.state.index, im.state.index)
    assert not np.allclose(projected_curvature(empirical), projected_curvature(im), rtol=1e-2)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fisher": "sampled"}, r"`fisher` must be \"true\" or \"empirical\".*fisher='sampled'"),
        ({"samples": 0}, r"`samples` must be a positive integer or \"exact\".*samples=0"),
        ({"samples": "all"}, r"`samples` must be .*samples='all'"),
        ({"samples": True}, r"`samples` must be .*samples=True"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        Projected(**arguments)
