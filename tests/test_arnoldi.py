"""The low-rank Arnoldi solver against the dense eigendecomposition, and its index."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData
from tf_influence.solvers import Arnoldi, CurvatureError


@pytest.fixture
def operator(mlp, blobs):
    x, y = blobs
    return HessianOperator(tfi.engine.Objective(mlp), ExampleData(x, y, 16), damping=0.5)


def dense_eigen(operator):
    values, vectors = np.linalg.eigh(operator.dense().numpy())
    return values[::-1], vectors[:, ::-1]


def test_top_eigenvalues_match_the_dense_hessian(operator):
    values, _ = dense_eigen(operator)
    found, vectors = Arnoldi(rank=5, iterations=20).eigenpairs(operator)
    np.testing.assert_allclose(found.numpy()[:3], values[:3], rtol=1e-6)
    np.testing.assert_allclose(found.numpy(), values[:5], rtol=1e-3)
    np.testing.assert_allclose(vectors.numpy().T @ vectors.numpy(), np.eye(5), atol=1e-10)
    exact, _ = Arnoldi(rank=5, iterations=operator.num_params).eigenpairs(operator)
    np.testing.assert_allclose(exact.numpy(), values[:5], rtol=1e-12)


def test_solve_is_the_rank_r_inverse(operator):
    values, vectors = dense_eigen(operator)
    rhs = np.random.default_rng(2).normal(size=(operator.num_params, 3))
    solution, diagnostics = Arnoldi(rank=5, iterations=operator.num_params).solve(
        operator, tf.constant(rhs)
    )
    expected = vectors[:, :5] @ ((vectors[:, :5].T @ rhs) / values[:5, None])
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert diagnostics.info["rank"] == 5 and diagnostics.residual_norm.shape == (3,)
    # The reported residual is the true one, |A x - b| / |b|, without a Hessian product.
    dense = operator.dense().numpy()
    true = np.linalg.norm(dense @ solution.numpy() - rhs, axis=0) / np.linalg.norm(rhs, axis=0)
    np.testing.assert_allclose(diagnostics.residual_norm, true, rtol=1e-8)


def test_influence_model_with_arnoldi_uses_the_index(mlp, blobs):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver=Arnoldi(rank=8, iterations=43), damping=0.5)
    im.fit(x, y, batch_size=16, verbose=0)
    assert im.state.index.shape == (50, 8)
    scores = im.explain(x[:4], y[:4], verbose=0)
    values, vectors = dense_eigen(im.operator)
    g_test, g_train = im.state.gradients(x[:4], y[:4]).numpy(), im.state.gradients(x, y).numpy()
    low_rank = vectors[:, :8] @ np.diag(1 / values[:8]) @ vectors[:, :8].T
    np.testing.assert_allclose(scores, -g_test @ low_rank @ g_train.T, rtol=1e-8, atol=1e-12)
    self_influence = im.self_influence(verbose=0)
    np.testing.assert_allclose(
        self_influence, np.einsum("ip,pq,iq->i", g_train, low_rank, g_train), rtol=1e-8
    )
    top = im.top_k(x[:4], y[:4], k=3, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-scores, axis=1)[:, :3])


def test_full_rank_on_a_convex_model_equals_exact(blobs):
    x, y = blobs
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(3, dtype="float64", kernel_regularizer=keras.regularizers.L2(0.1)),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    for name, solver in (("exact", "exact"), ("arnoldi", Arnoldi(rank=15, iterations=15))):
        im = tfi.InfluenceModel(model, loss=loss)
        im.compile(solver=solver, damping=1e-3)
        results[name] = im.fit(x, y, verbose=0).explain(x[:5], y[:5], verbose=0)
    np.testing.assert_allclose(results["arnoldi"], results["exact"], rtol=1e-7, atol=1e-10)


def test_arnoldi_errors_and_config(blobs):
    with pytest.raises(ValueError, match=r"`rank` must be a positive integer. Received: rank=0"):
        Arnoldi(rank=0)
    with pytest.raises(ValueError, match=r"`iterations` must be at least `rank`"):
        Arnoldi(rank=10, iterations=5)
    solver = Arnoldi(rank=7, iterations=30, seed=3)
    assert Arnoldi.from_config(solver.get_config()).get_config() == solver.get_config()
    assert isinstance(tfi.solvers.get("arnoldi"), Arnoldi)
    x, y = blobs
    model = make_mlp(l2=0.0, seed=1)  # untrained: indefinite
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    operator = HessianOperator(tfi.engine.Objective(model, loss=loss), ExampleData(x, y, 16))
    with pytest.raises(CurvatureError, match=r"Arnoldi kept an eigenvalue .* <= 0.*damping="):
        Arnoldi(rank=43, iterations=43).eigenpairs(operator)


class DenseOperator:
    """``v -> (matrix + damping*I) v`` for a dense matrix: the members Arnoldi uses."""

    def __init__(self, matrix, damping=0.0, dtype=tf.float64):
        self.num_params = matrix.shape[0]
        self.dtype = dtype
        self.damping = float(damping)
        self.matrix = tf.constant(matrix + damping * np.eye(self.num_params), dtype)
        self._cache = {}

    def matvec(self, vectors):
        return tf.matmul(self.matrix, vectors)

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def rotated(values, seed=0):
    """``Q diag(values) Q^T`` with a seeded random orthogonal ``Q``."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(values), len(values))))
    return (q * values) @ q.T


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
@pytest.mark.parametrize("damping", [0.0, 1000.0])
def test_rank_and_eigenvalues_do_not_depend_on_the_scale(dtype, scale, damping):
    # A spectrum from 1 down to 1e-3, times `scale`: the iteration never meets an
    # invariant subspace in 30 steps, so every scale and damping keeps all 10 pairs.
    # (A threshold in absolute numbers stops small operators after one step, and one
    # relative to the damped products stops early under a large damping.)
    values = np.geomspace(1.0, 1e-3, 60)
    operator = DenseOperator(rotated(values) * scale, damping * scale, dtype)
    found, vectors = Arnoldi(rank=10, iterations=30).eigenpairs(operator)
    assert found.shape == (10,) and vectors.shape == (60, 10)
    # Rounding of the damped products costs the float32 Ritz values about eps * damping.
    rtol, atol = (1e-6, 1e-12 * damping) if dtype == tf.float64 else (2e-3, 1e-5 * damping)
    np.testing.assert_allclose(found.numpy() / scale - damping, values[:10], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("scale", [1e-6, 1.0])
def test_an_invariant_subspace_ends_the_iteration(dtype, scale):
    # Rank 4 plus damping: 5 distinct eigenvalues, so the Krylov space of any start
    # vector is 5-dimensional. Asked for 8 pairs, Arnoldi stops after 5 products and
    # keeps those 5, each an exact eigenpair (the last one the damping's).
    values = np.zeros(40)
    values[:4] = [5.0, 3.0, 2.0, 1.0]
    damping = 0.25
    matrix = rotated(values, seed=1) * scale
    found, vectors = Arnoldi(rank=8, iterations=16).eigenpairs(
        DenseOperator(matrix, damping * scale, dtype)
    )
    expected = np.array([5.25, 3.25, 2.25, 1.25, 0.25])
    rtol = 1e-10 if dtype == tf.float64 else 1e-5
    np.testing.assert_allclose(found.numpy() / scale, expected, rtol=rtol)
    v = vectors.numpy().astype(np.float64)
    dense = matrix + damping * scale * np.eye(40)
    np.testing.assert_allclose(dense @ v, v * found.numpy(), atol=30 * rtol * scale)
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=30 * rtol)
