"""Custom test functions: `explain(..., target=fn)` replaces the test loss by fn."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import fit_exact


def logit_of_class_1(model, x):
    return model(x)[:, 1]


def test_target_scores_equal_the_dense_formula(mlp, blobs):
    x, y = blobs
    im = fit_exact(mlp, x, y)
    scores = im.explain(x[:4], target=logit_of_class_1, verbose=0)
    objective = im.objective
    grads_target = []
    for i in range(4):
        with tf.GradientTape() as tape:
            value = logit_of_class_1(mlp, x[i : i + 1])[0]
        grads_target.append(objective.layout.flatten(tape.gradient(value, objective.variables)))
    g_train = im.state.gradients(x, y).numpy()
    hessian = im.operator.dense().numpy()
    expected = -np.stack(grads_target) @ np.linalg.solve(hessian, g_train.T)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-13)
    top = im.top_k(x[:4], k=3, target=logit_of_class_1, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-scores, axis=1)[:, :3])
    removal = im.predict_removal([[2], [9]], x[:4], target=logit_of_class_1)
    np.testing.assert_allclose(removal, -scores[:, [2, 9]] / len(x), rtol=1e-9)


def test_target_and_loss_solutions_are_cached_apart(mlp, blobs):
    x, y = blobs
    im = fit_exact(mlp, x, y)
    a = im.explain(x[:3], y[:3], verbose=0)
    b = im.explain(x[:3], y[:3], target=logit_of_class_1, verbose=0)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(im.explain(x[:3], y[:3], verbose=0), a)


@pytest.mark.parametrize(
    "target, error, message",
    [
        (3, TypeError, r"`target` must be a callable fn\(model, x\)"),
        (lambda model, x: model(x), ValueError, r"one scalar per example, shape \(3,\)"),
        (lambda model, x: model(x)[:, 9], ValueError, r"`target` failed on a batch"),
        (
            lambda model, x: tf.argmax(model(x), axis=1),
            ValueError,
            r"floating-point values. Received: dtype int64",
        ),
    ],
)
def test_bad_target(mlp, blobs, target, error, message):
    x, y = blobs
    with pytest.raises(error, match=message):
        fit_exact(mlp, x, y).explain(x[:3], target=target, verbose=0)


@pytest.mark.parametrize("relative", ["theta", "loss"])
def test_relative_influence_equals_the_dense_formula(mlp, blobs, relative):
    x, y = blobs
    im = fit_exact(mlp, x, y)
    scores = im.explain(x[:4], y[:4], verbose=0)
    relatif = im.explain(x[:4], y[:4], verbose=0, relative=relative)
    g_train = im.state.gradients(x, y).numpy()
    moved = np.linalg.solve(im.operator.dense().numpy(), g_train.T)  # (p, n)
    if relative == "theta":
        norms = np.linalg.norm(moved, axis=0)
    else:
        norms = np.sqrt(np.sum(g_train.T * moved, axis=0))
    np.testing.assert_allclose(relatif, scores / norms[None, :], rtol=1e-9)
    top = im.top_k(x[:4], y[:4], k=5, verbose=0, relative=relative)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-relatif, axis=1)[:, :5])
    if relative == "loss":
        np.testing.assert_allclose(norms**2, im.self_influence(verbose=0), rtol=1e-9)


def test_relative_bad_value(mlp, blobs):
    x, y = blobs
    with pytest.raises(ValueError, match=r'`relative` must be None, "theta" or "loss"'):
        fit_exact(mlp, x, y).explain(x[:2], y[:2], relative="yes")
