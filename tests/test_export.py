"""SavedModel export for TF Serving: signatures, saved_model_cli, a fresh process."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_blobs, make_mlp

import tf_influence as tfi

CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported Arnoldi index for the whole file (no test changes it)."""
    x, y = make_blobs()
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.Arnoldi(rank=10, iterations=30), damping=0.5)
    im.fit(x, y, verbose=0)
    path = tmp_path_factory.mktemp("export") / "models" / "mlp" / "1"
    im.export(path, top_k=5, include_scores=True)
    return im, path, x, y


def input_name(path):
    signature = tf.saved_model.load(str(path)).signatures["explain"]
    return next(k for k in signature.structured_input_signature[1] if k != "labels")


def test_signatures_and_saved_model_cli(exported):
    im, path, x, y = exported
    shown = subprocess.run(
        [CLI, "show", "--all", "--dir", str(path)], capture_output=True, text=True, check=True
    ).stdout
    for name in ("serving_default", "explain", "explain_prediction"):
        assert f"signature_def['{name}']" in shown
    for output in ("top_helpful_indices", "top_harmful_scores", "scores"):
        assert output in shown
    name = input_name(path)
    expressions = f"{name}={x[:2].tolist()};labels={y[:2].tolist()}"  # literals only
    ran = subprocess.run(
        [
            CLI,
            "run",
            "--dir",
            str(path),
            "--tag_set",
            "serve",
            "--signature_def",
            "explain",
            "--input_exprs",
            expressions,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "top_harmful_indices" in ran
    top = im.top_k(x[:2], y[:2], k=5, verbose=0)
    first_row = " ".join(str(i) for i in top.harmful_indices[0])
    assert first_row in " ".join(ran.split()), ran


def test_fresh_process_without_tf_influence_equals_top_k(exported):
    im, path, x, y = exported
    script = f"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load({str(path)!r})
x = np.array({x[:3].tolist()}); y = np.array({y[:3].tolist()}, np.int32)
name = {input_name(path)!r}
out = loaded.signatures["explain"](**{{name: tf.constant(x), "labels": tf.constant(y)}})
pred = loaded.signatures["serving_default"](**{{name: tf.constant(x)}})
print(json.dumps({{k: v.numpy().tolist() for k, v in out.items()}} | {{
    "prediction": list(pred.values())[0].numpy().tolist(),
    "imported": "tf_influence" in sys.modules}}))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=str(path.parent),
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["imported"] is False
    top = im.top_k(x[:3], y[:3], k=5, verbose=0)
    np.testing.assert_array_equal(out["top_harmful_indices"], top.harmful_indices)
    np.testing.assert_array_equal(out["top_helpful_indices"], top.helpful_indices)
    np.testing.assert_allclose(out["top_harmful_scores"], top.harmful_scores, rtol=1e-8)
    np.testing.assert_allclose(out["scores"], im.explain(x[:3], y[:3], verbose=0), rtol=1e-8)
    np.testing.assert_allclose(out["prediction"], im.model(x[:3]).numpy(), rtol=1e-10)


def test_export_holds_no_training_data(exported):
    im, path, x, _ = exported
    loaded = tf.saved_model.load(str(path))
    shapes = {tuple(v.shape) for v in loaded.variables}
    assert (50, 10) in shapes  # the influence index, n_train x rank
    assert not any(s[:1] == (50,) and len(s) == 2 and s[1] == x.shape[1] for s in shapes)


def test_export_bad_input(exported, blobs, tmp_path):
    im, path, x, y = exported
    with pytest.raises(ValueError, match=r"must be a new or empty directory"):
        im.export(path)
    cg = tfi.InfluenceModel(im.model)
    cg.compile(solver="cg", damping=0.5)
    cg.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"`export` needs the influence index .*Arnoldi"):
        cg.export(tmp_path / "other")
