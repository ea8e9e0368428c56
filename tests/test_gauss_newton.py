"""curvature="gauss_newton": the generalised Gauss-Newton matrix against dense references.

    G = (1/n) sum_j J_j^T H_L,j J_j + hessian(Omega)

References are built in float64 with full-batch tapes: ``J_j`` by ``tape.jacobian``
of the outputs, ``H_L,j`` by a batch Jacobian of the loss gradient on the outputs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian, make_mlp

import tf_influence as tfi
from tf_influence.engine import ExampleData, Objective
from tf_influence.engine.curvature import make_operator
from tf_influence.engine.gauss_newton import GaussNewtonOperator


def dense_ggn(objective, x, y, sample_weight=None):
    """``(1/n) sum_j w_j J_j^T H_L,j J_j + hessian(Omega)`` from full Jacobians, float64.

    ``w_j``: ``sample_weight`` (1 without), the weight of example j's loss."""
    jac, loss_hessians = dense_ggn_parts(objective, x, y)
    if sample_weight is not None:
        loss_hessians = loss_hessians * np.asarray(sample_weight)[:, None, None]
    ggn = np.einsum("nap,nab,nbq->pq", jac, loss_hessians, jac) / len(jac)
    # hessian(Omega) of the L2 regularisers these tests use: 2 * l2 on the kernel's entries.
    diagonal = []
    for variable in objective.variables:
        regularizer = getattr(variable, "regularizer", None)
        l2 = 0.0 if regularizer is None else regularizer.get_config()["l2"]
        diagonal.append(np.full(int(np.prod(variable.shape)), 2.0 * l2))
    ggn += np.diag(np.concatenate(diagonal))
    return ggn


def dense_ggn_parts(objective, x, y):
    """``(J (n, outputs, p), H_L (n, outputs, outputs))`` per example, float64."""
    variables = objective.variables
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        outputs = objective.predict(x)
    n, o = outputs.shape
    jac = tape.jacobian(outputs, variables)  # per variable (n, o, *shape)
    jac = tf.concat([tf.reshape(j, [n, o, -1]) for j in jac], axis=2).numpy()  # (n, o, p)
    z = tf.constant(outputs.numpy())
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            total = tf.reduce_sum(objective.loss_from_outputs(z, tf.constant(y)))
        grad = inner.gradient(total, z)
    return jac, outer.batch_jacobian(grad, z).numpy()


def _operator(model, x, y, loss=None, damping=0.0, batch_size=7, **kwargs):
    objective = Objective(model, loss=loss)
    data = ExampleData(x, y, batch_size)
    return make_operator("gauss_newton", objective, data, damping, **kwargs), objective


def _linear(num_outputs, activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(
                num_outputs,
                activation=activation,
                dtype="float64",
                kernel_regularizer=keras.regularizers.L2(0.01),
            ),
        ]
    )


