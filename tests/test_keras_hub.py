"""A KerasHub text classifier against a dense float64 reference.

A randomly initialised ``keras_hub.models.BertTextClassifier`` (a 2-layer BERT backbone
fed token ids, segment ids and a padding mask; no preset, tokenizer or downloaded
weights) is fine-tuned briefly on a synthetic task. Its curvature and influence scores
are checked against a Hessian built here by nested tapes and a dense solve with
per-example gradients from a loop of tapes, over all of its parameters (a subset of
the same layer types is checked in tests/test_layers.py).

keras-hub is in the ``hub`` and ``dev`` extras, so these tests run in CI. The
comparison takes about a minute on two CPU cores (most of it tracing the products and
per-example gradients through BERT), so it is marked slow.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi

F64 = "float64"
VOCAB, SEQ, NUM_TRAIN, NUM_TEST = 10, 6, 20, 3


def _sentences(n, rng):
    """Token ids 1..VOCAB-1 with trailing padding (id 0, masked); label: more 1s than 2s."""
    lengths = rng.integers(3, SEQ + 1, size=n)
    token_ids = rng.integers(1, VOCAB, size=(n, SEQ)).astype("int32")
    padding_mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    token_ids *= padding_mask
    count = lambda t: ((token_ids == t) & (padding_mask == 1)).sum(axis=1)
    labels = (count(1) >= count(2)).astype("int32")
    x = {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": padding_mask,
    }
    return x, labels


def _rows(x, rows):
    return {key: value[rows] for key, value in x.items()}


def _flat(tensors):
    """Concatenates gradients (dense tensors or IndexedSlices) into one vector."""
    return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], axis=0)


def _loss(model, x, y):
    logits = model(x, training=False)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _reference_hessian(model, variables, x, y):
    """Hessian of ``mean_j L_j`` (BERT has no regularisers) over ``variables``, by nested
    tapes; the outer Jacobian in a loop over rows (``experimental_use_pfor=False``)."""
    assert not model.losses

    @tf.function
    def hessian():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_mean(_loss(model, x, y))
            grad = _flat(inner.gradient(value, variables))
        rows = outer.jacobian(grad, variables, experimental_use_pfor=False)
        return tf.concat([tf.reshape(r, [grad.shape[0], -1]) for r in rows], axis=1)

    return hessian().numpy()


def _loss_gradients(model, variables, x, y):
    """``grad L(z_j)`` for each example by a plain loop of tapes, shape ``(n, p)``."""
    rows = []
    for j in range(len(y)):
        with tf.GradientTape() as tape:
            loss = _loss(model, _rows(x, slice(j, j + 1)), y[j : j + 1])[0]
        rows.append(_flat(tape.gradient(loss, variables)).numpy())
    return np.stack(rows)


def _build():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=4,
        intermediate_dim=8,
        max_sequence_length=SEQ,
        num_segments=1,
        dtype=F64,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


@pytest.fixture(scope="module")
def classifier():
    model = _build()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x, y = _sentences(NUM_TRAIN + NUM_TEST, rng)
    train = (_rows(x, slice(0, NUM_TRAIN)), y[:NUM_TRAIN])
    test = (_rows(x, slice(NUM_TRAIN, None)), y[NUM_TRAIN:])
    model.fit(*train, epochs=5, batch_size=10, shuffle=False, verbose=0)
    return model, train, test


def _check(model, train, test, params, damping=None):
    """Compares the operator, Exact's scores and self-influence, and CG with a dense
    reference over the chosen parameters; returns the number of parameters."""
    (x, y), (x_test, y_test) = train, test
    im = tfi.InfluenceModel(model, params=params)
    hessian_vars = _variables(model, params)
    hessian = _reference_hessian(model, hessian_vars, x, y)
    p = len(hessian)
    if damping is None:
        damping = float(max(0.05, 0.05 - 1.5 * np.linalg.eigvalsh(hessian)[0]))
    damped = hessian + damping * np.eye(p)

    im.compile(solver="exact", damping=damping)
    im.fit(x, y, verbose=0)
    assert im.operator.shape == (p, p)
    np.testing.assert_allclose(im.operator.dense().numpy(), damped, rtol=1e-7, atol=1e-9)

    train_grads = _loss_gradients(model, hessian_vars, x, y)
    test_grads = _loss_gradients(model, hessian_vars, x_test, y_test)
    expected = -test_grads @ np.linalg.solve(damped, train_grads.T)
    scores = im.explain(x_test, y_test, verbose=0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * scale)
    self_expected = np.einsum("jp,pj->j", train_grads, np.linalg.solve(damped, train_grads.T))
    np.testing.assert_allclose(im.self_influence(), self_expected, rtol=1e-6, atol=1e-12)

    im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=damping)
    cg = im.explain(x_test, y_test, verbose=0)
    np.testing.assert_allclose(cg, expected, rtol=1e-5, atol=1e-7 * scale)
    return p


def _variables(model, params):
    if params is None:
        return list(model.trainable_variables)
    chosen = {id(v) for layer in params for v in layer.trainable_variables}
    return [v for v in model.trainable_variables if id(v) in chosen]


def test_classifier_is_float64():
    model = _build()
    x, _ = _sentences(4, np.random.default_rng(0))
    assert all(v.dtype == F64 for v in model.trainable_variables)
    assert model.predict(x, verbose=0).dtype == np.float64
    assert model.count_params() == 450


@pytest.mark.slow
def test_classifier_learns(classifier):
    model, (x, y), _ = classifier
    assert np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y) >= 0.8


@pytest.mark.slow
def test_whole_classifier_matches_dense_reference(classifier):
    model, train, test = classifier
    p = _check(model, train, test, None)
    assert p == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
