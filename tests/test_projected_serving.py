"""Serving a Projected index: SavedModel export, a fresh process, and ``explain-logs``."""

import inspect
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.solvers import Projected

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fitted(blobs, projection):
    x, y = blobs
    model = make_mlp()
    model.compile(loss=LOSS)
    im = tfi.InfluenceModel(model)
    im.compile(solver=Projected(dim=20, projection=projection, seed=1), damping=0.1)
    return im.fit(x, y, batch_size=16, verbose=0)


def test_fresh_process_gives_the_top_k_of_each_index(blobs, tmp_path):
    """Both projections exported, then served by one fresh process (one TensorFlow start)."""
    x, y = blobs
    models, requests = {}, {}
    for projection in ("kronecker", "gaussian"):
        im = models[projection] = fitted(blobs, projection)
        path = tmp_path / projection / "models" / "mlp" / "1"
        im.export(path, top_k=4, include_scores=True)
        loaded = tf.saved_model.load(str(path))
        shapes = {tuple(v.shape) for v in loaded.variables}
        dim = im.state.index_inverse.projection.dim
        assert (50, dim) in shapes and (dim, dim) in shapes  # the index and F's factor
        # The Cholesky factor of F, in the model's dtype: never the explicit inverse.
        factor = im.state.index_inverse.cholesky.numpy()
        for stored in [v.numpy() for v in loaded.variables if tuple(v.shape) == (dim, dim)]:
            np.testing.assert_array_equal(stored, factor.astype(stored.dtype))
            assert not np.triu(stored, k=1).any()
        assert not any(s == (50, x.shape[1]) for s in shapes)  # no training input
        signature = loaded.signatures["explain"]
        name = next(k for k in signature.structured_input_signature[1] if k != "labels")
        requests[projection] = (str(path), name)
    script = f"""
import json, sys
import numpy as np, tensorflow as tf
x = np.array({x[:3].tolist()}); y = np.array({y[:3].tolist()}, np.int32)
results = {{}}
for projection, (path, name) in {requests!r}.items():
    explain = tf.saved_model.load(path).signatures["explain"]
    out = explain(**{{name: tf.constant(x), "labels": tf.constant(y)}})
    results[projection] = {{k: v.numpy().tolist() for k, v in out.items()}}
print(json.dumps(results | {{"imported": "tf_influence" in sys.modules}}))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["imported"] is False
    for projection, im in models.items():
        out = served[projection]
        top = im.top_k(x[:3], y[:3], k=4, verbose=0)
        np.testing.assert_array_equal(out["top_harmful_indices"], top.harmful_indices)
        np.testing.assert_array_equal(out["top_helpful_indices"], top.helpful_indices)
        np.testing.assert_allclose(out["top_harmful_scores"], top.harmful_scores, rtol=1e-9)
        np.testing.assert_allclose(out["top_helpful_scores"], top.helpful_scores, rtol=1e-9)
        scores = im.explain(x[:3], y[:3], verbose=0)
        np.testing.assert_allclose(out["scores"], scores, rtol=1e-9)


def test_explain_logs_with_the_projected_solver(blobs, tmp_path, capsys):
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    from tensorflow_serving.apis import predict_pb2

    from tf_influence.__main__ import main
    from tf_influence.serving import resolve_version_dir

    x, y = blobs
    model = make_mlp(l2=0.0)
    quiet = "verbose" in inspect.signature(model.export).parameters
    model.export(str(tmp_path / "models" / "mlp" / "1"), **({"verbose": False} if quiet else {}))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    with tf.io.TFRecordWriter(str(tmp_path / "requests.tfrecord")) as writer:
        for rows in (x[:2], x[2:5]):
            request = predict_pb2.PredictRequest()
            request.inputs["keras_tensor"].CopyFrom(tf.make_tensor_proto(rows))
            log = apis.PredictionLog()
            log.predict_log.request.CopyFrom(request)
            writer.write(log.SerializeToString())
    arguments = ["explain-logs", "--model", str(tmp_path / "models" / "mlp")]
    arguments += ["--train", str(tmp_path / "train.npz")]
    arguments += ["--logs", str(tmp_path / "requests.tfrecord"), "--out", str(tmp_path / "o.csv")]
    arguments += ["--loss", "sparse_categorical_crossentropy", "--from-logits", "--damping", "0.5"]
    arguments += ["--solver", "projected", "--dim", "12", "--top-k", "2"]
    assert main(arguments) == 0
    assert "2 of 2 records explained (5 examples); 0 skipped." in capsys.readouterr().out
    served = tfi.load_served_model(resolve_version_dir(str(tmp_path / "models" / "mlp")))
    im = tfi.InfluenceModel(served, loss=LOSS)
    im.compile(solver=Projected(dim=12), damping=0.5)
    top = im.fit(x, y, verbose=0).top_k(x[2:5], k=2, verbose=0)
    with open(tmp_path / "o.csv") as handle:
        rows = [line.split(",") for line in handle.read().splitlines()[1:]]
    harmful = [int(r[4]) for r in rows if r[0] == "1" and r[2] == "harmful"]
    np.testing.assert_array_equal(np.reshape(harmful, (3, 2)), top.harmful_indices)
    with pytest.raises(SystemExit, match=r"--dim is for --solver projected"):
        main([*arguments[:-6], "--solver", "cg", "--dim", "12"])
