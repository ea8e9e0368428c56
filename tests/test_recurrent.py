"""Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional): pfor cannot vectorise their
gradients, so products and scores loop; the answers still equal a dense float64 reference."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.engine import vectorize

VOCAB, LENGTH, CLASSES = 6, 4, 3
DAMPING = 2.0  # the models are untrained: their Hessian is indefinite
SPARSE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PFOR_WARNING = "cannot be vectorised by TensorFlow's pfor"


def recurrent_layer(kind):
    """A tiny float64 recurrent layer named after its kind."""
    if kind == "lstm":
        return keras.layers.LSTM(2, dtype="float64", name="lstm")
    if kind == "gru":
        return keras.layers.GRU(2, dtype="float64", name="gru")
    if kind == "simple_rnn":
        return keras.layers.SimpleRNN(2, dtype="float64", name="simple_rnn")
    return keras.layers.Bidirectional(
        keras.layers.LSTM(2, dtype="float64"), dtype="float64", name="bidirectional"
    )


def make_classifier(kind, seed=0):
    """Embedding + recurrent layer + Dense logits on integer tokens, float64 weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 2, dtype="float64", name="embedding"),
            recurrent_layer(kind),
            keras.layers.Dense(CLASSES, dtype="float64", name="logits"),
        ]
    )


def tokens(size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, size=(size, LENGTH)).astype("int32")
    y = rng.integers(0, CLASSES, size=size)
    return x, y


def flat(tensors):
    return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], axis=0)


def mean_loss(model, x, y):
    per_example = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    return tf.reduce_mean(per_example)


def reference_hessian(model, x, y):
    """Hessian of the mean loss by nested tapes, column by column in a while loop (no pfor)."""
    variables = model.trainable_variables

    @tf.function(autograph=False)
    def hessian():
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                loss = mean_loss(model, x, y)
            grad = flat(inner.gradient(loss, variables))
        blocks = outer.jacobian(grad, variables, experimental_use_pfor=False)
        return tf.concat([tf.reshape(b, [grad.shape[0], -1]) for b in blocks], axis=1)

    return hessian().numpy()


def unrolled_twin(model, x):
    """The same network with ``unroll=True`` in its recurrent layers and the same weights.

    It computes the same function as a plain graph (no loop), which nested tapes
    differentiate twice in a fraction of the time the loop takes; the reference
    Hessian of a looping model is computed on its twin.
    """

    def unroll(config):
        return {**config, "config": {**config["config"], "unroll": True}}

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Bidirectional):
            config["layer"] = unroll(config["layer"])
            if "backward_layer" in config:
                config["backward_layer"] = unroll(config["backward_layer"])
        elif isinstance(layer, keras.layers.RNN):
            config["unroll"] = True
        return type(layer).from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    assert vectorize.loop_layers(model) and not vectorize.loop_layers(twin)
    np.testing.assert_allclose(twin(x), model(x), rtol=1e-12, atol=1e-14)
    return twin


def loop_gradients(model, x, y):
    """Per-example loss gradients by a plain Python loop of tapes, ``(n, p)``."""
    rows = []
    for j in range(len(x)):
        with tf.GradientTape() as tape:
            loss = mean_loss(model, x[j : j + 1], y[j : j + 1])
        rows.append(flat(tape.gradient(loss, model.trainable_variables)))
    return tf.stack(rows).numpy()


def pfor_warnings(record):
    return [w for w in record if PFOR_WARNING in str(w.message)]


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("lstm", marks=pytest.mark.slow),  # about 30 s, 60 s on a busy machine
        "gru",
        "simple_rnn",
        pytest.param("bidirectional", marks=pytest.mark.slow),
    ],
)
def test_recurrent_classifier_matches_dense_reference(kind):
    """dense(), Exact explain and self-influence against nested tapes and a dense solve."""
    model = make_classifier(kind)
    x, y = tokens(10)
    x_test, y_test = tokens(3, seed=1)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver="exact", damping=DAMPING)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        im.fit(x, y, batch_size=8, verbose=0)
        scores = im.explain(x_test, y_test, verbose=0)
        self_influence = im.self_influence()
    found = pfor_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    assert f"'{kind}'" in str(found[0].message)
    assert issubclass(found[0].category, RuntimeWarning)

    p = im.operator.num_params
    hessian = reference_hessian(unrolled_twin(model, x), x, y) + DAMPING * np.eye(p)
    assert np.linalg.eigvalsh(hessian)[0] > 0.02  # the reference itself is well posed
    np.testing.assert_allclose(im.operator.dense().numpy(), hessian, rtol=1e-9, atol=1e-11)

    train = loop_gradients(model, x, y)
    test = loop_gradients(model, x_test, y_test)
    solved = np.linalg.solve(hessian, train.T)
    np.testing.assert_allclose(scores, -test @ solved, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(
        self_influence, np.einsum("jp,pj->j", train, solved), rtol=1e-8, atol=1e-11
    )


@pytest.mark.slow
def test_lstm_cg_and_jacobian_scoring_match_exact():
    """CG's products and the jacobian scoring pass loop too, and agree with Exact."""
    model = make_classifier("lstm", seed=1)
    x, y = tokens(10, seed=2)
    x_test, y_test = tokens(4, seed=3)
    with pytest.warns(RuntimeWarning, match="'lstm' \\(LSTM\\)"):
        exact = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
        exact.compile(solver="exact", damping=DAMPING)
        exact.fit(x, y, verbose=0)
        expected = exact.explain(x_test, y_test, verbose=0)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver=tfi.solvers.CG(tol=1e-12, max_iter=500), damping=DAMPING, scoring="jacobian")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        im.fit(x, y, verbose=0)
        scores = im.explain(x_test, y_test, verbose=0)
    assert not pfor_warnings(record)  # once per model
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10)


