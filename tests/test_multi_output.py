"""Models with several outputs: a loss per output, loss_weights, outputs without a loss.

The per-example loss is ``sum_k loss_weight_k * L_k`` (times the sample weight),
checked against what Keras computes (``model.compute_loss``), and the curvature
against dense float64 references: the Hessian of Keras's own training loss, and
``(1/n) sum_j J_j^T H_L,j J_j`` from full Jacobians for Gauss-Newton.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi

N = 24


@pytest.fixture
def float64():
    """Keras in float64 (so that ``compute_loss`` is a float64 reference too)."""
    old, policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # layers take the policy, cached from floatx
    try:
        yield
    finally:
        keras.backend.set_floatx(old)
        keras.config.set_dtype_policy(policy)


def three_heads(seed=0):
    """x (4) -> tanh (5) -> "cls" (3 logits), "reg" (2), "aux" (1, trained without a loss)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(
        5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01), name="hidden"
    )(inputs)
    outputs = [
        keras.layers.Dense(3, name="cls")(hidden),
        keras.layers.Dense(2, name="reg")(hidden),
        keras.layers.Dense(1, name="aux")(hidden),
    ]
    return keras.Model(inputs, outputs)


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4))
    targets = {
        "cls": rng.integers(0, 3, N),
        "reg": rng.normal(size=(N, 2)),
        "aux": rng.normal(size=(N, 1)),
    }
    return x, targets, rng.uniform(0.0, 2.0, N)


