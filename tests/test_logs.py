"""Explaining TF Serving request logs built with the real PredictionLog protos."""

import csv
import inspect
import io
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi

apis = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")  # the serving extra
from tensorflow_serving.apis import classification_pb2, predict_pb2

from tf_influence.__main__ import main
from tf_influence.logs import explain_logs, load_training_arrays

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def predict_record(inputs, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    request.model_spec.signature_name = signature
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    log = apis.PredictionLog()
    log.predict_log.request.CopyFrom(request)
    return log.SerializeToString()


def write_log(path, x):
    classify = apis.PredictionLog()
    classify.classify_log.request.CopyFrom(classification_pb2.ClassificationRequest())
    records = [
        predict_record({"keras_tensor": x[:2]}),
        predict_record({"keras_tensor": x[2:3]}, signature="other"),  # another signature
        b"not a proto at all",
        predict_record({"keras_tensor": x[:1, :3]}),  # wrong shape
        classify.SerializeToString(),  # not a predict log
        predict_record({"keras_tensor": x[3:6]}),
    ]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_explain_logs_writes_top_k_and_skips_bad_records(blobs, tmp_path):
    x, y = blobs
    im = tfi.InfluenceModel(make_mlp(), loss=LOSS)
    im.compile(solver="exact", damping=0.5)
    im.fit(x, y, verbose=0)
    write_log(tmp_path / "requests.tfrecord", x)
    report = io.StringIO()
    summary = explain_logs(
        im, tmp_path / "requests.tfrecord", tmp_path / "out.csv", top_k=3, stream=report
    )
    assert summary == {"records": 6, "explained": 2, "examples": 5, "skipped": 4}
    text = report.getvalue()
    assert "record 1: skipped, signature 'other'" in text
    assert "record 2: skipped, not a PredictionLog proto" in text
    # The model's input name depends on how many Keras tensors the process made.
    assert re.search(r"record 3: skipped, input '\w+' of shape \(1, 3\), expected", text)
    assert "record 4: skipped, a classify_log record, not a predict_log" in text
    assert "2 of 6 records explained (5 examples); 4 skipped." in text
    rows = read_rows(tmp_path / "out.csv")
    assert len(rows) == 5 * 2 * 3
    top = im.top_k(x[3:6], k=3, verbose=0)  # record 5, explained as predicted classes
    harmful = [r for r in rows if r["record"] == "5" and r["kind"] == "harmful"]
    got = np.array([int(r["train_index"]) for r in harmful]).reshape(3, 3)
    np.testing.assert_array_equal(got, top.harmful_indices)
    scores = np.array([float(r["score"]) for r in harmful]).reshape(3, 3)
    np.testing.assert_allclose(scores, top.harmful_scores, rtol=1e-8)


def test_cli_explain_logs_on_a_served_model(blobs, tmp_path, capsys):
    x, y = blobs
    model = make_mlp(l2=0.0)
    quiet = "verbose" in inspect.signature(model.export).parameters
    model.export(str(tmp_path / "models" / "mlp" / "1"), **({"verbose": False} if quiet else {}))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    write_log(tmp_path / "requests.tfrecord", x)
    code = main(
        [
            "explain-logs",
            "--model",
            str(tmp_path / "models" / "mlp"),
            "--train",
            str(tmp_path / "train.npz"),
            "--logs",
            str(tmp_path / "requests.tfrecord"),
            "--out",
            str(tmp_path / "out.csv"),
            "--loss",
            "sparse_categorical_crossentropy",
            "--from-logits",
            "--solver",
            "exact",
            "--damping",
            "0.5",
            "--top-k",
            "2",
        ]
    )
    assert code == 0
    assert "2 of 6 records explained (5 examples); 4 skipped." in capsys.readouterr().out
    im = tfi.InfluenceModel(model, loss=LOSS)
    im.compile(solver="exact", damping=0.5)
    top = im.fit(x, y, verbose=0).top_k(x[:2], k=2, verbose=0)
    rows = [r for r in read_rows(tmp_path / "out.csv") if r["record"] == "0"]
    helpful = np.array([int(r["train_index"]) for r in rows if r["kind"] == "helpful"])
    np.testing.assert_array_equal(helpful.reshape(2, 2), top.helpful_indices)


def test_explain_logs_errors(blobs, tmp_path):
    x, y = blobs
    im = tfi.InfluenceModel(make_mlp(), loss=LOSS)
    im.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"`logs` must be a TFRecord file.*does not exist"):
        explain_logs(im, tmp_path / "missing.tfrecord", tmp_path / "out.csv")
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(ValueError, match=r"arrays `x` and `y`"):
        load_training_arrays(tmp_path / "bad.npz")