def _data(n=30, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.integers(0, classes, size=n)


CANONICAL = {
    "sparse_softmax": (3, None, lambda: keras.losses.SparseCategoricalCrossentropy(True)),
    "one_hot_softmax": (3, None, lambda: keras.losses.CategoricalCrossentropy(True)),
    "sigmoid_bce": (1, None, lambda: keras.losses.BinaryCrossentropy(from_logits=True)),
    "mse": (2, None, lambda: keras.losses.MeanSquaredError()),
}


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_equals_the_hessian_for_linear_models_with_canonical_losses(name):
    """Outputs linear in the parameters (and the canonical link): G == H."""
    outputs, activation, loss = CANONICAL[name]
    x, labels = _data()
    rng = np.random.default_rng(1)
    y = {
        "sparse_softmax": labels,
        "one_hot_softmax": np.eye(3)[labels],
        "sigmoid_bce": (labels > 0).astype("float64"),
        "mse": rng.normal(size=(30, 2)),
    }[name]
    model = _linear(outputs, activation)
    operator, objective = _operator(model, x, y, loss=loss())
    hessian = dense_hessian(objective, tf.constant(x), tf.constant(y))
    np.testing.assert_allclose(operator.dense().numpy(), hessian, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("hvp", ["reverse_over_reverse", "forward_over_reverse"])
def test_equals_a_dense_jacobian_reference_on_a_tanh_mlp(blobs, mlp, hvp):
    x, y = blobs
    operator, objective = _operator(mlp, x, y, damping=0.3, hvp=hvp)
    reference = dense_ggn(objective, x, y) + 0.3 * np.eye(objective.num_params)
    np.testing.assert_allclose(operator.dense().numpy(), reference, atol=1e-10, rtol=1e-8)
    # One column and a block of columns take different paths (no pfor for k = 1).
    v = np.random.default_rng(2).normal(size=(objective.num_params, 3))
    np.testing.assert_allclose(operator.matvec(v[:, 0]).numpy(), reference @ v[:, 0], atol=1e-10)
    np.testing.assert_allclose(operator.matvec(v).numpy(), reference @ v, atol=1e-10)
    batch = (tf.constant(x[:9]), tf.constant(y[:9]))
    small = dense_ggn(objective, x[:9], y[:9]) + 0.3 * np.eye(objective.num_params)
    np.testing.assert_allclose(
        operator.batch_matvec(v, batch).numpy(), small @ v, atol=1e-10, rtol=1e-8
    )


def test_is_positive_semi_definite_where_the_hessian_is_not():
    """A non-converged MLP (random weights): H has negative eigenvalues, G none."""
    x, y = _data(40, seed=3)
    model = make_mlp(hidden=6, l2=0.0, seed=4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    operator, objective = _operator(model, x, y, loss=loss)
    hessian = dense_hessian(objective, tf.constant(x), tf.constant(y))
    assert np.linalg.eigvalsh(hessian)[0] < -1e-4  # the test could fail
    values = np.linalg.eigvalsh(operator.dense().numpy())
    assert values[0] >= -1e-10
    assert isinstance(operator, GaussNewtonOperator) and operator.positive_semidefinite


def test_traces_are_not_shared_with_the_hessian(blobs, mlp):
    x, y = blobs
    ggn, _ = _operator(mlp, x, y)
    hessian = make_operator("hessian", Objective(mlp), ExampleData(x, y, 7))
    assert ggn.trace_key != hessian.trace_key and ggn.trace_key[0] == "gauss_newton"
    assert not np.allclose(ggn.dense().numpy(), hessian.dense().numpy())


def test_subsample_keeps_the_curvature(blobs, mlp):
    x, y = blobs
    operator, _ = _operator(mlp, x, y)
    assert isinstance(operator.subsample(20, seed=1), GaussNewtonOperator)


def _negative_mse(y_true, y_pred):
    return -tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def test_a_loss_that_is_not_convex_in_the_outputs_is_refused():
    x, _ = _data()
    y = np.random.default_rng(0).normal(size=(30, 2))
    model = _linear(2)
    with pytest.raises(ValueError, match=r"_negative_mse.*curvature=\"hessian\""):
        _operator(model, x, y, loss=_negative_mse)
    im = tfi.InfluenceModel(model, loss=_negative_mse)
    im.compile(solver="exact", damping=1.0, curvature="gauss_newton")
    with pytest.raises(ValueError, match="positive semi-definite"):
        im.fit(x, y, verbose=0)


def test_unknown_curvature_name():
    with pytest.raises(ValueError, match=r"curvature.*'hessian', 'gauss_newton'.*Received"):
        tfi.InfluenceModel(make_mlp(), loss="mse").compile(curvature="fisher")


SOLVERS = {
    "exact": (lambda: "exact", 1e-8),
    "cg": (lambda: tfi.solvers.CG(tol=1e-10), 1e-6),
    "arnoldi": (lambda: tfi.solvers.Arnoldi(rank=43, iterations=43), 1e-6),
    # Stochastic: held to its own tolerance (0.1 relative error).
    "lissa": (
        lambda: tfi.solvers.LiSSA(recursion_depth=400, num_repeats=4, batch_size=25, seed=0),
        0.1,
    ),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_solves_the_gauss_newton_system(blobs, mlp, name):
    x, y = blobs
    make, tolerance = SOLVERS[name]
    im = tfi.InfluenceModel(mlp)
    im.compile(solver=make(), damping=0.1, curvature="gauss_newton")
    im.fit(x, y, batch_size=10, verbose=0)
    assert im.num_params == 43 and im.curvature == "gauss_newton"
    tests = (x[:4] + 0.1, y[:4])
    grads = im.state.test_gradient_matrix(*tests).numpy().T  # (p, 4)
    matrix = dense_ggn(im.objective, x, y) + 0.1 * np.eye(43)
    expected = np.linalg.solve(matrix, grads)
    solution = im.inverse_hvp_tests(*tests, verbose=0).numpy()
    error = np.linalg.norm(solution - expected, axis=0) / np.linalg.norm(expected, axis=0)
    assert error.max() < tolerance, error
    info = im.diagnostics.info
    assert info["curvature"] == "gauss_newton" and info["damping"] == 0.1


def test_save_and_load_with_auto_damping_give_identical_scores(blobs, mlp, tmp_path):
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver="exact", damping="auto", curvature="gauss_newton")
    assert im.damping == "auto"
    im.fit(x, y, batch_size=10, verbose=0)
    assert isinstance(im.damping, float) and im.damping > 0
    tests = (x[:3] + 0.2, y[:3])
    scores = im.explain(*tests, verbose=0)
    path = str(tmp_path / "state.npz")
    im.save(path)
    loaded = tfi.InfluenceModel.load(path, mlp, x, y, verbose=0)
    assert loaded.curvature == "gauss_newton" and loaded.damping == im.damping
    assert loaded.state.spectrum is None  # not estimated again
    np.testing.assert_array_equal(loaded.explain(*tests, verbose=0), scores)
    assert loaded.get_compile_config()["curvature"] == "gauss_newton"


def test_the_resume_fingerprint_changes_with_the_curvature(blobs, mlp):
    x, y = blobs
    digests = []
    for curvature in ("hessian", "gauss_newton"):
        im = tfi.InfluenceModel(mlp)
        im.compile(solver="cg", damping=0.1, curvature=curvature)
        im.fit(x, y, verbose=0)
        tests = im.state.test_data(x[:2], y[:2])
        digests.append(im.state.fingerprints(tests, {})["solver settings"])
    assert digests[0] != digests[1]


def test_mirrored_strategy_matches_one_device(strategy):
    x, y = _data(50)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = make_mlp()
    plain.compile(loss=loss)
    with strategy.scope():
        mirrored = make_mlp()
        mirrored.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mirrored.set_weights(plain.get_weights())
    results = []
    for model in (plain, mirrored):
        im = tfi.InfluenceModel(model)
        im.compile(solver="cg", damping="auto", curvature="gauss_newton")
        im.fit(x, y, batch_size=7, verbose=0)
        results.append((im.damping, im.explain(x[:4] + 0.1, y[:4], verbose=0)))
    assert im.operator.replicas is not None
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-8)
    scale = np.max(np.abs(results[0][1]))
    assert np.max(np.abs(results[1][1] - results[0][1])) <= 1e-4 * scale


def test_jit_compiled_products_give_the_same_matrix(blobs, mlp):
    x, y = blobs
    plain, _ = _operator(mlp, x, y, damping=0.1)
    compiled, _ = _operator(mlp, x, y, damping=0.1, jit_compile=True)
    np.testing.assert_allclose(compiled.dense().numpy(), plain.dense().numpy(), atol=1e-12)
