"""K-FAC and EK-FAC against dense references.

References are built in float64 from full-batch tapes and numpy: the Kronecker
factors ``A = mean_j mean_t a a^T`` and ``S = mean_j sum_t J_t^T H_L J_t`` (the
exact expectation over the output draws), the dense Gauss-Newton matrix of
``test_gauss_newton.dense_ggn``, and their inverses.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp
from test_gauss_newton import dense_ggn

import tf_influence as tfi
from tf_influence.solvers import _kronecker

DAMPING = 0.05
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fitted(model, x, y, solver, damping=DAMPING, batch_size=7):
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver=solver, damping=damping)
    im.fit(x, y, batch_size=batch_size, verbose=0)
    return im


def approximate_inverse(im):
    """``inv(G_approx + damping*I)`` as the solver applies it, ``(p, p)``."""
    p = im.operator.num_params
    solution, _ = im.settings.solver.solve(im.operator, tf.eye(p, dtype=tf.float64))
    return solution.numpy()


def loss_hessians(model, logits, y):
    """``H_L,j`` of sparse cross-entropy on logits: ``diag(p) - p p^T``, ``(n, o, o)``."""
    probs = tf.nn.softmax(logits).numpy()
    return np.stack([np.diag(p) - np.outer(p, p) for p in probs])


def mlp_factors(model, x, y):
    """Reference ``(A, S)`` per Dense layer of ``make_mlp``: rows ``[a; 1]``."""
    hidden, logits_layer = model.layers
    w1, b1 = (v.numpy() for v in hidden.weights)
    w2, b2 = (v.numpy() for v in logits_layer.weights)
    h = np.tanh(x @ w1 + b1)
    logits = h @ w2 + b2
    hess = loss_hessians(model, logits, y)
    n = len(x)
    a1 = np.concatenate([x, np.ones((n, 1))], axis=1)
    a2 = np.concatenate([h, np.ones((n, 1))], axis=1)
    # d logits / d z1 = W2^T diag(1 - h^2): (n, o, hidden)
    jac1 = np.einsum("ho,nh->noh", w2, 1 - h**2)
    s1 = np.einsum("nop,noq,nqr->pr", jac1, hess, jac1) / n
    s2 = hess.mean(axis=0)
    return [(a1.T @ a1 / n, s1), (a2.T @ a2 / n, s2)]


def kronecker_inverse(factors, extra_diagonal=None, corrected_from=None, damping=DAMPING):
    """The block-diagonal inverse from reference factors.

    ``corrected_from``: the dense G whose diagonal in each block's eigenbasis replaces
    ``l_A l_S^T`` (EK-FAC); blocks are consecutive in the flat layout.
    """
    blocks, offset = [], 0
    for a, s in factors:
        la, qa = np.linalg.eigh(a)
        ls, qs = np.linalg.eigh(s)
        q = np.kron(qa, qs)
        size = q.shape[0]
        if corrected_from is not None:
            block = corrected_from[offset : offset + size, offset : offset + size]
            values = np.einsum("ij,ik,kj->j", q, block, q)
        else:
            values = np.kron(la, ls)
        blocks.append(q @ np.diag(1.0 / (values + damping)) @ q.T)
        offset += size
    out = np.zeros((offset, offset))
    start = 0
    for block in blocks:
        out[start : start + len(block), start : start + len(block)] = block
        start += len(block)
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = rng.integers(0, 3, size=30)
    return x, y


def test_single_dense_layer_on_one_example_equals_the_gauss_newton_inverse():
    """One Dense layer and one example: G = (a a^T) (x) H_L exactly, for both."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    )
    x = np.random.default_rng(1).normal(size=(1, 4))
    y = np.array([2])
    ggn = dense_ggn(tfi.engine.Objective(model, loss=LOSS), x, y)
    expected = np.linalg.inv(ggn + DAMPING * np.eye(len(ggn)))
    for solver in (tfi.solvers.KFAC(samples="exact"), tfi.solvers.EKFAC(samples="exact")):
        im = fitted(model, x, y, solver)
        np.testing.assert_allclose(approximate_inverse(im), expected, rtol=1e-8, atol=1e-8)


def test_kfac_equals_its_kronecker_definition(data):
    x, y = data
    model = make_mlp(l2=0.0)
    im = fitted(model, x, y, tfi.solvers.KFAC(samples="exact"))
    expected = kronecker_inverse(mlp_factors(model, x, y))
    np.testing.assert_allclose(approximate_inverse(im), expected, rtol=1e-6, atol=1e-9)


def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_basis(data):
    """With an L2 regulariser: its Hessian is part of G, so of the corrected values."""
    x, y = data
    model = make_mlp(l2=0.01)
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    ggn = dense_ggn(im.operator.objective, x, y)
    expected = kronecker_inverse(mlp_factors(model, x, y), corrected_from=ggn)
    np.testing.assert_allclose(approximate_inverse(im), expected, rtol=1e-6, atol=1e-9)


def conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype="float64"),
            keras.layers.Conv2D(3, 3, activation="tanh", dtype="float64", name="conv"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )


def conv_factors(model, x, y):
    """Reference factors of ``conv_model``: patches by numpy loops, ``S`` by batch Jacobians."""
    conv, _, dense = model.layers
    n = len(x)
    patches = np.stack(
        [
            np.stack([x[:, i : i + 3, j : j + 3, :].reshape(n, -1) for j in range(3)], axis=1)
            for i in range(3)
        ],
        axis=1,
    ).reshape(n, 9, 18)  # (n, positions, kh*kw*cin)
    a = np.concatenate([patches, np.ones((n, 9, 1))], axis=2)
    a_conv = np.einsum("nti,ntj->ij", a, a) / (9 * n)
    z = tf.constant(
        np.einsum("nti,io->nto", patches, conv.kernel.numpy().reshape(18, 3)) + conv.bias.numpy()
    )
    with tf.GradientTape() as tape:
        tape.watch(z)
        h = tf.reshape(tf.tanh(z), [n, -1])
        logits = dense(h)
    jac = tape.batch_jacobian(logits, z).numpy()  # (n, o, positions, cout)
    hess = loss_hessians(model, logits.numpy(), y)
    s_conv = np.einsum("notc,nop,nptd->cd", jac, hess, jac) / n
    a_dense = np.concatenate([h.numpy(), np.ones((n, 1))], axis=1)
    return [(a_conv, s_conv), (a_dense.T @ a_dense / n, hess.mean(axis=0))]


@pytest.mark.parametrize("order", ["auto", "gradient first", "factors first"])
def test_conv2d_factors_average_patches_and_sum_positions(data, order, monkeypatch):
    """Both orders of the correction's products (``_gradient_first``) give G's diagonal."""
    if order != "auto":
        from tf_influence.solvers import _kronecker_blocks

        monkeypatch.setattr(
            _kronecker_blocks, "_gradient_first", lambda block, rows: order == "gradient first"
        )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5, 5, 2))
    y = rng.integers(0, 3, size=12)
    model = conv_model()
    factors = conv_factors(model, x, y)
    im = fitted(model, x, y, tfi.solvers.KFAC(samples="exact"), batch_size=5)
    np.testing.assert_allclose(
        approximate_inverse(im), kronecker_inverse(factors), rtol=1e-6, atol=1e-9
    )
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"), batch_size=5)
    ggn = dense_ggn(im.operator.objective, x, y)
    np.testing.assert_allclose(
        approximate_inverse(im),
        kronecker_inverse(factors, corrected_from=ggn),
        rtol=1e-7,
        atol=1e-9,
    )


