"""Analysing a model only available as a TF-Serving SavedModel (`model.export`)."""

import inspect

import keras
import numpy as np
import pytest
from conftest import make_mlp

import tf_influence as tfi

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def export(model, path):
    quiet = "verbose" in inspect.signature(model.export).parameters  # Keras >= 3.5
    model.export(str(path), **({"verbose": False} if quiet else {}))


def test_served_model_gives_the_influence_of_the_keras_model(blobs, tmp_path):
    x, y = blobs
    model = make_mlp(l2=0.0)  # a SavedModel keeps no regularizer: compare without one
    export(model, tmp_path / "mlp" / "1")
    export(model, tmp_path / "mlp" / "2")
    served = tfi.load_served_model(tmp_path / "mlp")  # the highest version, as TF Serving
    assert len(served.trainable_variables) == len(model.trainable_variables)
    np.testing.assert_allclose(served(x[:4]).numpy(), model(x[:4]).numpy(), rtol=1e-12)
    results = []
    for m in (model, served):
        im = tfi.InfluenceModel(m, loss=LOSS)
        im.compile(solver="exact", damping=0.5)  # scoring="auto"
        results.append(im.fit(x, y, verbose=0).explain(x[:3], y[:3], verbose=0))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-9, atol=1e-12)
    # Forward mode cannot see through the restored function: asked for, it is refused.
    im = tfi.InfluenceModel(served, loss=LOSS)
    im.compile(solver="exact", damping=0.5, scoring="jvp")
    with pytest.raises(ValueError, match=r"Forward-mode scoring cannot differentiate"):
        im.fit(x, y, verbose=0).explain(x[:3], y[:3], verbose=0)


def test_served_model_errors(tmp_path):
    with pytest.raises(ValueError, match=r"which does not exist"):
        tfi.load_served_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no saved_model.pb and no numbered version"):
        tfi.load_served_model(tmp_path / "empty")
    path = tmp_path / "m" / "1"
    export(make_mlp(l2=0.0), path)
    with pytest.raises(ValueError, match=r"has no endpoint 'predict'.*signatures"):
        tfi.load_served_model(path, endpoint="predict")
    served = tfi.load_served_model(path)
    with pytest.raises(ValueError, match=r"No loss to differentiate.*Pass `loss=`"):
        tfi.InfluenceModel(served)
    for item in (path / "variables").iterdir():
        item.unlink()
    with pytest.raises(ValueError, match=r"has no variables"):
        tfi.load_served_model(path)
