"""kNN narrowing (FastIF): exact neighbours, and their scores equal the full scores."""

import keras
import numpy as np
import pytest
from conftest import fit_exact

import tf_influence as tfi


def test_candidates_are_the_nearest_and_keep_their_full_scores(mlp, blobs):
    x, y = blobs
    im = fit_exact(mlp, x, y)
    full = im.explain(x[:5], y[:5], verbose=0)
    found = im.explain(x[:5], y[:5], candidates=7, feature_layer="hidden", verbose=0)
    assert isinstance(found, tfi.Candidates)
    assert found.indices.shape == found.scores.shape == found.distances.shape == (5, 7)
    hidden = keras.Model(mlp.inputs[0], mlp.get_layer("hidden").output)
    train, test = hidden(x).numpy(), hidden(x[:5]).numpy()
    distances = np.linalg.norm(test[:, None, :] - train[None, :, :], axis=2)
    np.testing.assert_array_equal(found.indices, np.argsort(distances, axis=1)[:, :7])
    np.testing.assert_allclose(found.distances, np.sort(distances, axis=1)[:, :7], atol=1e-7)
    np.testing.assert_allclose(
        found.scores, np.take_along_axis(full, found.indices, axis=1), rtol=1e-9
    )
    # top_k among the candidates; a callable feature function gives the same.
    top = im.top_k(x[:5], y[:5], k=3, candidates=7, feature_layer="hidden", verbose=0)
    order = np.argsort(-found.scores, axis=1)[:, :3]
    np.testing.assert_array_equal(
        top.harmful_indices, np.take_along_axis(found.indices, order, axis=1)
    )
    again = im.explain(
        x[:5],
        y[:5],
        candidates=7,
        feature_layer=lambda model, xs: model.get_layer("hidden")(xs),
        verbose=0,
    )
    np.testing.assert_array_equal(again.indices, found.indices)
    # All training examples as candidates: the full ranking.
    everything = im.explain(x[:5], y[:5], candidates=500, feature_layer="hidden", verbose=0)
    assert everything.indices.shape == (5, 50)


def test_candidates_bad_input(mlp, blobs):
    x, y = blobs
    im = fit_exact(mlp, x, y)
    with pytest.raises(ValueError, match=r"`candidates` needs `feature_layer`"):
        im.explain(x[:2], y[:2], candidates=5)
    with pytest.raises(ValueError, match=r"`candidates` must be a positive integer"):
        im.explain(x[:2], y[:2], candidates=0, feature_layer="hidden")
    with pytest.raises(ValueError, match=r"names a layer the model does not have"):
        im.explain(x[:2], y[:2], candidates=5, feature_layer="nope")
