"""Guards against silent wrong answers: conditioning, scales, labels, data order, loading."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.solvers import CurvatureError


def _im(model, solver="exact", damping=0.5):
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping)
    return im


def test_exact_reports_the_condition_number(mlp, blobs):
    x, y = blobs
    im = _im(mlp).fit(x, y, verbose=0)
    im.explain(x[:2], y[:2], verbose=0)
    info = im.diagnostics.info
    eigenvalues = np.linalg.eigvalsh(im.operator.dense().numpy())
    assert info["largest_eigenvalue"] == pytest.approx(eigenvalues[-1], rel=1e-3)
    assert info["smallest_eigenvalue"] == pytest.approx(eigenvalues[0], rel=1e-3)
    assert info["condition_number"] == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-2)


def test_exact_refuses_a_near_singular_hessian_without_damping():
    """Two almost identical features: H is invertible but its inverse is rounding noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    x = np.concatenate([x, x[:, :1] + 1e-3 * rng.normal(size=(60, 1))], axis=1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    y = rng.normal(size=(60, 1)).astype("float32")
    with pytest.raises(
        CurvatureError,
        match=r"nearly singular.*condition number .*e\+0[5-9].*"
        r"above 8.4e\+04 in float32.*Pass a damping",
    ):
        _im(model, damping=0.0).fit(x, y, verbose=0)
    # The suggested order of damping makes it usable.
    im = _im(model, damping=1e-3).fit(x, y, verbose=0)
    assert np.all(np.isfinite(im.explain(x[:2], y[:2], verbose=0)))


def test_lissa_chooses_its_scale_by_power_iteration(mlp, blobs):
    x, y = blobs
    im = _im(mlp, tfi.solvers.LiSSA(recursion_depth=50)).fit(x, y, batch_size=25, verbose=0)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        im.explain(x[:1], y[:1], verbose=0)
    largest = np.linalg.eigvalsh(im.operator.dense().numpy())[-1]
    # 1.5x the largest eigenvalue seen (full data and a few batches): above the full one.
    assert im.diagnostics.info["scale"] >= 1.5 * largest * 0.99
    assert im.diagnostics.info["scale"] < 10 * largest


@pytest.mark.parametrize(
    "loss, targets, message",
    [
        (
            "sparse_categorical_crossentropy",
            3,
            r"holds 3.0 at example 7.*class indices 0\.\.2 for a "
            r"model with 3 outputs",
        ),
        ("sparse_categorical_crossentropy", -1, r"holds -1.0 at example 7"),
        ("sparse_categorical_crossentropy", 0.5, r"holds 0.5 at example 7"),
        ("categorical_crossentropy", 2.0, r"holds 2.0 at example 7.*values in \[0, 1\]"),
        ("binary_crossentropy", -1.0, r"holds -1.0 at example 7.*values in \[0, 1\]"),
        ("hinge", 3.0, r"holds 3.0 at example 7.*values in \[-1, 1\]"),
    ],
)
def test_labels_out_of_range_name_the_example(blobs, loss, targets, message):
    x, y = blobs
    model = make_mlp(num_classes=1 if loss in ("binary_crossentropy", "hinge") else 3)
    if loss == "categorical_crossentropy":
        y = np.eye(3)[y]
        y[7, 0] = targets
    elif loss in ("binary_crossentropy", "hinge"):
        y = (y[:, None] > 0).astype("float64")
        y[7, 0] = targets
    else:
        y = y.astype("float64")
        y[7] = targets
    im = tfi.InfluenceModel(model, loss=loss)
    im.compile(damping=1.0)
    with pytest.raises(ValueError, match=rf"Argument `y` {message}"):
        im.fit(x, y, verbose=0)


def test_test_labels_out_of_range_name_the_test_example(mlp, blobs):
    x, y = blobs
    im = _im(mlp).fit(x, y, verbose=0)
    y_test = np.array([0, 1, 2, 1, 0, 9])
    with pytest.raises(ValueError, match=r"Argument `y_test` holds 9 at example 37\b"):
        im.explain(x[:38], np.concatenate([y[:32], y_test]), verbose=0, batch_size=32)


def test_reshuffled_dataset_is_refused(mlp, blobs):
    x, y = blobs
    im = _im(mlp)
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(50).batch(8)
    with pytest.raises(ValueError, match=r"different order .* on each pass.*reshuffle_each_"):
        im.fit(shuffled, verbose=0)
    # Random augmentation that changes between passes (a stateful generator).
    generator = tf.random.Generator.from_seed(1)
    augmented = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    augmented = augmented.map(lambda a, b: (a + generator.normal(tf.shape(a), dtype=a.dtype), b))
    with pytest.raises(ValueError, match=r"different order \(or different examples\)"):
        im.fit(augmented, verbose=0)
    # A fixed shuffle is a fixed order: accepted, and column j is its j-th example.
    fixed = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        50, seed=3, reshuffle_each_iteration=False
    )
    order = np.array(
        [int(np.flatnonzero((x == a).all(1))[0]) for a, _ in fixed.as_numpy_iterator()]
    )
    im.fit(fixed.batch(8), verbose=0)
    reference = _im(mlp).fit(x, y, verbose=0).explain(x[:2], y[:2], verbose=0)
    np.testing.assert_allclose(im.explain(x[:2], y[:2], verbose=0), reference[:, order], rtol=1e-9)


def test_saved_state_has_no_training_data_unless_asked(mlp, blobs, tmp_path):
    x, y = blobs
    im = _im(mlp).fit(x, y, verbose=0)
    im.save(tmp_path / "state.npz")
    with np.load(tmp_path / "state.npz", allow_pickle=False) as archive:
        stored = [archive[name] for name in archive.files]
    # No array holds a training input row.
    assert not any(a.ndim == 2 and a.shape[1] == 4 and np.isin(x[0], a).all() for a in stored)
    with pytest.raises(ValueError, match=r"holds no training data"):
        tfi.InfluenceModel.load(tmp_path / "state.npz", mlp)
    loaded = tfi.InfluenceModel.load(tmp_path / "state.npz", mlp, x, y, verbose=0)
    np.testing.assert_allclose(
        loaded.explain(x[:2], y[:2], verbose=0), im.explain(x[:2], y[:2], verbose=0), rtol=1e-12
    )


def test_cli_loads_keras_files_in_safe_mode(tmp_path):
    """A .keras file with a Python lambda is refused (safe_mode), not executed."""
    from tf_influence.__main__ import main

    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2.0)])
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 2)), y=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"(?i)safe_mode|lambda"):
        main(
            [
                "explain-logs",
                "--model",
                path,
                "--train",
                str(tmp_path / "train.npz"),
                "--logs",
                str(tmp_path / "none.tfrecord"),
                "--out",
                str(tmp_path / "o.csv"),
                "--loss",
                "mse",
            ]
        )
    assert not os.path.exists(tmp_path / "o.csv")