def test_second_influence_model_reuses_the_looping_traces():
    """The loop mode is kept by the shared traces: no retrace, no second warning."""
    model = make_classifier("gru", seed=2)
    x, y = tokens(8, seed=4)

    def run():
        im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
        im.compile(solver="exact", damping=DAMPING)
        im.fit(x, y, verbose=0)
        return im, im.explain(x[:2], y[:2], verbose=0)

    with pytest.warns(RuntimeWarning, match="gru"):
        first, expected = run()
    assert first.operator._matvec.loop
    traces = tfi.engine.compile.tracing_count()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second, scores = run()
    assert not pfor_warnings(record)
    assert tfi.engine.compile.tracing_count() == traces
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-13)


class CumulativeSum(keras.layers.Layer):
    """A running sum over time written as a ``tf.while_loop`` (not a Keras RNN)."""

    def call(self, inputs):
        steps = tf.shape(inputs)[1]
        outputs = tf.TensorArray(inputs.dtype, size=steps)

        def body(t, state, outputs):
            state = tf.tanh(state + inputs[:, t])
            return t + 1, state, outputs.write(t, state)

        _, _, outputs = tf.while_loop(
            lambda t, *_: t < steps, body, (0, tf.zeros_like(inputs[:, 0]), outputs)
        )
        return tf.transpose(outputs.stack(), [1, 0, 2])[:, -1]


def test_custom_while_loop_layer_falls_back_when_pfor_fails():
    """A loop that is not a Keras RNN: pfor fails while tracing, the function loops."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 2, dtype="float64"),
            CumulativeSum(dtype="float64", name="running_sum"),
            keras.layers.Dense(CLASSES, dtype="float64"),
        ]
    )
    assert not vectorize.needs_loop(model)
    x, y = tokens(8, seed=5)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver="exact", damping=DAMPING)
    with pytest.warns(RuntimeWarning, match="Layer 'running_sum' \\(CumulativeSum\\) cannot"):
        im.fit(x, y, verbose=0)
        scores = im.explain(x[:2], y[:2], verbose=0)
    hessian = reference_hessian(model, x, y) + DAMPING * np.eye(im.operator.num_params)
    np.testing.assert_allclose(im.operator.dense().numpy(), hessian, rtol=1e-9, atol=1e-11)
    train = loop_gradients(model, x, y)
    expected = -train[:2] @ np.linalg.solve(hessian, train.T)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-11)


def test_model_without_loops_gives_no_warning_and_keeps_pfor():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 2, dtype="float64"),
            keras.layers.GlobalAveragePooling1D(dtype="float64"),
            keras.layers.Dense(CLASSES, dtype="float64"),
        ]
    )
    x, y = tokens(8, seed=6)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver="exact", damping=DAMPING)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        im.fit(x, y, verbose=0)
        im.explain(x[:2], y[:2], verbose=0)
    assert not pfor_warnings(record)
    assert not im.operator._matvec.loop


def test_loop_map_matches_pfor_with_missing_outputs():
    """In loop mode vectorized_map stacks the same values, None outputs kept as None."""
    elems = (tf.reshape(tf.range(12.0, dtype=tf.float64), [4, 3]), tf.range(4))

    def fn(elem):
        row, index = elem
        return {"square": row**2, "scaled": tf.cast(index, tf.float64) * row, "none": None}

    @tf.function(autograph=False)
    def both():
        with vectorize.loop_mode():
            looped = vectorize.vectorized_map(fn, elems)
        return looped, vectorize.vectorized_map(fn, elems)

    looped, vectorised = both()
    assert looped["none"] is None
    for key in ("square", "scaled"):
        np.testing.assert_array_equal(looped[key].numpy(), vectorised[key].numpy())


def reference_gauss_newton(model, x, y):
    """``(1/n) sum_j J_j^T (diag(p_j) - p_j p_j^T) J_j``, J from a while-loop Jacobian."""
    variables = model.trainable_variables

    @tf.function(autograph=False)
    def jacobian():
        with tf.GradientTape(persistent=True) as tape:
            logits = model(x)
        blocks = tape.jacobian(logits, variables, experimental_use_pfor=False)
        return logits, tf.concat([tf.reshape(b, [len(x), CLASSES, -1]) for b in blocks], axis=2)

    logits, jac = (t.numpy() for t in jacobian())
    probs = tf.nn.softmax(logits).numpy()
    total = 0.0
    for j in range(len(x)):
        output_hessian = np.diag(probs[j]) - np.outer(probs[j], probs[j])
        total = total + jac[j].T @ output_hessian @ jac[j]
    return total / len(x)


def test_gru_gauss_newton_matches_dense_reference():
    """Gauss-Newton products loop as well, and equal a dense J^T H J."""
    model = make_classifier("gru", seed=5)
    x, y = tokens(8, seed=7)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver="exact", damping=0.1, curvature="gauss_newton")
    with pytest.warns(RuntimeWarning, match="'gru' \\(GRU\\)"):
        im.fit(x, y, verbose=0)
        scores = im.explain(x[:2], y[:2], verbose=0)
    matrix = reference_gauss_newton(model, x, y) + 0.1 * np.eye(im.operator.num_params)
    np.testing.assert_allclose(im.operator.dense().numpy(), matrix, rtol=1e-9, atol=1e-11)
    train = loop_gradients(model, x, y)
    expected = -train[:2] @ np.linalg.solve(matrix, train.T)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-11)


def make_float_classifier(unroll, seed=0):
    """A float64 GRU classifier on (LENGTH, 2) float inputs (no embedding)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((LENGTH, 2), dtype="float64"),
            keras.layers.GRU(2, dtype="float64", name="gru", unroll=unroll),
            keras.layers.Dense(CLASSES, dtype="float64", name="logits"),
        ]
    )


