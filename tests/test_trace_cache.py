"""Traces kept on disk (``tfi.config.set_trace_cache``): reused across models and processes,
reading the live weights, and never for what cannot be described safely."""

import glob
import os
import subprocess
import sys
import textwrap
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.engine import trace_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder for this test, and the setting restored afterwards."""
    monkeypatch.delenv(trace_cache.ENVIRONMENT_VARIABLE, raising=False)
    folder = tmp_path / "traces"
    tfi.config.set_trace_cache(folder)
    yield str(folder)
    trace_cache._STATE["directory"] = trace_cache._UNSET


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.integers(0, 3, size=n)


def _trained(seed):
    """The same architecture, different weights for each seed."""
    model = make_mlp(seed=seed)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _explain(model, solver, x, y, x_test, y_test):
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=1.0)
    im.fit(x, y, batch_size=16, verbose=0)
    return im.explain(x_test, y_test, verbose=0)


def _stats():
    return dict(trace_cache.stats)


def _cg_model(seed):
    """An InfluenceModel of ``_trained(seed)`` compiled with CG, not yet fitted."""
    im = tfi.InfluenceModel(_trained(seed))
    im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=1.0)
    return im


def _assert_dense(scores, seed, x, y, tests):
    """``scores`` equal the dense ``Exact`` solve of ``_trained(seed)``, traced anew."""
    tfi.config.set_trace_cache(None)
    reference = _explain(_trained(seed), "exact", x, y, x[tests], y[tests])
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


def test_a_second_model_runs_the_kept_traces_with_its_own_weights(cache):
    x, y = _data()
    x_test, y_test = x[:3], y[:3]
    before = _stats()
    _explain(_trained(0), tfi.solvers.CG(tol=1e-10), x, y, x_test, y_test)
    stored = trace_cache.stats["stored"] - before["stored"]
    assert stored >= 2  # the test gradients, the solve and the training scores
    assert len(glob.glob(os.path.join(cache, "*.json"))) == stored

    # Another model object of the same architecture: no trace in memory to share, so
    # the kept ones are loaded. Its weights differ: the answer must be its own.
    other = _trained(1)
    before = _stats()
    scores = _explain(other, tfi.solvers.CG(tol=1e-10), x, y, x_test, y_test)
    assert trace_cache.stats["loaded"] - before["loaded"] == stored
    assert trace_cache.stats["stored"] == before["stored"]
    _assert_dense(scores, 1, x, y, slice(0, 3))  # x_test, y_test = x[:3], y[:3]


def test_the_weights_are_read_live_after_they_change(cache):
    x, y = _data()
    model = _trained(0)
    _explain(model, tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    changed = _trained(2)
    changed.set_weights([w * 1.5 for w in _trained(3).get_weights()])
    before = _stats()
    scores = _explain(changed, tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    assert trace_cache.stats["loaded"] > before["loaded"]
    tfi.config.set_trace_cache(None)
    reference = _explain(changed, "exact", x, y, x[:2], y[:2])
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


def test_fit_gets_a_kept_solve_ready_in_the_background(cache):
    """A kept CG solve starts building at ``fit``; explain waits for it and is exact."""
    from tf_influence.engine import compile as compile_lib

    x, y = _data()
    _explain(_trained(0), tfi.solvers.CG(tol=1e-10), x, y, x[:4], y[:4])
    before = _stats()
    im = _cg_model(1)
    im.fit(x, y, batch_size=16, verbose=0)
    assert trace_cache.stats["background"] == before["background"] + 2  # solve, scores
    # Another number of test points than the process that kept the solve: one trace.
    scores = im.explain(x[:3], y[:3], verbose=0)
    assert compile_lib._WORKER._jobs.unfinished_tasks == 0
    assert trace_cache.stats["stored"] == before["stored"]
    _assert_dense(scores, 1, x, y, slice(0, 3))


def test_bad_targets_are_refused_clearly_after_the_background_start(cache):
    x, y = _data()
    _explain(_trained(0), tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    before = _stats()
    im = _cg_model(1)
    with pytest.raises(ValueError, match="`y`"):
        im.fit(x, y + 3, batch_size=16, verbose=0)  # classes 3-5 for a 3-class output
    assert trace_cache.stats["background"] == before["background"] + 1  # the solve
    im.fit(x, y, batch_size=16, verbose=0)  # and the model is still usable
    _assert_dense(im.explain(x[:2], y[:2], verbose=0), 1, x, y, slice(0, 2))


def test_another_architecture_or_setting_is_traced_not_loaded(cache):
    x, y = _data()
    _explain(_trained(0), tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    files = set(glob.glob(os.path.join(cache, "*.json")))

    wider = make_mlp(hidden=6, seed=0)
    wider.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = _stats()
    _explain(wider, tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    assert trace_cache.stats["loaded"] == before["loaded"]
    assert trace_cache.stats["stored"] > before["stored"]

    # Another setting on the same architecture: the products are traced again (the
    # gradients, which do not depend on it, are loaded), and the answer is right.
    files = set(glob.glob(os.path.join(cache, "*.json")))
    before = _stats()
    im = tfi.InfluenceModel(_trained(0))
    im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=1.0, hvp="forward_over_reverse")
    im.fit(x, y, batch_size=16, verbose=0)
    scores = im.explain(x[:2], y[:2], verbose=0)
    assert trace_cache.stats["stored"] > before["stored"]
    assert set(glob.glob(os.path.join(cache, "*.json"))) > files
    tfi.config.set_trace_cache(None)
    reference = _explain(_trained(0), "exact", x, y, x[:2], y[:2])
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


class Doubling(keras.layers.Layer):
    """A custom layer: its code is not pinned by any version, so nothing is kept."""

    def call(self, inputs):
        return 2.0 * inputs


def test_models_with_code_of_their_own_are_traced_as_usual(cache):
    x, y = _data()
    for extra in (Doubling(dtype="float64"), keras.layers.Lambda(lambda t: 2.0 * t)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,), dtype="float64"), extra, keras.layers.Dense(3, dtype="float64")]
        )
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = _stats()
        scores = _explain(model, tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
        assert trace_cache.stats["stored"] == before["stored"]
        assert trace_cache.stats["unsupported"] > before["unsupported"]
        assert np.all(np.isfinite(scores))
    assert not glob.glob(os.path.join(cache, "*.json"))


def test_an_unreadable_entry_is_traced_again_and_rewritten(cache):
    x, y = _data()
    _explain(_trained(0), tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    for path in glob.glob(os.path.join(cache, "*.pb")):
        with open(path, "wb") as handle:
            handle.write(b"not a function library")
    before = _stats()
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        scores = _explain(_trained(1), tfi.solvers.CG(tol=1e-10), x, y, x[:2], y[:2])
    assert trace_cache.stats["loaded"] == before["loaded"]
    assert trace_cache.stats["stored"] > before["stored"]
    tfi.config.set_trace_cache(None)
    reference = _explain(_trained(1), "exact", x, y, x[:2], y[:2])
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


def test_a_graph_with_a_stateful_random_op_is_not_kept(cache):
    from tf_influence.engine.compile import GraphFunction

    model = _trained(0)
    model(np.zeros((1, 4)))
    spec = tf.TensorSpec([None], tf.float64)
    noisy = GraphFunction(
        lambda t: (
            t + tf.random.uniform(tf.shape(t), dtype=tf.float64) + tf.reduce_sum(model.variables[0])
        ),
        input_signature=[spec],
    )
    before = _stats()
    with trace_cache.identity(weakref.ref(model), ("noisy", None)):
        noisy(tf.zeros([3], tf.float64))
    assert trace_cache.stats["stored"] == before["stored"]
    assert trace_cache.stats["unsupported"] == before["unsupported"] + 1


def test_bad_folders_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match=r"`directory`.*Received: directory=3"):
        tfi.config.set_trace_cache(3)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"`directory` must name a folder"):
        tfi.config.set_trace_cache(a_file)
    # The environment variable turns it on; an explicit None wins over it.
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(tmp_path))
    try:
        assert tfi.config.trace_cache_directory() == str(tmp_path)
        tfi.config.set_trace_cache(None)
        assert tfi.config.trace_cache_directory() is None
        tfi.config.set_trace_cache("~/traces")
        assert tfi.config.trace_cache_directory() == os.path.expanduser("~/traces")
    finally:
        trace_cache._STATE["directory"] = trace_cache._UNSET


_CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    import keras
    from conftest import make_mlp
    import tf_influence as tfi
    from tf_influence.engine import trace_cache
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, size=40)
    model = make_mlp(seed={seed})
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.CG(tol=1e-10), damping=1.0)
    im.fit(x, y, batch_size=16, verbose=0)
    scores = im.explain(x[:3], y[:3], verbose=0)
    print(json.dumps({{"stats": trace_cache.stats, "scores": scores.tolist()}}))
    """
)


