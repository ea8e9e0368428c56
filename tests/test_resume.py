"""No lost work: a killed ``explain(output=...)`` resumes to the uninterrupted matrix."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_mlp
from resumable_worker import build

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def problem(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    arrays = {f"w{i}": w for i, w in enumerate(make_mlp().get_weights())}
    path = str(tmp_path / "problem.npz")
    np.savez(
        path,
        x=x,
        y=rng.integers(0, 3, 400),
        x_test=x[:7] + 0.1,
        y_test=rng.integers(0, 3, 7),
        damping=0.5,
        batch_size=16,
        **arrays,
    )
    return path


def _kill_mid_run(problem, out, blocks):
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "resumable_worker.py"), problem, out, str(blocks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # blocks until the worker is mid-run
        assert line.strip() == "KILL ME", process.stderr.read()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def test_killed_explain_resumes_to_the_uninterrupted_matrix(problem, tmp_path):
    out = str(tmp_path / "scores.npy")
    _kill_mid_run(problem, out, blocks=9)
    with open(out + ".progress.json") as handle:
        assert json.load(handle)["done"] == 9 * 16
    assert os.path.exists(out + ".solutions.npy")

    data = np.load(problem)
    im = build(data)
    expected = im.explain(data["x_test"], data["y_test"], verbose=0)
    # The resumed run neither solves again nor scores the 9 finished batches.
    calls = []
    scores, solve = im.state.gradients.scores, im.solver.solve
    im.state.gradients.scores = lambda *a: calls.append("score") or scores(*a)
    im.solver.solve = lambda *a: calls.append("solve") or solve(*a)
    result = im.explain(data["x_test"], data["y_test"], verbose=0, output=out)
    assert calls == ["score"] * (400 // 16 - 9)
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-12, atol=0)
    assert isinstance(result, np.memmap)
    assert not os.path.exists(out + ".progress.json")
    assert not os.path.exists(out + ".solutions.npy")


def test_resume_refuses_a_different_run(problem, tmp_path):
    """Each difference is named, the interrupted files are left as they were."""
    out = str(tmp_path / "scores.npy")
    _kill_mid_run(problem, out, blocks=3)
    before = open(out, "rb").read()
    for change, named in [
        ("damping", "solver settings"),
        ("tests", "test points"),
        ("weights", "weights"),
        ("data", "training data"),
    ]:
        data = dict(np.load(problem))
        if change == "data":
            data["x"] = data["x"][::-1].copy()
        im = build(data)
        x_test, y_test = data["x_test"], data["y_test"]
        if change == "damping":
            im.compile(solver="cg", damping=0.7)
        elif change == "tests":
            x_test = x_test + 1.0
        elif change == "weights":
            im.model.set_weights([w * 1.01 for w in im.model.get_weights()])
            im.fit(data["x"], data["y"], batch_size=16, verbose=0)
        with pytest.raises(ValueError, match=rf"differs from this call in: {named}\b"):
            im.explain(x_test, y_test, verbose=0, output=out)
        assert open(out, "rb").read() == before  # nothing of the other run was touched
    # Another path starts afresh.
    fresh = im.explain(x_test, y_test, verbose=0, output=str(tmp_path / "other.npy"))
    assert fresh.shape == (7, 400)


def test_unreadable_progress_file_is_reported(problem, tmp_path):
    out = str(tmp_path / "scores.npy")
    with open(out + ".progress.json", "w") as handle:
        handle.write("{not json")
    im = build(np.load(problem))
    with pytest.raises(ValueError, match=r"progress file .* cannot be read.*Delete it"):
        im.explain(np.zeros((1, 4)), np.zeros(1, int), verbose=0, output=out)
