"""Labels that are not numbers (strings, bytes, objects) are refused with a clear error."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian
from sklearn.datasets import load_iris

import tf_influence as tfi
from tf_influence.engine.objective import check_numeric_targets

NOT_NUMBERS = r"Argument `{}` must hold numbers.*Received: {} of dtype {}.*LabelEncoder"


@pytest.fixture(scope="module")
def iris():
    """Iris features (float64) with integer labels and the same labels as species names."""
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    return x, y, names


def make_model(loss=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    )
    model.compile(loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def influence_model(loss=None):
    im = tfi.InfluenceModel(make_model(loss))
    im.compile(solver="exact", damping=0.01)
    return im


@pytest.fixture(scope="module")
def fitted(iris):
    x, y, _ = iris
    return influence_model().fit(x, y)


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda names: names, id="unicode-array"),
        pytest.param(lambda names: names.astype("S"), id="bytes-array"),
        pytest.param(lambda names: names.astype(object), id="object-array"),
        pytest.param(lambda names: list(names), id="list"),
        pytest.param(lambda names: tf.constant(names), id="tf.string-tensor"),
    ],
)
def test_fit_refuses_string_labels(iris, encode):
    x, _, names = iris
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y", "y", "object")):
        influence_model().fit(x, encode(names))


def test_fit_refuses_string_labels_for_any_loss(iris):
    # Regression losses have no range check, but still need numbers.
    x, _, names = iris
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y", "y", "object")):
        influence_model(loss="mse").fit(x, names[:, None])


def test_explain_refuses_string_labels(iris, fitted):
    x, _, names = iris
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y_test", "y_test", "object")):
        fitted.explain(x[:5], names[:5])
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y_test", "y_test", "object")):
        fitted.explain(x[:5], list(names[:5]))


def test_top_k_refuses_string_labels(iris, fitted):
    x, _, names = iris
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y_test", "y_test", "object")):
        fitted.top_k(x[:5], names[:5], k=3)


def test_integer_labels_still_explained(iris, fitted):
    """The check lets numbers through: scores match the dense solve by hand."""
    x, y, _ = iris
    scores = fitted.explain(x[:3], y[:3])
    objective = fitted.objective

    def gradients(xs, ys):
        with tf.GradientTape() as tape:
            losses = objective.per_example_loss(xs, ys)
        jacobian = tape.jacobian(losses, objective.variables)
        return objective.layout.flatten_batched(jacobian, len(xs), tf.float64).numpy()

    hessian = dense_hessian(objective, x, y) + 0.01 * np.eye(objective.num_params)
    expected = -gradients(x[:3], y[:3]) @ np.linalg.solve(hessian, gradients(x, y).T)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    ("labels", "dtype"),
    [
        (np.array(["a", "bc"]), r"<U2 \(strings\)"),
        (np.array([b"a", b"bc"]), r"\|S2 \(bytes\)"),
        (np.array(["a", None], dtype=object), r"object \(strings, as str\)"),
        (["a", "b"], r"<U1 \(strings\)"),
        (tf.constant(["a"]), r"string \(tf.string\)"),
        (tf.TensorSpec([None], tf.string), r"string \(tf.string\)"),
        ((np.zeros(2), np.array(["a", "b"])), r"<U1 \(strings\)"),
    ],
)
def test_check_numeric_targets_names_the_dtype(labels, dtype):
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y", "y", dtype)):
        check_numeric_targets(labels, "y")


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 2]),
        np.array([0.5, 1.0], dtype=np.float32),
        np.array([True, False]),
        np.array([0, 2], dtype=object),
        [0, 1],
        tf.constant([1.0]),
        tf.TensorSpec([None], tf.int64),
        {"a": np.zeros(2), "b": np.ones(2)},
    ],
)
def test_check_numeric_targets_accepts_numbers(labels):
    check_numeric_targets(labels, "y")


def test_dataset_of_string_labels(iris):
    x, _, names = iris
    dataset = tf.data.Dataset.from_tensor_slices((x, names)).batch(32)
    with pytest.raises(ValueError, match=NOT_NUMBERS.format("y", "y", "string")):
        influence_model().fit(dataset)
