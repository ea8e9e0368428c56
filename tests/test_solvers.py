"""Solvers against tf.linalg.solve on the dense matrix, and their guards."""

import math
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData
from tf_influence.solvers import CG, CurvatureError, Exact, LiSSA, recycling


@pytest.fixture
def operator(mlp, blobs):
    x, y = blobs
    return HessianOperator(tfi.engine.Objective(mlp), ExampleData(x, y, 16), damping=0.5)


@pytest.fixture
def rhs(operator):
    return tf.constant(np.random.default_rng(4).normal(size=(operator.num_params, 4)))


def reference(operator, rhs):
    return tf.linalg.solve(operator.dense(), rhs).numpy()


def test_exact_equals_linalg_solve(operator, rhs):
    solution, diagnostics = Exact().solve(operator, rhs)
    np.testing.assert_allclose(solution.numpy(), reference(operator, rhs), rtol=1e-9)
    assert diagnostics.all_converged and diagnostics.residual_norm.max() < 1e-10


@pytest.mark.parametrize("block", [True, False])
def test_cg_equals_linalg_solve_for_several_rhs(operator, rhs, block):
    solution, diagnostics = CG(tol=1e-10, block=block).solve(operator, rhs)
    np.testing.assert_allclose(solution.numpy(), reference(operator, rhs), rtol=1e-7, atol=1e-9)
    assert diagnostics.all_converged
    assert 0 < diagnostics.iterations <= operator.num_params + 5
    assert diagnostics.residual_norm.shape == (4,)


def test_cg_columns_are_independent(operator, rhs):
    together, _ = CG(tol=1e-10, block=False).solve(operator, rhs)
    alone, _ = CG(tol=1e-10).solve(operator, rhs[:, 2:3])
    np.testing.assert_allclose(together.numpy()[:, 2:3], alone.numpy(), rtol=1e-8, atol=1e-10)


def test_block_cg_needs_fewer_iterations_than_column_cg(operator, rhs):
    # The block Krylov space contains each column's own, so block CG is never slower
    # (in iterations) and here strictly faster, at the same accuracy.
    expected = reference(operator, rhs)
    wide = tf.concat([rhs, tf.constant(np.random.default_rng(5).normal(size=rhs.shape))], 1)
    block, block_diag = CG(tol=1e-8).solve(operator, wide)
    column, column_diag = CG(tol=1e-8, block=False).solve(operator, wide)
    assert block_diag.all_converged and column_diag.all_converged
    assert block_diag.iterations < column_diag.iterations, (block_diag, column_diag)
    np.testing.assert_allclose(block.numpy()[:, :4], expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(column.numpy()[:, :4], expected, rtol=1e-6, atol=1e-8)


def test_block_cg_splits_wide_rhs_and_keeps_zero_columns_zero(operator, monkeypatch):
    monkeypatch.setattr(CG, "MAX_BLOCK", 3)
    rhs = np.random.default_rng(6).normal(size=(operator.num_params, 7))
    rhs[:, 4] = 0.0
    solution, diagnostics = CG(tol=1e-10).solve(operator, tf.constant(rhs))
    expected = reference(operator, tf.constant(rhs))
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-7, atol=1e-9)
    assert np.all(solution.numpy()[:, 4] == 0)
    assert diagnostics.residual_norm.shape == (7,) and diagnostics.all_converged


def test_cg_zero_rhs_gives_zero(operator):
    rhs = tf.zeros([operator.num_params, 2], tf.float64)
    solution, diagnostics = CG().solve(operator, rhs)
    assert np.all(solution.numpy() == 0) and diagnostics.all_converged


def test_cg_reports_unconverged_when_max_iter_too_small(operator, rhs):
    _, diagnostics = CG(tol=1e-12, max_iter=2).solve(operator, rhs)
    assert diagnostics.iterations == 2 and not diagnostics.all_converged


