"""Attention and normalisation layers against a dense float64 reference.

Each tiny model (MultiHeadAttention, EinsumDense, LayerNormalization, Embedding with
its sparse gradients, and a Transformer encoder block that combines them) is checked
four ways, on the training objective of DESIGN.md,
``R = (1/n) sum_j L_j + sum(model.losses)`` in inference mode:

(a) ``im.operator.dense()`` against a Hessian built here by two nested tapes over the
    flattened parameters (no vectorisation, no code of the package);
(b) ``explain`` with the Exact solver against ``-G_test @ solve(H + damping*I, G_train^T)``
    with per-example gradients from a plain loop of tapes;
(c) CG against Exact;
(d) the Gauss-Newton curvature against a dense ``mean_j J_j^T H_L,j J_j + hessian(Omega)``
    (``J_j`` the Jacobian of the logits), and Exact on it.

Every layer here accepts float64. The models are random or briefly trained, so their
Hessians are indefinite: the damping is chosen from the reference spectrum so that
``H + damping*I`` is positive definite.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi

F64 = "float64"
L2 = keras.regularizers.L2(0.01)
NUM_TRAIN, NUM_TEST = 24, 3
SEQ, VOCAB = 5, 9


def _attention():
    inputs = keras.Input((SEQ, 3), dtype=F64)
    h = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=2, dtype=F64, kernel_regularizer=L2, name="attention"
    )(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=F64, name="logits")(h))


def _einsum():
    inputs = keras.Input((SEQ, 3), dtype=F64)
    h = keras.layers.EinsumDense(
        "abc,cd->abd", output_shape=(SEQ, 4), bias_axes="d", activation="tanh", dtype=F64
    )(inputs)
    h = keras.layers.Flatten(dtype=F64)(h)
    h = keras.layers.EinsumDense(
        "ab,bc->ac", output_shape=3, bias_axes="c", dtype=F64, kernel_regularizer=L2
    )(h)
    return keras.Model(inputs, h)


def _layer_norm():
    inputs = keras.Input((SEQ, 3), dtype=F64)
    h = keras.layers.Flatten(dtype=F64)(inputs)
    h = keras.layers.Dense(6, activation="tanh", dtype=F64, kernel_regularizer=L2)(h)
    h = keras.layers.LayerNormalization(dtype=F64, name="norm")(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=F64)(h))


def _embedding():
    inputs = keras.Input((SEQ,), dtype="int32")
    # Two rows no example uses: their gradients and Hessian rows are zero.
    h = keras.layers.Embedding(VOCAB + 2, 3, dtype=F64, name="embedding")(inputs)
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=F64, kernel_regularizer=L2)(h))


def _encoder():
    """Embedding, self-attention, residual + LayerNormalization, pooling, classifier."""
    inputs = keras.Input((SEQ,), dtype="int32")
    e = keras.layers.Embedding(VOCAB, 4, dtype=F64)(inputs)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=F64)(e, e)
    h = keras.layers.LayerNormalization(dtype=F64)(keras.layers.Add(dtype=F64)([e, a]))
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=F64, kernel_regularizer=L2)(h))


MODELS = {
    "multi_head_attention": (_attention, "float"),
    "einsum_dense": (_einsum, "float"),
    "layer_normalization": (_layer_norm, "float"),
    "embedding": (_embedding, "tokens"),
    "transformer_encoder": (_encoder, "tokens"),
}


def _data(kind, seed):
    rng = np.random.default_rng(seed)
    n = NUM_TRAIN + NUM_TEST
    if kind == "tokens":
        x = rng.integers(0, VOCAB, size=(n, SEQ)).astype("int32")
    else:
        x = rng.normal(size=(n, SEQ, 3))
    y = rng.integers(0, 3, size=n)
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def _flat(tensors, variables=None):
    """Concatenates gradients (dense tensors or IndexedSlices) into one float64 vector;
    ``None`` (a variable the value does not depend on) counts as zeros."""
    variables = variables or [None] * len(tensors)
    return tf.concat(
        [
            tf.zeros([int(np.prod(v.shape))], F64)
            if t is None
            else tf.reshape(tf.convert_to_tensor(t), [-1])
            for t, v in zip(tensors, variables, strict=True)
        ],
        axis=0,
    )


def _objective(model, x, y):
    """``(1/n) sum_j L_j + sum(model.losses)``, in inference mode."""
    logits = model(x, training=False)
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return tf.reduce_mean(losses) + tf.add_n([tf.zeros([], F64)] + list(model.losses))


def _reference_hessian(model, x, y, value=_objective):
    """Hessian of ``value(model, x, y)`` by two nested tapes over the flattened
    parameters; the outer Jacobian in a loop over rows (``experimental_use_pfor=False``),
    not vectorised."""
    variables = model.trainable_variables

    @tf.function
    def hessian():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = value(model, x, y)
            grad = _flat(inner.gradient(total, variables), variables)
        rows = outer.jacobian(grad, variables, experimental_use_pfor=False)
        p = grad.shape[0]
        rows = [
            tf.zeros([p, int(np.prod(v.shape))], F64) if r is None else tf.reshape(r, [p, -1])
            for r, v in zip(rows, variables, strict=True)
        ]
        return tf.concat(rows, axis=1)

    return hessian().numpy()


def _reference_gauss_newton(model, x, y):
    """``(1/n) sum_j J_j^T (diag(p_j) - p_j p_j^T) J_j + hessian(sum(model.losses))``,
    with ``J_j`` the Jacobian of example j's logits (a loop over outputs, not vectorised)
    and ``p_j`` its softmax."""
    variables = model.trainable_variables

    @tf.function
    def jacobian():
        with tf.GradientTape() as tape:
            logits = model(x, training=False)
        parts = tape.jacobian(logits, variables, experimental_use_pfor=False)
        flat = [tf.reshape(tf.convert_to_tensor(j), [*logits.shape, -1]) for j in parts]
        return logits, tf.concat(flat, axis=-1)

    logits, jac = (t.numpy() for t in jacobian())
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    loss_hessians = np.stack([np.diag(q) - np.outer(q, q) for q in probs])
    matrix = np.einsum("nap,nab,nbq->pq", jac, loss_hessians, jac) / len(y)
    regularizers = lambda m, *_: tf.add_n([tf.zeros([], F64)] + list(m.losses))
    return matrix + _reference_hessian(model, x, y, regularizers)


def _loss_gradients(model, x, y):
    """One row per example: ``grad L(z_j)`` by a plain loop of tapes, shape ``(n, p)``."""
    rows = []
    for j in range(len(y)):
        with tf.GradientTape() as tape:
            logits = model(x[j : j + 1], training=False)
            loss = keras.losses.sparse_categorical_crossentropy(
                y[j : j + 1], logits, from_logits=True
            )[0]
        rows.append(_flat(tape.gradient(loss, model.trainable_variables)).numpy())
    return np.stack(rows)


def _train(model, x, y, steps=20, learning_rate=0.1):
    """A few full-batch gradient steps on the objective, so the model is mid-training.

    (``model.fit`` computes its loss in float32 and cannot add float64 regularisers.)
    """
    for _ in range(steps):
        with tf.GradientTape() as tape:
            value = _objective(model, x, y)
        grads = tape.gradient(value, model.trainable_variables)
        for variable, grad in zip(model.trainable_variables, grads, strict=True):
            variable.assign_sub(learning_rate * tf.convert_to_tensor(grad))


# The encoder block takes 20-60 s per check on two busy cores: slow.
CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name == "transformer_encoder" else name
    for name in sorted(MODELS)
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    make, kind = MODELS[request.param]
    keras.utils.set_random_seed(0)
    model = make()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    (x, y), (x_test, y_test) = _data(kind, seed=1)
    _train(model, x, y)
    hessian = _reference_hessian(model, x, y)
    smallest = np.linalg.eigvalsh(hessian)[0]
    damping = float(max(0.05, 0.05 - 1.5 * smallest))
    case = {
        "name": request.param,
        "model": model,
        "data": (x, y, x_test, y_test),
        "hessian": hessian,
        "damping": damping,
    }
    case["exact"] = _influence_model(case, "exact")
    return case


def _influence_model(case, solver):
    x, y, _, _ = case["data"]
    im = tfi.InfluenceModel(case["model"])
    im.compile(solver=solver, damping=case["damping"])
    im.fit(x, y, verbose=0)
    return im


def test_reference_has_every_parameter(case):
    p = sum(int(np.prod(v.shape)) for v in case["model"].trainable_variables)
    assert case["hessian"].shape == (p, p)
    assert 20 < p < 400
    if case["name"] == "embedding":
        # The last two rows of the (VOCAB + 2, 3) table come first, then Dense's 9 + 3.
        unused = slice(3 * VOCAB, 3 * VOCAB + 6)
        assert p == 45 and not case["hessian"][unused].any()
    np.testing.assert_allclose(case["hessian"], case["hessian"].T, atol=1e-10)


def test_operator_matches_dense_hessian(case):
    im = case["exact"]
    damping, reference = case["damping"], case["hessian"]
    expected = reference + damping * np.eye(len(reference))
    np.testing.assert_allclose(im.operator.dense().numpy(), expected, rtol=1e-7, atol=1e-9)


def test_exact_explain_matches_dense_reference(case):
    x, y, x_test, y_test = case["data"]
    model, damping, hessian = case["model"], case["damping"], case["hessian"]
    train = _loss_gradients(model, x, y)
    test = _loss_gradients(model, x_test, y_test)
    damped = hessian + damping * np.eye(len(hessian))
    expected = -test @ np.linalg.solve(damped, train.T)

    im = case["exact"]
    scores = im.explain(x_test, y_test, verbose=0)
    assert scores.shape == (NUM_TEST, NUM_TRAIN)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * scale)

    self_expected = np.einsum("jp,pj->j", train, np.linalg.solve(damped, train.T))
    np.testing.assert_allclose(im.self_influence(), self_expected, rtol=1e-6, atol=1e-12)


def test_cg_matches_exact(case):
    x, _, x_test, y_test = case["data"]
    exact = case["exact"].explain(x_test, y_test, verbose=0)
    im = _influence_model(case, tfi.solvers.CG(tol=1e-10))
    cg = im.explain(x_test, y_test, verbose=0)
    np.testing.assert_allclose(cg, exact, rtol=1e-5, atol=1e-7 * np.abs(exact).max())


def test_gauss_newton_matches_dense_reference(case):
    x, y, x_test, y_test = case["data"]
    model, damping = case["model"], 0.01
    reference = _reference_gauss_newton(model, x, y)
    assert np.linalg.eigvalsh(reference)[0] > -1e-10  # positive semi-definite
    im = tfi.InfluenceModel(model)
    im.compile(solver="exact", damping=damping, curvature="gauss_newton")
    im.fit(x, y, verbose=0)
    damped = reference + damping * np.eye(len(reference))
    np.testing.assert_allclose(im.operator.dense().numpy(), damped, rtol=1e-7, atol=1e-9)

    train = _loss_gradients(model, x, y)
    test = _loss_gradients(model, x_test, y_test)
    expected = -test @ np.linalg.solve(damped, train.T)
    scores = im.explain(x_test, y_test, verbose=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["embedding"], indirect=True)
def test_forward_over_reverse_products_with_an_embedding(case):
    """Forward mode through an Embedding's IndexedSlices gradient, against the dense H."""
    x, y, _, _ = case["data"]
    im = tfi.InfluenceModel(case["model"])
    im.compile(solver="exact", damping=case["damping"], hvp="forward_over_reverse")
    im.fit(x, y, verbose=0)
    reference = case["hessian"] + case["damping"] * np.eye(len(case["hessian"]))
    vectors = np.random.default_rng(0).normal(size=(len(reference), 3))
    np.testing.assert_allclose(
        im.operator.matvec(vectors).numpy(), reference @ vectors, rtol=1e-7, atol=1e-9
    )