def test_other_parameters_get_the_gauss_newton_diagonal(data):
    x, y = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.LayerNormalization(dtype="float64", name="norm"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.layers[1].gamma.assign(np.linspace(0.5, 1.5, 5))
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    coverage = tfi.solvers.ekfac.coverage(im)
    diagonal = [k.split("/", 1)[1] for k, v in coverage.items() if v == "diagonal"]
    assert diagonal == ["norm/gamma", "norm/beta"]
    ggn = dense_ggn(im.operator.objective, x, y)
    inverse = approximate_inverse(im)
    norm = slice(25, 35)  # after the first Dense (4x5 + 5): gamma, beta
    np.testing.assert_allclose(
        inverse[norm, norm], np.diag(1.0 / (np.diag(ggn)[norm] + DAMPING)), rtol=1e-8, atol=1e-10
    )


def test_sampled_fisher_converges_to_the_exact_expectation(data):
    """The draws are unbiased: the error of the inverse shrinks as 1/sqrt(samples)."""
    x, y = data
    model = make_mlp(l2=0.0)

    def inverse(solver):
        return approximate_inverse(fitted(model, x, y, solver, batch_size=30))

    exact = inverse(tfi.solvers.KFAC(samples="exact"))
    errors = {
        m: np.linalg.norm(inverse(tfi.solvers.KFAC(samples=m, seed=3)) - exact)
        / np.linalg.norm(exact)
        for m in (1, 16)
    }
    assert errors[16] < 0.04  # 0.028 measured; one sample: 0.074
    assert errors[1] > 2 * errors[16]


def test_sampled_draws_follow_each_example_not_its_batch(data):
    """Each example's draws are seeded by its position: any batch size, the same factors.

    (So also any split over replicas: tests/test_distribute.py.) Another seed gives
    other draws, and K-FAC's factor pass and EK-FAC's correction pass draw anew.
    """
    x, y = data
    model = make_mlp(l2=0.0)

    def inverse(solver, batch_size):
        return approximate_inverse(fitted(model, x, y, solver, batch_size=batch_size))

    for make in (tfi.solvers.KFAC, tfi.solvers.EKFAC):
        expected = inverse(make(samples=2, seed=3), 30)
        scale = np.max(np.abs(expected))
        # Rounding only: a (near-)zero eigenvalue of the output Hessian enters its root
        # as a square root (9e-11 and 3e-10 measured).
        assert np.max(np.abs(inverse(make(samples=2, seed=3), 7) - expected)) < 1e-8 * scale
        other = inverse(make(samples=2, seed=4), 7)
        assert np.max(np.abs(other - expected)) > 1e-3 * scale  # 0.06 and 0.09 measured


def test_empirical_fisher_uses_the_training_labels(data):
    x, y = data
    model = make_mlp(l2=0.0)
    im = fitted(model, x, y, tfi.solvers.KFAC(fisher="empirical"))
    hidden, logits_layer = model.layers
    w1, b1 = (v.numpy() for v in hidden.weights)
    w2, b2 = (v.numpy() for v in logits_layer.weights)
    h = np.tanh(x @ w1 + b1)
    probs = tf.nn.softmax(h @ w2 + b2).numpy()
    delta2 = probs - np.eye(3)[y]  # dL/dlogits
    delta1 = (delta2 @ w2.T) * (1 - h**2)
    n = len(x)
    a1 = np.concatenate([x, np.ones((n, 1))], axis=1)
    a2 = np.concatenate([h, np.ones((n, 1))], axis=1)
    factors = [(a1.T @ a1 / n, delta1.T @ delta1 / n), (a2.T @ a2 / n, delta2.T @ delta2 / n)]
    np.testing.assert_allclose(
        approximate_inverse(im), kronecker_inverse(factors), rtol=1e-6, atol=1e-9
    )


def test_ekfac_scores_track_cg_on_the_gauss_newton_matrix(data):
    x, y = data
    model = make_mlp(l2=0.01)
    cg = tfi.InfluenceModel(model, loss=LOSS)
    cg.compile(solver=tfi.solvers.CG(tol=1e-10), damping=DAMPING, curvature="gauss_newton")
    cg.fit(x, y, verbose=0)
    expected = cg.explain(x[:6], y[:6], verbose=0)
    im = fitted(model, x, y, "ekfac")
    scores = im.explain(x[:6], y[:6], verbose=0)
    assert np.corrcoef(scores.ravel(), expected.ravel())[0, 1] > 0.9
    assert im.get_compile_config()["curvature"] == "gauss_newton"


def test_save_and_load_keep_the_factors(data, tmp_path, monkeypatch):
    x, y = data
    model = make_mlp()
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    expected = im.explain(x[:4], y[:4], verbose=0)
    path = tmp_path / "state.npz"
    im.save(path, include_data=True)

    def refuse(*args):
        raise AssertionError("the factors were computed again")

    monkeypatch.setattr(_kronecker, "fit", refuse)
    loaded = tfi.InfluenceModel.load(path, model, loss=LOSS, verbose=0)
    np.testing.assert_allclose(loaded.explain(x[:4], y[:4], verbose=0), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="weights"):
        tfi.InfluenceModel.load(path, make_mlp(seed=5), loss=LOSS, verbose=0)


def test_saved_factors_for_other_layers_are_refused(data):
    x, y = data
    im = fitted(make_mlp(), x, y, tfi.solvers.EKFAC(samples="exact"))
    arrays = im.settings.solver.get_state(im.operator)
    arrays["block1_qa"] = arrays["block1_qa"][:3, :3]
    with pytest.raises(ValueError, match=r"do not belong to this model.*'logits' has other shapes"):
        _kronecker.from_arrays(im.operator, arrays)


@pytest.mark.parametrize("solver", [tfi.solvers.KFAC, tfi.solvers.EKFAC])
def test_max_examples_fits_the_factors_on_a_seeded_subset(data, solver):
    """The factors of ``max_examples`` are those of the subset alone; scores cover all."""
    from tf_influence.engine.output_draws import subset_positions

    x, y = data
    model = make_mlp(l2=0.01)
    n, m = len(x), 9
    im = fitted(model, x, y, solver(samples="exact", max_examples=m, seed=3))
    keep = subset_positions(n, m, 3)
    assert len(keep) == m and len(set(keep)) == m
    alone = fitted(model, x[keep], y[keep], solver(samples="exact"))
    np.testing.assert_allclose(approximate_inverse(im), approximate_inverse(alone), rtol=1e-8)
    assert im.explain(x[:2], y[:2], verbose=0).shape == (2, n)
    # A subset as large as the data is the data.
    everything = fitted(model, x, y, solver(samples="exact", max_examples=n))
    np.testing.assert_allclose(
        approximate_inverse(everything),
        approximate_inverse(fitted(model, x, y, solver(samples="exact"))),
        rtol=1e-10,
    )


def test_bad_input_is_refused(data):
    x, y = data
    with pytest.raises(ValueError, match=r"`max_examples` must be a positive integer or None"):
        tfi.solvers.EKFAC(max_examples=0)
    with pytest.raises(ValueError, match="fisher"):
        tfi.solvers.EKFAC(fisher="model")
    with pytest.raises(ValueError, match="samples"):
        tfi.solvers.EKFAC(samples=0)
    im = tfi.InfluenceModel(make_mlp(), loss=LOSS)
    with pytest.raises(
        ValueError, match=r"approximates the 'gauss_newton' curvature.*curvature='hessian'"
    ):
        im.compile(solver="ekfac", curvature="hessian")
    keras.utils.set_random_seed(0)
    norm = keras.Sequential([keras.Input((3,)), keras.layers.LayerNormalization()])
    im = tfi.InfluenceModel(norm, loss=keras.losses.MeanSquaredError())
    im.compile(solver="ekfac", damping=0.1)
    with pytest.raises(
        ValueError, match=r"Dense, EinsumDense, .* and Embedding layers.*gamma.*solver=\"cg\""
    ):
        im.fit(np.eye(3)[:2], np.zeros((2, 3)), verbose=0)


def test_auto_damping_is_ten_times_the_gauss_newton_mean_eigenvalue(data):
    """EK-FAC's trace is the Gauss-Newton trace (exact expectation): no products needed."""
    x, y = data
    model = make_mlp(l2=0.01)
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"), damping="auto")
    ggn = dense_ggn(im.operator.objective, x, y)
    np.testing.assert_allclose(im.damping, 10 * np.trace(ggn) / len(ggn), rtol=1e-7)
    expected = kronecker_inverse(mlp_factors(model, x, y), corrected_from=ggn, damping=im.damping)
    np.testing.assert_allclose(approximate_inverse(im), expected, rtol=1e-6, atol=1e-9)


def test_per_layer_scores_sum_to_the_total(data):
    x, y = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64", name="hidden"),
            keras.layers.LayerNormalization(dtype="float64", name="norm"),
            keras.layers.Dense(3, dtype="float64", name="logits"),
        ]
    )
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    total = im.explain(x[:4], y[:4], verbose=0)
    parts = im.explain(x[:4], y[:4], verbose=0, per_layer=True)
    assert list(parts) == ["hidden", "logits", "norm"]
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-10, atol=1e-12)
    # Each part is the test gradient's layer block, preconditioned, against the training
    # gradients' same block: the inverse is block-diagonal over these layers.
    grads = im.state.gradients(tf.constant(x), tf.constant(y)).numpy()  # (n, p)
    tests = im.state.gradients(tf.constant(x[:4]), tf.constant(y[:4])).numpy()
    inverse = approximate_inverse(im)
    hidden = slice(0, 25)
    expected = -(tests[:, hidden] @ inverse[hidden, hidden]) @ grads[:, hidden].T
    np.testing.assert_allclose(parts["hidden"], expected, rtol=1e-8, atol=1e-10)