def test_recycled_solves_equal_linalg_solve_and_take_fewer_iterations(operator):
    # A sequence of solves on one operator: each later one starts from the directions
    # the earlier ones kept, and still equals the dense solve.
    rng = np.random.default_rng(7)
    solver = CG(tol=1e-10, recycle=10_000)  # capped at half the parameters
    fresh = CG(tol=1e-10, recycle=0)
    widths, saved = [], []
    for k in (4, 4, 1, 3, 4):
        rhs = tf.constant(rng.normal(size=(operator.num_params, k)))
        solution, diagnostics = solver.solve(operator, rhs)
        np.testing.assert_allclose(solution.numpy(), reference(operator, rhs), rtol=1e-7, atol=1e-9)
        assert diagnostics.all_converged and diagnostics.residual_norm.max() <= 1e-10
        true = tfi.solvers.base.relative_residual(operator, solution, rhs).numpy()
        assert true.max() < 1e-8, true
        widths.append(diagnostics.info["recycled_directions"])
        _, alone = fresh.solve(operator, rhs)
        assert alone.info["recycled_directions"] == 0
        saved.append(alone.iterations - diagnostics.iterations)
    capacity = operator.num_params // 2
    assert widths[0] == 0 and 0 < widths[1] <= capacity and widths[-1] == capacity, widths
    assert all(s > 0 for s in saved[1:]), saved


def test_recycling_helpers_take_any_size_of_space():
    # The space grows from solve to solve; its helpers run eagerly on every size (no
    # trace to land on a later explain).
    helper = recycling.inverse_if_positive
    rng = np.random.default_rng(0)
    for m in (2, 5, 9):
        a = rng.normal(size=(m, m))
        matrix = a @ a.T + m * np.eye(m)
        inverse, ok = helper(tf.constant(matrix))
        np.testing.assert_allclose(inverse.numpy() @ matrix, np.eye(m), atol=1e-10)
        assert bool(ok)
    _, ok = helper(tf.constant(-np.eye(3)))
    assert not bool(ok)  # not positive definite: refused