def sparse():
    """Made under the float64 fixture, so that Keras computes it in float64 too."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


ANALYSED = ["hidden", "cls", "reg"]  # "aux" gets no gradient from the loss

COMPILED = {
    "dict, None, dict weights": lambda: dict(
        loss={"cls": sparse(), "reg": "mse", "aux": None},
        loss_weights={"cls": 1.0, "reg": 0.5, "aux": 0.0},
    ),
    "list, None, list weights": lambda: dict(
        loss=[sparse(), "mse", None], loss_weights=[0.3, 2.0, 1.0]
    ),
    "dict without weights": lambda: dict(loss={"cls": sparse(), "reg": "mse", "aux": None}),
}


def _objective_value(im, x, y, weights=None):
    targets = y if weights is None else tfi.engine.losses.WeightedTargets(y, weights)
    values = im.objective.per_example_loss(x, targets)
    return float(tf.reduce_mean(values) + im.objective.regularization())


@pytest.mark.parametrize("compiled", list(COMPILED), ids=list(COMPILED))
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_is_what_keras_computes(float64, compiled, weighted):
    model = three_heads()
    model.compile(**COMPILED[compiled]())
    x, targets, weights = data()
    weights = weights if weighted else None
    y_keras = [targets["cls"], targets["reg"], targets["aux"]]
    expected = model.compute_loss(x, y_keras, model(x), sample_weight=weights)
    im = tfi.InfluenceModel(model, params=ANALYSED)
    ours = {k: targets[k] for k in ("cls", "reg")}  # "aux" has no loss: may be left out
    assert _objective_value(im, x, ours, weights) == pytest.approx(float(expected), rel=1e-12)
    # As a list: one entry per output, or one per output with a loss.
    assert _objective_value(im, x, tuple(y_keras), weights) == pytest.approx(float(expected))
    pair = (targets["cls"], targets["reg"])
    assert _objective_value(im, x, pair, weights) == pytest.approx(float(expected), rel=1e-12)


def test_loss_weights_with_an_explicit_loss(float64):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, _ = data()
    y = {k: targets[k] for k in ("cls", "reg")}
    compiled = tfi.engine.Objective(model, params=ANALYSED)
    explicit = tfi.engine.Objective(
        model,
        loss={"cls": sparse(), "reg": "mse"},
        params=ANALYSED,
        loss_weights={"cls": 1.0, "reg": 0.5},
    )
    np.testing.assert_allclose(
        explicit.per_example_loss(x, y).numpy(), compiled.per_example_loss(x, y).numpy()
    )
    # The front doors pass `loss_weights=` on: InfluenceModel, TracIn, the callback.
    loss = {"cls": sparse(), "reg": "mse"}
    im = tfi.InfluenceModel(model, loss=loss, params=ANALYSED, loss_weights={"reg": 0.5})
    tracin = tfi.TracIn(model, [(model.get_weights(), 1.0)], loss, ANALYSED, {"reg": 0.5})
    for objective in (im.objective, tracin.objective):
        np.testing.assert_allclose(
            objective.per_example_loss(x, y).numpy(), compiled.per_example_loss(x, y).numpy()
        )
    unweighted = tfi.InfluenceModel(model, loss=loss, params=ANALYSED).objective
    assert not np.allclose(
        unweighted.per_example_loss(x, y).numpy(), compiled.per_example_loss(x, y).numpy()
    )
    callback = tfi.callbacks.InfluenceCallback(
        x, y, loss=loss, params=ANALYSED, loss_weights={"reg": 0.5}
    )
    callback.set_model(model)
    np.testing.assert_allclose(
        callback._influence_model().objective.per_example_loss(x, y).numpy(),
        compiled.per_example_loss(x, y).numpy(),
    )


def test_one_loss_for_every_output(float64):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = [keras.layers.Dense(2, name="a")(inputs), keras.layers.Dense(2, name="b")(inputs)]
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse", loss_weights=3.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), [rng.normal(size=(N, 2)), rng.normal(size=(N, 2))]
    expected = float(model.compute_loss(x, y, model(x)))
    im = tfi.InfluenceModel(model)
    assert _objective_value(im, x, tuple(y)) == pytest.approx(expected, rel=1e-12)
    assert im.objective.loss_name == "mean_squared_error*3.0"


def test_dict_outputs_of_a_subclassed_model(float64):
    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__()
            self.cls = keras.layers.Dense(3)
            self.reg = keras.layers.Dense(1)

        def call(self, x):
            return {"cls": self.cls(x), "reg": self.reg(x)}

    keras.utils.set_random_seed(0)
    model = TwoHeads()
    x, targets, _ = data()
    model(x[:1])
    loss = {"cls": sparse(), "reg": keras.losses.MeanSquaredError()}
    im = tfi.InfluenceModel(model, loss=loss)
    y = {"cls": targets["cls"], "reg": targets["reg"][:, :1]}
    outputs = model(x)
    expected = sparse()(y["cls"], outputs["cls"]) + keras.losses.MeanSquaredError()(
        y["reg"], outputs["reg"]
    )
    assert _objective_value(im, x, y) == pytest.approx(float(expected), rel=1e-12)


def _dense_hessian_of_keras_loss(model, variables, x, y, weights):
    """The Hessian of ``model.compute_loss`` (Keras's own training loss), nested tapes."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = model.compute_loss(x, y, model(x, training=False), sample_weight=weights)
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    jacobians = outer.jacobian(flat, variables)
    return tf.concat([tf.reshape(j, [flat.shape[0], -1]) for j in jacobians], axis=1).numpy()


@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_against_keras_training_loss(float64, weighted):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, weights = data()
    weights = weights if weighted else None
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile("cg", damping=0.0, curvature="hessian")
    im.fit(x, targets, batch_size=7, sample_weight=weights, verbose=0)
    y_keras = [targets["cls"], targets["reg"], targets["aux"]]
    reference = _dense_hessian_of_keras_loss(model, im.objective.variables, x, y_keras, weights)
    np.testing.assert_allclose(im.operator.dense().numpy(), reference, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_gauss_newton_against_dense_jacobians(float64, weighted):
    model = three_heads(seed=1)
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, weights = data(seed=1)
    weights = weights if weighted else np.ones(N)
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile("cg", damping=0.0, curvature="gauss_newton")
    im.fit(x, targets, batch_size=7, sample_weight=weights if weighted else None, verbose=0)
    variables = im.objective.variables
    with tf.GradientTape(persistent=True) as tape:
        cls, reg, _ = model(x, training=False)
        joined = tf.concat([cls, reg], axis=1)  # (n, 5): the outputs with a loss
    jacobian = tape.jacobian(joined, variables)
    jacobian = tf.concat([tf.reshape(j, [N, 5, -1]) for j in jacobian], axis=2).numpy()
    # H_L,j: w_j * (softmax cross-entropy Hessian (3x3), 0.5 * MSE Hessian (2x2)).
    z = tf.constant(joined.numpy())
    unreduced = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            per_example = unreduced(targets["cls"], z[:, :3]) + 0.5 * tf.reduce_mean(
                (z[:, 3:] - targets["reg"]) ** 2, axis=1
            )
            total = tf.reduce_sum(weights * per_example)
        grad = inner.gradient(total, z)
    loss_hessians = outer.batch_jacobian(grad, z).numpy()
    reference = np.einsum("nap,nab,nbq->pq", jacobian, loss_hessians, jacobian) / N
    kernel = variables[0]  # L2(0.01) on the hidden kernel
    size = int(np.prod(kernel.shape))
    reference[:size, :size] += np.eye(size) * 0.02
    np.testing.assert_allclose(im.operator.dense().numpy(), reference, atol=1e-12)


def test_explain_with_predicted_classes_of_classification_heads(float64):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    model = keras.Model(
        inputs, [keras.layers.Dense(3, name="a")(hidden), keras.layers.Dense(1, name="b")(hidden)]
    )
    binary = keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(loss={"a": sparse(), "b": binary})
    x, targets, _ = data()
    y = {"a": targets["cls"], "b": (targets["reg"][:, :1] > 0).astype("float64")}
    im = tfi.InfluenceModel(model)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    im.fit(x, y, verbose=0)
    a, b = model(x[:3])
    predicted = {"a": np.argmax(a, axis=-1), "b": (b.numpy() > 0).astype("float64")}
    np.testing.assert_allclose(
        im.explain(x[:3], verbose=0), im.explain(x[:3], predicted, verbose=0)
    )
    # target= keeps working: the gradient of one logit.
    scores = im.explain(x[:3], target=lambda m, inputs: m(inputs)[0][:, 1], verbose=0)
    assert scores.shape == (3, N) and np.all(np.isfinite(scores))


def test_regression_head_without_y_test_is_refused(float64):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, _ = data()
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    im.fit(x, targets, verbose=0)
    with pytest.raises(ValueError, match=r"y_test=None.*'mean_squared_error' on output 'reg'"):
        im.explain(x[:2], verbose=0)


def test_targets_that_miss_a_head_are_refused(float64):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, _ = data()
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    with pytest.raises(ValueError, match=r"`y` misses the targets of output\(s\) \['reg'\]"):
        im.fit(x, {"cls": targets["cls"]}, verbose=0)
    with pytest.raises(ValueError, match=r"one target per output \(3.*or one per output with a"):
        im.fit(x, (targets["cls"],), verbose=0)
    with pytest.raises(ValueError, match=r"must hold the targets of every output with a loss"):
        im.fit(x, targets["cls"], verbose=0)
    im.fit(x, targets, verbose=0)
    with pytest.raises(ValueError, match=r"`y_test` misses the targets of output\(s\) \['cls'\]"):
        im.explain(x[:2], {"reg": targets["reg"][:2]}, verbose=0)
    # A label out of range is named with its output.
    bad = dict(targets, cls=np.where(np.arange(N) == 4, 7, targets["cls"]))
    with pytest.raises(ValueError, match=r"y\['cls'\]` holds 7 at example 4"):
        im.fit(x, bad, verbose=0)


def test_output_without_a_loss_is_named_when_its_layer_is_analysed(float64):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, _ = data()
    im = tfi.InfluenceModel(model)
    with pytest.raises(ValueError, match=r"aux/kernel.*outputs without a loss: \['aux'\].*params="):
        im.fit(x, targets, verbose=0)


def test_dataset_with_dict_targets_and_weights_equals_arrays(float64):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, weights = data()
    y = {k: targets[k] for k in ("cls", "reg")}
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile("exact", damping=0.1, curvature="gauss_newton")
    expected = im.fit(x, y, batch_size=8, sample_weight=weights, verbose=0)
    expected = expected.explain(x[:3], {k: v[:3] for k, v in y.items()}, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)
    scores = im.fit(dataset, verbose=0).explain(x[:3], {k: v[:3] for k, v in y.items()}, verbose=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-14)


def test_bad_loss_specs_are_refused(float64):
    model = three_heads()
    with pytest.raises(ValueError, match=r"names outputs the model does not have: \['klass'\]"):
        tfi.InfluenceModel(model, loss={"klass": sparse()}).objective.per_example_loss(
            np.zeros((2, 4)), {"klass": np.zeros(2)}
        )
    with pytest.raises(ValueError, match=r"one entry per output of the model \(3"):
        tfi.InfluenceModel(model, loss=[sparse(), "mse"]).objective.per_example_loss(
            np.zeros((2, 4)), (np.zeros(2), np.zeros((2, 2)))
        )
    with pytest.raises(ValueError, match="No output has a loss"):
        tfi.InfluenceModel(model, loss=[None, None, None])


def test_scoring_paths_and_batch_size_agree_with_weights(float64):
    """Per-example gradients and forward-mode scoring, two heads, weighted, two batch sizes."""
    model = three_heads(seed=2)
    model.compile(**COMPILED["list, None, list weights"]())
    x, targets, weights = data(seed=2)
    y = {k: targets[k] for k in ("cls", "reg")}
    tests = {k: v[:4] for k, v in y.items()}
    results = []
    for scoring, batch_size in (("jacobian", 5), ("jvp", 8)):
        im = tfi.InfluenceModel(model, params=ANALYSED)
        im.compile("exact", damping=0.1, curvature="gauss_newton", scoring=scoring)
        im.fit(x, y, batch_size=batch_size, sample_weight=weights, verbose=0)
        results.append((im.explain(x[:4], tests, verbose=0), im.self_influence(verbose=0)))
    for first, second in zip(*results, strict=True):
        np.testing.assert_allclose(second, first, rtol=1e-9, atol=1e-12)
    # Self-influence is the diagonal of the training set explained as test points.
    diagonal = -np.diag(im.explain(x, y, verbose=0))
    np.testing.assert_allclose(results[1][1], diagonal, rtol=1e-9, atol=1e-12)


def test_export_of_several_outputs_is_refused_clearly(float64, tmp_path):
    model = three_heads()
    model.compile(**COMPILED["dict, None, dict weights"]())
    x, targets, _ = data()
    im = tfi.InfluenceModel(model, params=ANALYSED)
    im.compile(solver=tfi.solvers.Arnoldi(rank=4, seed=0), damping=0.1)
    im.fit(x, targets, verbose=0)
    with pytest.raises(ValueError, match=r"`export` serves models with one output.*3 outputs"):
        im.export(tmp_path / "served")
    assert not (tmp_path / "served").exists()