def test_per_layer_needs_a_solver_with_layers(data):
    x, y = data
    im = fitted(make_mlp(), x, y, tfi.solvers.CG())
    with pytest.raises(ValueError, match=r"per_layer=True. needs a solver.*solver=\"ekfac\""):
        im.explain(x[:2], y[:2], per_layer=True, verbose=0)
    with pytest.raises(ValueError, match=r"cannot be combined with `top_k`"):
        im.explain(x[:2], y[:2], per_layer=True, top_k=3, verbose=0)


def test_a_second_fit_on_the_same_model_reuses_the_traced_passes(data):
    """A refit (a callback's next analysis, a new InfluenceModel) traces nothing again;
    another seed traces its own passes, and gives its own draws."""
    from tf_influence.engine import compile as compile_lib

    x, y = data
    model = make_mlp(l2=0.01)
    first = approximate_inverse(fitted(model, x, y, tfi.solvers.EKFAC(seed=1)))
    count = compile_lib.tracing_count()
    again = approximate_inverse(fitted(model, x, y, tfi.solvers.EKFAC(seed=1)))
    assert compile_lib.tracing_count() == count
    np.testing.assert_allclose(again, first, rtol=1e-12, atol=1e-15)
    other = approximate_inverse(fitted(model, x, y, tfi.solvers.EKFAC(seed=2)))
    assert compile_lib.tracing_count() > count
    assert np.max(np.abs(other - first)) > 1e-6 * np.max(np.abs(first))