def test_recycling_float32_keeps_the_true_residual():
    # In float32, rounding in the kept products must not let the recursive residual
    # drift away from the true one.
    x, y = np.random.default_rng(0).normal(size=(50, 4)), np.arange(50) % 3
    model = make_mlp(dtype="float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    objective = tfi.engine.Objective(model, loss=loss)
    op32 = HessianOperator(objective, ExampleData(x.astype("float32"), y, 16), 0.5)
    rng = np.random.default_rng(8)
    dense = op32.dense().numpy()
    for _ in range(4):
        rhs = rng.normal(size=(op32.num_params, 5)).astype(np.float32)
        solution, diagnostics = CG(tol=1e-5).solve(op32, tf.constant(rhs))
        true = np.linalg.norm(dense @ solution.numpy() - rhs, axis=0) / np.linalg.norm(rhs, axis=0)
        assert diagnostics.all_converged and true.max() < 3e-5, (true, diagnostics)
    assert diagnostics.info["recycled_directions"] > 0


def test_recycled_space_is_capped_and_can_be_turned_off(operator, rhs, monkeypatch):
    plain, plain_diag = CG(tol=1e-10, recycle=0).solve(operator, rhs)
    CG(tol=1e-10, recycle=0).solve(operator, rhs)
    assert not any(key[0] == "cg.recycled" for key in operator._cache)
    assert plain_diag.info["recycled_directions"] == 0
    solver = CG(tol=1e-10, recycle=5)
    solver.solve(operator, rhs)
    _, diagnostics = solver.solve(operator, rhs * 2)
    assert diagnostics.info["recycled_directions"] == 5
    # The memory budget caps the space too: here it leaves room for no direction.
    monkeypatch.setattr(tfi.solvers.cg, "RECYCLE_BUDGET", operator.num_params)
    fresh = HessianOperator(operator.objective, operator.data, operator.damping)
    for _ in range(2):
        solution, diagnostics = CG(tol=1e-10).solve(fresh, rhs)
        assert diagnostics.info["recycled_directions"] == 0
    np.testing.assert_allclose(solution.numpy(), plain.numpy(), rtol=1e-7, atol=1e-9)


def test_auto_recycle_keeps_more_directions_when_products_cost_more(operator, monkeypatch):
    cg = tfi.solvers.cg
    p, n = operator.num_params, operator.num_examples
    flops = cg.forward_flops(operator)
    # 4 -> 5 -> 3 dense layers in float64: the two matrix products of one example
    # are 2 * (4 * 5 + 5 * 3) = 70 flops; biases and the loss add a few more.
    assert 70 <= flops < 120, flops
    expected = min(math.ceil(cg.RECYCLE_PER_FLOP * n * flops / p), p // 2)
    assert CG()._recycle_capacity(operator) == expected
    # A convolution reuses each weight at every position: more flops per parameter,
    # so more directions are worth keeping.
    keras.utils.set_random_seed(0)
    conv = keras.Sequential(
        [
            keras.Input((12, 12, 1), dtype="float64"),
            keras.layers.Conv2D(2, 3, dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    images = np.random.default_rng(0).normal(size=(50, 12, 12, 1))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    conv_op = HessianOperator(
        tfi.engine.Objective(conv, loss=loss), ExampleData(images, np.arange(50) % 3, 16), 0.5
    )
    conv_flops = cg.forward_flops(conv_op)
    assert conv_flops / conv_op.num_params > 2 * flops / p
    assert CG()._recycle_capacity(conv_op) == min(
        math.ceil(cg.RECYCLE_PER_FLOP * 50 * conv_flops / conv_op.num_params),
        conv_op.num_params // 2,
    )
    # An explicit number is a cap; flops that cannot be counted fall back.
    assert CG(recycle=3)._recycle_capacity(operator) == 3
    monkeypatch.setattr(tf.compat.v1.profiler, "profile", lambda *a, **k: 1 / 0)
    # (A new operator on the same model finds the count of the first: forget it.)
    monkeypatch.setattr(tfi.solvers.recycling, "_FLOPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(HessianOperator, "share_values", False)
    fresh = HessianOperator(operator.objective, operator.data, operator.damping)
    assert cg.forward_flops(fresh) is None
    assert CG()._recycle_capacity(fresh) == min(cg.RECYCLE_FALLBACK, p // 2)


def test_recycled_space_is_dropped_when_the_weights_change(blobs):
    # The kept products belong to one Hessian: after the weights move, explain must
    # equal a fresh model's (a stale space would make the deflated solve wrong).
    x, y = blobs
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=CG(tol=1e-10), damping=0.5)
    im.fit(x, y, batch_size=16, verbose=0)
    im.explain(x[:4], y[:4], verbose=0)
    im.explain(x[4:8], y[4:8], verbose=0)
    assert im.diagnostics.info["recycled_directions"] > 0
    for variable in model.trainable_variables:
        variable.assign(1.5 * variable + 0.1)
    for refit in (lambda: im.state.refresh(), lambda: im.fit(x, y, 16, verbose=0)):
        refit()
        got = im.explain(x[8:12], y[8:12], verbose=0)
        assert im.diagnostics.info["recycled_directions"] == 0
        fresh = tfi.InfluenceModel(model)
        fresh.compile(solver="exact", damping=0.5)
        fresh.fit(x, y, batch_size=16, verbose=0)
        np.testing.assert_allclose(got, fresh.explain(x[8:12], y[8:12], verbose=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_orthonormal_columns_spans_the_block(dtype):
    from tf_influence.solvers.cg import orthonormal_columns

    rng = np.random.default_rng(9)
    cases = [rng.normal(size=(300, 6))]
    deficient = rng.normal(size=(300, 6))
    deficient[:, 2] = 2 * deficient[:, 0]  # dependent
    deficient[:, 4] *= 1e-6  # tiny but independent
    zero = rng.normal(size=(300, 6))
    zero[:, 3] = 0.0
    cases += [deficient, zero]
    for a in cases:
        q = orthonormal_columns(tf.constant(a.astype(dtype))).numpy().astype(np.float64)
        assert q.shape == a.shape and np.isfinite(q).all()
        np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
        # Every column of a lies in span(q).
        outside = a - q @ (q.T @ a)
        assert np.linalg.norm(outside) < 1e-5 * np.linalg.norm(a)


def test_lissa_within_its_own_tolerance(operator, rhs):
    solver = LiSSA(recursion_depth=400, num_repeats=4, batch_size=25, seed=0)
    solution, diagnostics = solver.solve(operator, rhs)
    expected = reference(operator, rhs)
    error = np.linalg.norm(solution.numpy() - expected, axis=0) / np.linalg.norm(expected, axis=0)
    assert error.max() < 0.1, error
    assert diagnostics.all_converged, diagnostics
    assert diagnostics.info["scale"] > 0


def test_lissa_is_reproducible(operator, rhs):
    a, _ = LiSSA(recursion_depth=50, seed=3).solve(operator, rhs)
    b, _ = LiSSA(recursion_depth=50, seed=3).solve(operator, rhs)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lissa_divergence_is_reported_with_a_scale(operator, rhs):
    with pytest.raises(
        CurvatureError, match=r"LiSSA diverged .* Pass a larger scale, e.g. LiSSA\(scale="
    ):
        LiSSA(recursion_depth=200, scale=1e-3).solve(operator, rhs)


def indefinite_operator(x, y, damping=0.0):
    """An untrained MLP without regularisation or damping has negative curvature."""
    model = make_mlp(l2=0.0, seed=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return HessianOperator(tfi.engine.Objective(model, loss=loss), ExampleData(x, y, 16), damping)


def test_indefinite_hessian_exact_and_cg_suggest_damping(blobs):
    operator = indefinite_operator(*blobs)
    eigenvalues, eigenvectors = np.linalg.eigh(operator.dense().numpy())
    assert eigenvalues[0] < 0  # the premise of this test
    with pytest.raises(
        CurvatureError, match=r"not positive definite.*smallest eigenvalue.*damping="
    ):
        Exact().solve(operator, tf.ones([operator.num_params, 1], tf.float64))
    with pytest.raises(CurvatureError, match=r"non-positive curvature.*e.g. damping="):
        CG().solve(operator, tf.constant(eigenvectors[:, :1]))
    with pytest.raises(CurvatureError, match=r"non-positive curvature.*e.g. damping="):
        CG().solve(operator, tf.constant(eigenvectors[:, [-1, 0]]))  # a block


def test_exact_error_suggests_damping_that_works(blobs):
    with pytest.raises(CurvatureError) as info:
        Exact().prepare(indefinite_operator(*blobs))
    suggested = float(str(info.value).split("e.g. damping=")[1].split(",")[0])
    Exact().prepare(indefinite_operator(*blobs, damping=suggested))  # no error


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CG(tol=0), r"`tol` must be a positive finite number. Received: tol=0"),
        (lambda: CG(max_iter=0), r"`max_iter` must be a positive integer. Received: max_iter=0"),
        (lambda: CG(block=1), r"`block` must be True or False. Received: block=1"),
        (lambda: CG(recycle=-1), r"`recycle` must be \"auto\" or a non-negative .*=-1"),
        (lambda: CG(recycle=2.5), r"`recycle` must be \"auto\" or a non-negative .*=2.5"),
        (lambda: CG(recycle=True), r"`recycle` must be \"auto\" or a non-negative .*=True"),
        (lambda: LiSSA(recursion_depth=-1), r"`recursion_depth` must be a positive integer"),
        (lambda: LiSSA(scale=float("nan")), r"`scale` must be a positive finite number"),
        (lambda: LiSSA(num_repeats=1.5), r"`num_repeats` must be a positive integer"),
        (lambda: LiSSA(seed="a"), r"`seed` must be an integer"),
        (
            lambda: tfi.solvers.get("newton"),
            r"`solver` must be one of .* Received: solver='newton'",
        ),
    ],
)
def test_bad_solver_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "solver", [Exact(), CG(tol=1e-7, max_iter=50), LiSSA(recursion_depth=10, scale=3.0)]
)
def test_config_round_trip(solver):
    rebuilt = type(solver).from_config(solver.get_config())
    assert rebuilt.get_config() == solver.get_config()
    assert repr(rebuilt) == repr(solver)