@pytest.mark.slow
def test_a_new_process_runs_the_traces_an_earlier_one_kept(tmp_path):
    import json

    env = dict(os.environ, TF_INFLUENCE_TRACE_CACHE=str(tmp_path / "traces"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])  # conftest

    def child(seed):
        code = _CHILD.format(seed=seed)
        completed = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        return json.loads(completed.stdout.strip().splitlines()[-1])

    first, second = child(0), child(1)
    assert first["stats"]["stored"] >= 2 and first["stats"]["loaded"] == 0
    assert second["stats"]["loaded"] == first["stats"]["stored"]
    assert second["stats"]["stored"] == 0
    assert second["stats"]["background"] == 2  # the solve and the scores, built during fit

    # The second process's answer is that of its own weights (seed 1): the dense solve.
    x, y = _data()
    reference = _explain(_trained(1), "exact", x, y, x[:3], y[:3])
    scores = np.array(second["scores"])
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


def test_the_background_worker_runs_jobs_in_order_and_survives_errors():
    import threading

    from tf_influence.engine.compile import _Worker

    worker = _Worker()
    order, gate = [], threading.Event()
    first = worker.submit(lambda: (gate.wait(10), order.append(1)))
    failing = worker.submit(lambda: 1 / 0)
    last = worker.submit(lambda: order.append(3))
    assert not last.is_set()  # queued behind the first
    gate.set()
    assert last.wait(10) and failing.is_set() and first.is_set()
    assert order == [1, 3]


def test_a_forked_child_does_not_wait_for_jobs_its_parent_queued():
    import threading

    from tf_influence.engine.compile import _Worker

    worker = _Worker()
    gate = threading.Event()
    worker.submit(lambda: gate.wait(10))
    pending = worker.submit(lambda: None)
    worker._after_fork()  # what os.register_at_fork runs in a forked child
    assert pending.is_set()
    assert worker.submit(lambda: None).wait(10)  # a thread of the child's own
    gate.set()
