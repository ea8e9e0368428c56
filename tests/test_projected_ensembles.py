"""Ensembles of ``Projected``: attributions averaged over checkpoints or models, as TRAK does.

The reference is the mean of single-model score matrices, each from an
``InfluenceModel`` on one member's weights (checked against dense numpy in
``test_projected.py``).
"""

import keras
import numpy as np
import pytest
from conftest import make_blobs

import tf_influence as tfi
from tf_influence.solvers import Projected

DAMPING = 0.2
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def make_mlp(seed=0, hidden=5):
    """A tiny float64 tanh MLP without regulariser (trained by ``model.fit`` below)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def influence(model, solver, x, y):
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver=solver, damping=DAMPING)
    return im.fit(x, y, batch_size=16, verbose=0)


def single(weights, x, y, tests, seed=5):
    """Scores and self-influence of one member, on a model holding its weights."""
    model = make_mlp()
    model.set_weights(weights)
    im = influence(model, Projected(dim=20, seed=seed), x, y)
    return im.explain(*tests, verbose=0), im.self_influence(verbose=0)


@pytest.fixture(scope="module")
def members():
    """Two trained members of one architecture (different initialisations); no test
    changes their weights."""
    x, y = make_blobs()
    found = []
    for seed in (0, 1):
        model = make_mlp(seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
        model.fit(x, y, epochs=3, batch_size=10, verbose=0)
        found.append(model)
    return found


def test_an_ensemble_of_one_is_the_single_model(blobs, members):
    x, y = blobs
    model = members[0]
    alone = influence(model, Projected(dim=20, seed=5), x, y)
    ensemble = influence(model, Projected(dim=20, seed=5, checkpoints=[model]), x, y)
    np.testing.assert_allclose(
        ensemble.explain(x[:5], y[:5], verbose=0), alone.explain(x[:5], y[:5], verbose=0)
    )
    np.testing.assert_allclose(ensemble.self_influence(verbose=0), alone.self_influence(verbose=0))


def test_an_ensemble_of_two_models_is_the_mean_of_their_scores(blobs, members):
    x, y = blobs
    tests = (x[:6], y[:6])
    expected = [single(m.get_weights(), x, y, tests) for m in members]
    model = make_mlp(seed=3)  # the explained model's own weights are not a member
    before = [w.copy() for w in model.get_weights()]
    im = influence(model, Projected(dim=20, seed=5, checkpoints=members), x, y)
    projection = im.state.index_inverse.projection
    assert projection.members == 2 and im.state.index.shape == (50, projection.dim)
    scores = im.explain(*tests, verbose=0)
    np.testing.assert_allclose(scores, (expected[0][0] + expected[1][0]) / 2, atol=1e-10)
    np.testing.assert_allclose(
        im.self_influence(verbose=0), (expected[0][1] + expected[1][1]) / 2, atol=1e-10
    )
    top = im.top_k(*tests, k=3, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-scores, axis=1)[:, :3])
    for now, then in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(now, then)  # every member's weights were put back


def test_tracin_checkpoints_are_members(blobs, tmp_path):
    x, y = blobs
    model = make_mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    checkpoints = tfi.callbacks.TracInCheckpoints(epochs=[2, 4])
    model.fit(x, y, epochs=4, batch_size=10, verbose=0, callbacks=[checkpoints])
    tests = (x[:4], y[:4])
    expected = [single(weights, x, y, tests)[0] for weights, _ in checkpoints.checkpoints]
    im = influence(model, Projected(dim=20, seed=5, checkpoints=checkpoints), x, y)
    np.testing.assert_allclose(
        im.explain(*tests, verbose=0), (expected[0] + expected[1]) / 2, atol=1e-10
    )
    config = im.get_compile_config()["solver"]["config"]
    assert config["checkpoints"]["members"] == 2 and len(config["checkpoints"]["sha256"]) == 64
    im.save(tmp_path / "state.npz", include_data=True)
    loaded = tfi.InfluenceModel.load(tmp_path / "state.npz", model, verbose=0)
    assert loaded.get_compile_config() == im.get_compile_config()
    np.testing.assert_allclose(
        loaded.explain(*tests, verbose=0), im.explain(*tests, verbose=0), atol=1e-12
    )


def test_what_an_ensemble_refuses(blobs, members, tmp_path):
    x, y = blobs
    other = make_mlp(hidden=6)  # another architecture
    with pytest.raises(ValueError, match=r"Member 0 of argument `checkpoints` does not fit"):
        influence(members[0], Projected(dim=20, checkpoints=[other]), x, y)
    with pytest.raises(ValueError, match=r"Member 1 of argument `checkpoints` has weight shapes"):
        Projected(checkpoints=[members[0], other])
    im = influence(members[0], Projected(dim=20, checkpoints=members), x, y)
    with pytest.raises(ValueError, match=r"not one inverse-Hessian-vector product"):
        im.inverse_hvp_tests(x[:2], y[:2], verbose=0)
    with pytest.raises(ValueError, match=r"Argument `target` needs coordinates"):
        im.explain(x[:2], target=lambda model, inputs: model(inputs)[:, 0], verbose=0)
    with pytest.raises(ValueError, match=r"`export` serves one model's gradients"):
        im.export(tmp_path / "served")
    pending = Projected.from_config(im.solver.get_config())
    with pytest.raises(ValueError, match=r"their weights are not known"):
        influence(members[0], pending, x, y)
