"""Saved state: round trips give identical scores; a state is refused for other weights/data."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi


def fitted(model, x, y, solver="cg", **fit_args):
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=0.5)
    return im.fit(x, y, batch_size=16, verbose=0, **fit_args)


# LiSSA's convergence is not the point here (its own tests hold it to its tolerance).
@pytest.mark.filterwarnings("ignore:Solver LiSSA")
# CG at a tight tolerance: the original model starts later solves from directions it
# kept (recycling) and the loaded one does not, so they agree to the tolerance only.
@pytest.mark.parametrize(
    "solver", ["exact", tfi.solvers.CG(tol=1e-10), tfi.solvers.LiSSA(recursion_depth=200)]
)
def test_round_trip_gives_identical_explain(mlp, blobs, tmp_path, solver):
    x, y = blobs
    im = fitted(mlp, x, y, solver)
    before = im.explain(x[:5], y[:5], verbose=0)
    path = tmp_path / "state.npz"
    im.save(path, include_data=True)
    loaded = tfi.InfluenceModel.load(path, mlp, verbose=0)
    assert loaded.solver.get_config() == im.solver.get_config()
    assert loaded.damping == im.damping and loaded.num_train == im.num_train
    # The cached solutions came along: the same test points are not solved again.
    hits = loaded.state.solutions.hits
    np.testing.assert_array_equal(loaded.explain(x[:5], y[:5], verbose=0), before)
    assert loaded.state.solutions.hits == hits + 1
    # New test points are solved with the restored curvature.
    np.testing.assert_allclose(
        loaded.explain(x[5:9], y[5:9], verbose=0),
        im.explain(x[5:9], y[5:9], verbose=0),
        rtol=1e-6 if solver != "exact" else 1e-12,
    )
    np.testing.assert_allclose(
        loaded.self_influence(verbose=0)[:5], im.self_influence(verbose=0)[:5], rtol=1e-6
    )


def test_dict_inputs_and_data_passed_at_load(tmp_path):
    keras.utils.set_random_seed(0)
    a = keras.Input((3,), name="a", dtype="float64")
    b = keras.Input((2,), name="b", dtype="float64")
    h = keras.layers.Concatenate()([a, b])
    out = keras.layers.Dense(2, dtype="float64", kernel_regularizer=keras.regularizers.L2(0.1))(h)
    model = keras.Model({"a": a, "b": b}, out)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(30, 3)), "b": rng.normal(size=(30, 2))}
    y = rng.integers(0, 2, 30)
    im = tfi.InfluenceModel(model).fit(x, y, verbose=0)
    expected = im.explain({k: v[:4] for k, v in x.items()}, y[:4], verbose=0)
    im.save(tmp_path / "with.npz", include_data=True)
    im.save(tmp_path / "without.npz")  # the default: no raw training example is stored
    test = ({k: v[:4] for k, v in x.items()}, y[:4])
    for loaded in (
        tfi.InfluenceModel.load(tmp_path / "with.npz", model, verbose=0),
        tfi.InfluenceModel.load(tmp_path / "without.npz", model, x, y, verbose=0),
    ):
        np.testing.assert_allclose(loaded.explain(*test, verbose=0), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"holds no training data.*Pass the training data"):
        tfi.InfluenceModel.load(tmp_path / "without.npz", model)


def test_load_refuses_other_weights_data_or_files(mlp, blobs, tmp_path):
    x, y = blobs
    path = tmp_path / "state.npz"
    fitted(mlp, x, y).save(path, include_data=True)
    other = make_mlp(seed=3)  # same architecture, other weights (and other names)
    other.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"its weights differ from the ones the state"):
        tfi.InfluenceModel.load(path, other)
    shuffled = np.roll(np.arange(len(x)), 1)
    with pytest.raises(ValueError, match=r"training examples differ .* same order"):
        tfi.InfluenceModel.load(path, mlp, x[shuffled], y[shuffled])
    with pytest.raises(ValueError, match=r"computed with loss 'sparse_categorical_crossentropy'"):
        tfi.InfluenceModel.load(path, mlp, loss="categorical_crossentropy")
    smaller = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="logits")])
    with pytest.raises(ValueError, match=r"the state is for parameters .* of shapes"):
        tfi.InfluenceModel.load(path, smaller)
    np.save(tmp_path / "other.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"written by `InfluenceModel.save`"):
        tfi.InfluenceModel.load(tmp_path / "other.npy", mlp)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        tfi.InfluenceModel.load(tmp_path / "missing.npz", mlp)


def test_saved_file_needs_no_pickle(mlp, blobs, tmp_path):
    x, y = blobs
    im = fitted(mlp, x, y)
    im.explain(x[:3], y[:3], verbose=0)
    im.save(tmp_path / "state.npz")
    with np.load(tmp_path / "state.npz", allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
        # No raw training example unless asked (include_data=True).
        assert not [name for name in archive.files if name.startswith("data/")]
    assert not (tmp_path / "state.npz.partial").exists()


def test_weights_changed_after_fit_are_refused(mlp, blobs):
    x, y = blobs
    im = fitted(mlp, x, y)
    mlp.layers[0].kernel.assign_add(tf.ones_like(mlp.layers[0].kernel) * 1e-3)
    with pytest.raises(RuntimeError, match=r"weights changed since `fit`.*Call `fit"):
        im.explain(x[:2], y[:2], verbose=0)
    with pytest.raises(RuntimeError, match=r"weights changed since `fit`"):
        im.self_influence(verbose=0)
    im.fit(x, y, batch_size=16, verbose=0)
    assert im.explain(x[:2], y[:2], verbose=0).shape == (2, len(x))
