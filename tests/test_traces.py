"""Traces shared between InfluenceModels: reused when the answer is the same, never otherwise."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian, make_mlp

import tf_influence as tfi
from tf_influence.engine import compile as compile_lib
from tf_influence.engine import curvature as curvature_lib
from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData

SPARSE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def reference_scores(model, x, y, x_test, y_test, damping, loss=SPARSE_LOGITS, params=None):
    """``-g_test @ inv(H + damping*I) @ g_train^T`` from full-batch tapes and a dense solve."""
    objective = tfi.engine.Objective(model, loss, params)

    def gradients(xs, ys):
        rows = []
        for j in range(len(xs)):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(objective.per_example_loss(xs[j : j + 1], ys[j : j + 1]))
            rows.append(objective.layout.flatten(tape.gradient(value, objective.variables)))
        return tf.stack(rows).numpy()

    hessian = dense_hessian(objective, x, y) + damping * np.eye(objective.num_params)
    return -gradients(x_test, y_test) @ np.linalg.solve(hessian, gradients(x, y).T)


def explain(model, x, y, x_test, y_test, solver="exact", damping=0.5, batch_size=16, **kwargs):
    im = tfi.InfluenceModel(model, **kwargs)
    im.compile(solver=solver, damping=damping)
    im.fit(x, y, batch_size=batch_size, verbose=0)
    return im, im.explain(x_test, y_test, verbose=0)


def test_second_influence_model_reuses_every_trace(mlp, blobs):
    """Same model and configuration: fit + explain trace nothing the first one traced."""
    x, y = blobs
    first, expected = explain(mlp, x, y, x[:6], y[:6], solver=tfi.solvers.CG(tol=1e-10))
    count = compile_lib.tracing_count()
    matvec_count = first.operator._matvec.tracing_count()
    gradients_count = first.state.gradients.tracing_count()
    second, scores = explain(mlp, x, y, x[:6], y[:6], solver=tfi.solvers.CG(tol=1e-10))
    assert compile_lib.tracing_count() == count
    assert second.operator._matvec.tracing_count() == matvec_count
    assert second.state.gradients.tracing_count() == gradients_count
    assert second.operator._matvec.shared is first.operator._matvec.shared
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-12)
    reference = reference_scores(mlp, x, y, x[:6], y[:6], 0.5)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)


def test_cg_is_traced_once_for_any_number_of_test_points(mlp, blobs):
    """The recycling solve leaves the number of columns free: 1, 3 or 5 test points, one trace."""
    x, y = blobs
    im = tfi.InfluenceModel(mlp)
    im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=0.5)
    im.fit(x, y, batch_size=16, verbose=0)
    im.explain(x[:3], y[:3], verbose=0)
    count = compile_lib.tracing_count()
    for rows in (slice(3, 8), slice(8, 9)):
        scores = im.explain(x[rows], y[rows], verbose=0)
        reference = reference_scores(mlp, x, y, x[rows], y[rows], 0.5)
        np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)
    assert compile_lib.tracing_count() == count
    assert im.diagnostics.info["recycled_directions"] > 0  # the deflated solve ran


def test_dense_matrix_is_traced_once_when_the_last_chunk_would_be_narrower(blobs):
    """p = 243 in chunks of at most 128 columns: two chunks of 122 (the last padded with
    one zero column), so one trace of the product, and the matrix of nested tapes."""
    x, y = blobs
    model = make_mlp(hidden=30)
    model.compile(loss=SPARSE_LOGITS)
    im = tfi.InfluenceModel(model)
    im.compile(solver="cg", damping=0.5)  # a fit that builds no dense matrix
    im.fit(x, y, batch_size=16, verbose=0)
    assert im.operator.num_params == 243 and im.operator.num_dense_chunks == 2
    widths = []
    matvec = im.operator.matvec
    im.operator.matvec = lambda vectors: widths.append(vectors.shape[1]) or matvec(vectors)
    count = im.operator._matvec.tracing_count()
    dense = im.operator.dense().numpy()
    assert widths == [122, 122]
    assert im.operator._matvec.tracing_count() == count + 1
    objective = tfi.engine.Objective(model, SPARSE_LOGITS)
    expected = dense_hessian(objective, x, y) + 0.5 * np.eye(243)
    np.testing.assert_allclose(dense, expected, atol=1e-12)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_other_training_arrays_reuse_the_trace_and_answer_for_their_data(mlp, blobs, solver):
    """The data, its size and the damping are arguments of the traces, not constants.

    With CG this covers the solver's compiled loop too: the second operator runs the
    first one's graph on its own data and damping.
    """
    x, y = blobs

    def make():
        return tfi.solvers.CG(tol=1e-10, recycle=0) if solver == "cg" else "exact"

    explain(mlp, x, y, x[:4], y[:4], solver=make())
    count = compile_lib.tracing_count()
    rng = np.random.default_rng(1)
    for other_x, other_y, damping in (
        (x[::-1] + 0.1 * rng.normal(size=x.shape), y[::-1], 0.5),  # other values, same size
        (x[:37], y[:37], 0.5),  # another size, still a short last batch at B=16
        (x[:37], y[:37], 0.8),  # another damping
    ):
        _, scores = explain(mlp, other_x, other_y, x[:4], y[:4], solver=make(), damping=damping)
        assert compile_lib.tracing_count() == count
        reference = reference_scores(mlp, other_x, other_y, x[:4], y[:4], damping)
        np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)


def _double_loss(y_true, y_pred):
    return 2.0 * keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


@pytest.mark.parametrize(
    "change",
    ["damping", "loss", "loss_config", "params", "regularizer", "batch_size"],
)
def test_other_configuration_does_not_reuse_a_wrong_trace(mlp, blobs, change):
    """After a first model traced everything, each change still gives the dense answer."""
    x, y = blobs
    explain(mlp, x, y, x[:4], y[:4])
    settings = {"damping": 0.5, "loss": SPARSE_LOGITS, "params": None, "batch_size": 16}
    if change == "damping":
        settings["damping"] = 2.0
    elif change == "loss":
        settings["loss"] = _double_loss
    elif change == "loss_config":
        # Same class, other config: class 2 counts for nothing (a different loss).
        settings["loss"] = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=2
        )
    elif change == "params":
        settings["params"] = ["logits"]
    elif change == "regularizer":
        mlp.get_layer("hidden").kernel.regularizer = keras.regularizers.L2(0.3)
    else:
        settings["batch_size"] = 50  # one batch: another static batch shape
    _, scores = explain(
        mlp,
        x,
        y,
        x[:4],
        y[:4],
        damping=settings["damping"],
        batch_size=settings["batch_size"],
        loss=settings["loss"],
        params=settings["params"],
    )
    reference = reference_scores(
        mlp, x, y, x[:4], y[:4], settings["damping"], settings["loss"], settings["params"]
    )
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)


def test_model_with_cached_traces_is_freed(blobs):
    """The trace cache holds models weakly: deleting the last reference frees the model."""
    x, y = blobs
    model = make_mlp()
    im, _ = explain(model, x, y, x[:3], y[:3], solver="cg", loss=SPARSE_LOGITS)
    model_ref = weakref.ref(model)
    operator_ref = weakref.ref(im.operator)
    assert any(entry is model for entry in compile_lib._SHARED.keys())
    del model, im
    gc.collect()
    assert model_ref() is None
    assert operator_ref() is None


def test_short_last_batch_is_traced_with_the_full_batches(blobs):
    """50 examples at B=16: the per-batch product is traced once, and still exact."""
    x, y = blobs
    model = make_mlp()
    objective = tfi.engine.Objective(model, SPARSE_LOGITS)
    calls = []
    per_example_loss = objective.per_example_loss

    def counted(xs, ys):
        calls.append(xs.shape[0])
        return per_example_loss(xs, ys)

    objective.per_example_loss = counted
    operator = HessianOperator(objective, ExampleData(x, y, 16), 0.1)
    vectors = np.random.default_rng(0).normal(size=(objective.num_params, 3))
    product = operator.matvec(vectors).numpy()
    assert calls == [16]  # one static batch shape; Omega's product calls no loss
    reference = dense_hessian(objective, x, y) + 0.1 * np.eye(objective.num_params)
    np.testing.assert_allclose(product, reference @ vectors, rtol=1e-7, atol=1e-12)


def test_second_model_shares_values_only_for_the_same_weights_data_and_damping(
    mlp, blobs, monkeypatch
):
    """With ``share_values``, CG's recycled directions carry over to a second
    InfluenceModel on the same Hessian; other weights, data or damping start afresh,
    and every answer is the dense one."""
    monkeypatch.setattr(HessianOperator, "share_values", True)
    x, y = blobs
    solver = tfi.solvers.CG(tol=1e-10)
    first, _ = explain(mlp, x, y, x[:6], y[:6], solver=solver)
    assert first.diagnostics.info["recycled_directions"] == 0
    second, scores = explain(mlp, x, y, x[6:12], y[6:12], solver=solver)  # new test points
    assert second.diagnostics.info["recycled_directions"] > 0
    reference = reference_scores(mlp, x, y, x[6:12], y[6:12], 0.5)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)
    for change in ("damping", "data", "weights"):
        damping, other_x = 0.5, x
        if change == "damping":
            damping = 0.7
        elif change == "data":
            other_x = x + 0.01
        else:
            mlp.set_weights([w * 1.01 for w in mlp.get_weights()])
        im, scores = explain(mlp, other_x, y, x[:6], y[:6], solver=solver, damping=damping)
        assert im.diagnostics.info["recycled_directions"] == 0, change
        reference = reference_scores(mlp, other_x, y, x[:6], y[:6], damping)
        np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-10)


def test_second_model_finds_the_solutions_of_the_first(mlp, blobs, monkeypatch):
    """Shared by default: the same test points on a second InfluenceModel are not solved
    again (identical scores); new ones start from the recycled directions; a target
    function (keyed by its id) always solves again."""
    x, y = blobs
    solver = tfi.solvers.CG(tol=1e-10)
    first, expected = explain(mlp, x, y, x[:6], y[:6], solver=solver)
    calls = []
    solve = tfi.solvers.CG.solve
    monkeypatch.setattr(tfi.solvers.CG, "solve", lambda *a: calls.append(1) or solve(*a))
    second, scores = explain(mlp, x, y, x[:6], y[:6], solver=tfi.solvers.CG(tol=1e-10))
    assert calls == []
    np.testing.assert_array_equal(scores, expected)
    other = second.explain(x[6:12], y[6:12], verbose=0)
    assert calls == [1] and second.diagnostics.info["recycled_directions"] > 0
    reference = reference_scores(mlp, x, y, x[6:12], y[6:12], 0.5)
    np.testing.assert_allclose(other, reference, rtol=1e-6, atol=1e-10)
    # Another solver configuration has solutions of its own.
    explain(mlp, x, y, x[:6], y[:6], solver=tfi.solvers.CG(tol=1e-9))
    assert calls == [1, 1]


def test_values_are_not_shared_when_switched_off_or_too_large(mlp, blobs, monkeypatch):
    x, y = blobs
    solver = tfi.solvers.CG(tol=1e-10)
    monkeypatch.setattr(HessianOperator, "share_values", False)
    explain(mlp, x, y, x[:6], y[:6], solver=solver)
    second, _ = explain(mlp, x, y, x[:6], y[:6], solver=solver)
    assert second.diagnostics.info["recycled_directions"] == 0
    monkeypatch.setattr(HessianOperator, "share_values", True)
    # A dense H over the size limit stays with its operator.
    monkeypatch.setattr(curvature_lib, "SHARED_VALUE_BYTES", 1000)
    first, _ = explain(mlp, x, y, x[:2], y[:2], damping=0.31)
    second, _ = explain(mlp, x, y, x[:2], y[:2], damping=0.31)
    assert first.operator.dense() is not second.operator.dense()
    monkeypatch.setattr(curvature_lib, "SHARED_VALUE_BYTES", 2**40)
    first, _ = explain(mlp, x, y, x[:2], y[:2], damping=0.32)
    second, _ = explain(mlp, x, y, x[:2], y[:2], damping=0.32)
    assert first.operator.dense() is second.operator.dense()


def test_no_retracing_warning_for_functions_traced_once(blobs, caplog):
    """TensorFlow warns when most recent calls of a function retraced, counting every
    function made from one code object together. Our functions are each traced once
    per shape and configuration, so a fresh model's analyses must not trigger it."""
    x, y = blobs
    model = make_mlp()
    with caplog.at_level("WARNING", logger="tensorflow"):
        for damping in ("auto", 0.5):
            im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
            im.compile(solver="cg", damping=damping)
            im.fit(x, y, batch_size=16, verbose=0)
            im.explain(x[:1], y[:1], verbose=0)
            im.explain(x[:3], verbose=0)
            im.self_influence(verbose=0)
            im.top_k(x[:2], y[:2], k=3, verbose=0)
    retracing = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]