FORWARD_MODE_ERROR = (
    r'`hvp` cannot be "forward_over_reverse".*\'{name}\' \({kind}\) runs a tf.while_loop'
    r'.*Received: hvp="forward_over_reverse".*hvp="reverse_over_reverse"'
)


@pytest.mark.parametrize("kind", ["gru", "bidirectional"])
def test_forward_mode_is_refused_on_loop_layers(kind):
    """Forward mode cannot go through a tf.while_loop: a clear error names hvp, the layer
    and the fix, instead of TensorFlow's error from inside the layer."""
    model = make_classifier(kind)
    kind_name = {"gru": "GRU", "bidirectional": "Bidirectional"}[kind]
    with pytest.raises(ValueError, match=FORWARD_MODE_ERROR.format(name=kind, kind=kind_name)):
        vectorize.check_forward_mode(model, "forward_over_reverse")
    for hvp in ("auto", "reverse_over_reverse"):
        vectorize.check_forward_mode(model, hvp)  # nested tapes differentiate the loop
    vectorize.check_forward_mode(make_float_classifier(unroll=True), "forward_over_reverse")
    # The fix the error offers, unroll=True, leaves no loop: in the layer itself, and in
    # both layers a Bidirectional wraps.
    unrolled = unrolled_twin(model, tokens(2)[0])
    vectorize.check_forward_mode(unrolled, "forward_over_reverse")
    assert not vectorize.needs_loop(unrolled)


def test_compile_with_forward_mode_on_a_recurrent_model_gives_the_clear_error():
    model = make_classifier("gru")
    x, y = tokens(6)
    im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
    im.compile(solver="exact", damping=DAMPING, hvp="forward_over_reverse")
    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=FORWARD_MODE_ERROR.format(name="gru", kind="GRU")),
    ):
        warnings.simplefilter("ignore", RuntimeWarning)
        im.fit(x, y, verbose=0)


def test_forward_mode_works_on_an_unrolled_recurrent_layer():
    """unroll=True (the fix the error offers) has no loop: forward mode equals nested tapes."""
    model = make_float_classifier(unroll=True, seed=4)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, LENGTH, 2)), rng.integers(0, CLASSES, size=8)
    dense = {}
    for hvp in ("forward_over_reverse", "reverse_over_reverse"):
        im = tfi.InfluenceModel(model, loss=SPARSE_LOGITS)
        im.compile(solver="exact", damping=DAMPING, hvp=hvp)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            im.fit(x, y, verbose=0)
        assert not pfor_warnings(record)  # no loop layer: pfor vectorises it
        dense[hvp] = im.operator.dense().numpy()
    expected = reference_hessian(model, x, y) + DAMPING * np.eye(im.operator.num_params)
    np.testing.assert_allclose(dense["forward_over_reverse"], expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dense["reverse_over_reverse"], expected, rtol=1e-9, atol=1e-11)
