"""``Projected(store=...)``: the index on disk, resumable and fingerprinted; queries stream.

The reference is the same solver with the index in memory (checked against dense
numpy in ``test_projected.py``).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
import tf_influence.index as index_lib
from tf_influence.engine.projection import GradientProjection
from tf_influence.index import store as store_lib
from tf_influence.solvers import Projected

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fitted(model, x, y, **solver_args):
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver=Projected(dim=20, seed=2, **solver_args), damping=0.1)
    return im.fit(x, y, batch_size=16, verbose=0)


@pytest.fixture
def counted(monkeypatch):
    """Counts the batches projected; ``counted["fail_at"] = k`` interrupts the k-th."""
    state = {"calls": 0, "fail_at": None}
    original = GradientProjection.examples

    def examples(self, x, y):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(GradientProjection, "examples", examples)
    return state


def test_store_answers_as_the_index_in_memory(blobs, tmp_path, counted, monkeypatch):
    x, y = blobs
    streamed = []
    original = index_lib.stream_top_k
    monkeypatch.setattr(
        index_lib, "stream_top_k", lambda *args: streamed.append(1) or original(*args)
    )
    model = make_mlp()
    memory = fitted(model, x, y)
    path = tmp_path / "index.npy"
    stored = fitted(model, x, y, store=str(path), store_dtype="float32")
    assert stored.state.index.complete and stored.state.index.num_rows == 50
    expected = memory.explain(x[:5], y[:5], verbose=0)
    tolerance = 1e-6 * np.abs(expected).max()  # float32 rows of a float64 model
    np.testing.assert_allclose(stored.explain(x[:5], y[:5], verbose=0), expected, atol=tolerance)
    np.testing.assert_allclose(
        stored.self_influence(verbose=0), memory.self_influence(verbose=0), rtol=1e-5
    )
    top = stored.top_k(x[:5], y[:5], k=4, verbose=0)
    assert streamed  # the store's streaming top-k
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-expected, axis=1)[:, :4])
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(expected, axis=1)[:, :4])
    # A complete store of the same weights, data and projection is reopened: no pass.
    calls = counted["calls"]
    again = fitted(model, x, y, store=str(path), store_dtype="float32")
    assert counted["calls"] == calls
    np.testing.assert_allclose(again.explain(x[:5], y[:5], verbose=0), expected, atol=tolerance)
    # Half the file in float16, scores within its rounding.
    half = fitted(model, x, y, store=str(tmp_path / "half.npy"))
    assert os.path.getsize(tmp_path / "half.npy") < os.path.getsize(path)
    np.testing.assert_allclose(
        half.explain(x[:5], y[:5], verbose=0), expected, atol=2e-3 * np.abs(expected).max()
    )


def test_save_load_and_export_read_the_store(blobs, tmp_path):
    x, y = blobs
    model = make_mlp()
    im = fitted(model, x, y, store=str(tmp_path / "index.npy"), store_dtype="float32")
    expected = im.explain(x[:4], y[:4], verbose=0)
    im.save(tmp_path / "state.npz", include_data=True)
    loaded = tfi.InfluenceModel.load(tmp_path / "state.npz", model, loss=LOSS, verbose=0)
    np.testing.assert_allclose(loaded.explain(x[:4], y[:4], verbose=0), expected, rtol=1e-12)
    im.export(tmp_path / "served", top_k=3, include_scores=True)
    signature = tf.saved_model.load(str(tmp_path / "served")).signatures["explain"]
    name = next(k for k in signature.structured_input_signature[1] if k != "labels")
    served = signature(**{name: tf.constant(x[:4]), "labels": tf.constant(y[:4], tf.int32)})
    np.testing.assert_allclose(served["scores"].numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_killed_build_resumes_to_the_identical_file(blobs, tmp_path, counted, monkeypatch, dtype):
    x, y = blobs  # 50 examples: 4 batches of 16
    model = make_mlp()
    monkeypatch.setattr(store_lib, "CHECKPOINT_SECONDS", 0.0)  # record every block
    whole = tmp_path / "whole.npy"
    fitted(model, x, y, store=str(whole), store_dtype=dtype)
    resumed = tmp_path / "resumed.npy"
    counted.update(calls=0, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        fitted(model, x, y, store=str(resumed), store_dtype=dtype)
    counted.update(calls=0, fail_at=None)
    im = fitted(model, x, y, store=str(resumed), store_dtype=dtype)
    assert counted["calls"] == 2  # batches 3 and 4 only
    for suffix in ("", ".scales.npy") if dtype == "float16" else ("",):
        with open(f"{whole}{suffix}", "rb") as a, open(f"{resumed}{suffix}", "rb") as b:
            assert a.read() == b.read()
    reference = fitted(model, x, y, store=str(whole), store_dtype=dtype)
    np.testing.assert_array_equal(
        im.explain(x[:3], y[:3], verbose=0), reference.explain(x[:3], y[:3], verbose=0)
    )


def test_a_store_of_other_weights_data_or_seed_is_refused(blobs, tmp_path):
    x, y = blobs
    model = make_mlp()
    path = str(tmp_path / "index.npy")
    fitted(model, x, y, store=path)
    with pytest.raises(ValueError, match=r"made with other: training data"):
        fitted(model, x[::-1], y[::-1], store=path)
    with pytest.raises(ValueError, match=r"made with other: projection"):
        im = tfi.InfluenceModel(model, loss=LOSS)
        im.compile(solver=Projected(dim=20, seed=3, store=path), damping=0.1)
        im.fit(x, y, batch_size=16, verbose=0)
    model.layers[0].kernel.assign(model.layers[0].kernel * 1.01)
    with pytest.raises(ValueError, match=r"made with other: weights"):
        fitted(model, x, y, store=path)


def test_bad_store_arguments():
    with pytest.raises(ValueError, match=r"`store` must be None or a path ending in .npy"):
        Projected(store="index.bin")
    with pytest.raises(ValueError, match=r"`store_dtype` must be 'float16' or 'float32'"):
        Projected(store="index.npy", store_dtype="int8")