def test_no_retracing_warning_from_gauss_newton_loss_checks(blobs, caplog, monkeypatch):
    """Every Gauss-Newton operator checks the loss's output Hessians once. Computed
    eagerly, batch_jacobian wrapped pfor in a new tf.function of TensorFlow's each
    time, which it reported as retracing from the fifth model on. The check's trace
    is shared per model: the later fits trace nothing."""
    from tf_influence.engine import gauss_newton

    traced = []  # output_hessians runs in Python only while a function is traced
    output_hessians = gauss_newton.output_hessians
    monkeypatch.setattr(
        gauss_newton,
        "output_hessians",
        lambda *args: traced.append(1) or output_hessians(*args),
    )
    x, y = blobs
    model = make_mlp()
    counts = []
    with caplog.at_level("WARNING", logger="tensorflow"):
        for _ in range(7):
            im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
            im.compile(solver="cg", damping=0.1, curvature="gauss_newton")
            im.fit(x, y, batch_size=16, verbose=0)
            counts.append(len(traced))
    retracing = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 6, counts


def _arithmetic_optimization_off() -> bool:
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    off = rewriter_config_pb2.RewriterConfig.OFF
    return config.graph_options.rewrite_options.arithmetic_optimization == off


def test_a_grappler_arithmetic_clash_is_run_again_without_that_rewrite():
    """Grappler's AddOpsRewrite can make a temporary variable whose name clashes across
    parallel loop iterations (seen on a digits CNN's block Hessian products at batch
    size 256): the call is run again, and every later one, with it off in this thread."""
    from tf_influence.engine.compile import GraphFunction

    function = GraphFunction(lambda x: 2.0 * x)
    compiled, seen = function._function, []
    clash = (
        "Resource __per_step_0/while/body/_10/while/ArithmeticOptimizer/"
        "AddOpsRewrite_add_5/tmp_var/frame:1/iter:6/N10tensorflow19TemporaryVariableOp6TmpVarE"
    )

    def breaks_with_the_rewrite(*args):
        seen.append(_arithmetic_optimization_off())
        if not seen[-1]:
            raise tf.errors.AlreadyExistsError(None, None, clash)
        return compiled(*args)

    function._function = breaks_with_the_rewrite
    assert float(function(tf.constant(3.0))) == 6.0
    assert float(function(tf.constant(1.0))) == 2.0
    assert seen == [False, True, True]
    assert not _arithmetic_optimization_off()  # other calls keep the process's settings

    # Any other AlreadyExistsError is the caller's to see.
    other = GraphFunction(lambda x: x)

    def exists(*args):
        raise tf.errors.AlreadyExistsError(None, None, "a file that already exists")

    other._function = exists
    with pytest.raises(tf.errors.AlreadyExistsError, match="already exists"):
        other(tf.constant(1.0))
