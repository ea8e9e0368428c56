"""Influence under tf.distribute: the same numbers as one device, in the same columns.

MirroredStrategy runs over the two logical CPU devices set up in conftest.py;
MultiWorkerMirroredStrategy over two worker processes on localhost.
"""

import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp
from test_ekfac import approximate_inverse

import tf_influence as tfi
from tf_influence.solvers import _kronecker

DAMPING = 0.2
HERE = os.path.dirname(os.path.abspath(__file__))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=50):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)), rng.integers(0, 3, size=n)


def _models(strategy, dtype="float64"):
    plain = make_mlp(dtype=dtype)
    plain.compile(loss=_loss())
    with strategy.scope():
        mirrored = make_mlp(dtype=dtype)
        mirrored.compile(loss=_loss())
    mirrored.set_weights(plain.get_weights())
    return plain, mirrored


def _run(model, solver, x, y, batch_size, damping=DAMPING, **fit):
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping)
    im.fit(x, y, batch_size=batch_size, verbose=0, **fit)
    return im


def _close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) <= rtol * scale


SOLVERS = {
    "exact": lambda: "exact",
    "cg": lambda: "cg",
    # Replicas and one device must agree step by step; convergence is not the point.
    "lissa": lambda: tfi.solvers.LiSSA(recursion_depth=25, seed=5),
    "arnoldi": lambda: tfi.solvers.Arnoldi(rank=20),
    "ekfac": lambda: tfi.solvers.EKFAC(samples="exact"),
    # Compressed test vectors (the hidden layer from its rank-2 factors) on the replicas.
    "ekfac_query_rank": lambda: tfi.solvers.EKFAC(samples="exact", query_rank=2),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_mirrored_matches_one_device(strategy, name):
    """Two replicas give the influences of one device, column j = example j.

    50 examples in batches of 7: each global batch splits 4 + 3, and the last one
    (1 example) leaves the second replica empty.
    """
    x, y = _data()
    plain, mirrored = _models(strategy)
    im = _run(mirrored, SOLVERS[name](), x, y, 7)
    assert im.strategy is strategy and im.operator.replicas.num_replicas == 2
    reference = _run(plain, SOLVERS[name](), x, y, 7)
    assert reference.strategy is None
    tests = (x[:6] + 0.1, y[:6])
    scores = im.explain(*tests, verbose=0)
    # The scoring step is traced once: the shorter last batch runs the same trace.
    assert im.operator.replicas.score_tracing_count() == 1
    _close(scores, reference.explain(*tests, verbose=0))
    _close(im.self_influence(verbose=0), reference.self_influence(verbose=0))
    top, top_reference = im.top_k(*tests, k=5, verbose=0), reference.top_k(*tests, k=5, verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, top_reference.harmful_indices)
    np.testing.assert_array_equal(top.helpful_indices, top_reference.helpful_indices)


@pytest.mark.parametrize(
    ("make", "scores"),
    [
        # EK-FAC's scores with exact draws: test_mirrored_matches_one_device.
        (lambda: tfi.solvers.KFAC(samples="exact"), False),
        (lambda: tfi.solvers.EKFAC(samples=2, seed=3), True),
    ],
    ids=["kfac-exact", "ekfac-sampled"],
)
def test_kronecker_passes_run_on_the_replicas(strategy, monkeypatch, make, scores):
    """Each replica sums the factors (and corrections) of its half of every batch.

    The sums are all-reduced before the eigendecomposition, and the output draws are
    seeded by each example's position in the data, so the factors and scores equal
    one device's, sampled draws included. 50 examples in batches of 7: the shards are
    4 + 3 examples, and the last batch (1 example) leaves a replica out.
    """
    shards, contexts = [], []
    for name in ("_factors", "_corrections"):
        original = getattr(_kronecker._Steps, name)

        def recording(self, x, y, positions, *args, original=original, name=name):
            context = tf.distribute.get_replica_context()  # while tracing
            contexts.append(None if context is None else context.num_replicas_in_sync)
            tf.py_function(lambda i, name=name: shards.append((name, i.numpy())), [positions], [])
            return original(self, x, y, positions, *args)

        monkeypatch.setattr(_kronecker._Steps, name, recording)
    x, y = _data()
    plain, mirrored = _models(strategy)
    im = _run(mirrored, make(), x, y, 7)
    passes = ["_factors", "_corrections"] if make().corrected else ["_factors"]
    assert set(contexts) == {2}  # traced in the replicas of the two-device strategy
    for name in passes:
        seen = [index for which, index in shards if which == name]
        assert sorted(len(index) for index in seen) == [1] + [3] * 7 + [4] * 7
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(50))
    shards.clear()
    reference = _run(plain, make(), x, y, 7)
    assert sorted(len(index) for _, index in shards) == sorted(([1] + [7] * 7) * len(passes))
    inverse = approximate_inverse(im)
    np.testing.assert_allclose(inverse, approximate_inverse(reference), rtol=1e-10, atol=1e-12)
    if scores:
        tests = (x[:3] + 0.1, y[:3])
        _close(im.explain(*tests, verbose=0), reference.explain(*tests, verbose=0))


@pytest.mark.parametrize("scoring", ["jvp", "jacobian"])
def test_mirrored_dataset_input_and_scoring_modes(strategy, scoring):
    """A batched tf.data pipeline is distributed with its order kept, in both scoring modes."""
    x, y = _data(61)
    plain, mirrored = _models(strategy)
    im = tfi.InfluenceModel(mirrored)
    im.compile(solver="cg", damping=0.5, scoring=scoring)
    im.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(9), verbose=0)
    reference = _run(plain, "cg", x, y, 32, damping=0.5)
    _close(im.explain(x[:3], y[:3], verbose=0), reference.explain(x[:3], y[:3], verbose=0))


def test_stochastic_cg_and_groups_under_strategy(strategy):
    """Subsampled curvature and group removal run on the strategy too."""
    x, y = _data()
    plain, mirrored = _models(strategy)
    solver = lambda: tfi.solvers.CG(hessian_sample_size=30, seed=2)
    im, reference = _run(mirrored, solver(), x, y, 8), _run(plain, solver(), x, y, 8)
    _close(im.explain(x[:2], y[:2], verbose=0), reference.explain(x[:2], y[:2], verbose=0))
    groups = [[0, 1, 2], list(range(10, 30))]
    _close(
        im.predict_removal(groups, x[:2], y[:2], order=2, verbose=0),
        reference.predict_removal(groups, x[:2], y[:2], order=2, verbose=0),
    )


def test_explicit_strategy_argument(strategy):
    x, y = _data()
    plain, _ = _models(strategy)
    im = tfi.InfluenceModel(plain, strategy=strategy)
    im.compile(solver="cg", damping=DAMPING)
    im.fit(x, y, batch_size=8, verbose=0)
    assert im.operator.replicas is not None
    reference = _run(plain, "cg", x, y, 8)
    _close(im.explain(x[:2], y[:2], verbose=0), reference.explain(x[:2], y[:2], verbose=0))
    # The default strategy means no distribution.
    assert tfi.InfluenceModel(plain, strategy=tf.distribute.get_strategy()).strategy is None


def test_strategy_argument_errors(strategy):
    _, mirrored = _models(strategy)
    with pytest.raises(TypeError, match=r"`strategy` must be a tf.distribute.Strategy.*'mirrored'"):
        tfi.InfluenceModel(mirrored, strategy="mirrored")
    other = tf.distribute.MirroredStrategy(["/cpu:0"])
    with pytest.raises(ValueError, match=r"differs from the strategy the model was built under"):
        tfi.InfluenceModel(mirrored, strategy=other)


@pytest.mark.skipif(
    tuple(int(v) for v in keras.__version__.split(".")[:2]) < (3, 15),
    reason="Keras < 3.15 model.fit leaves mirrored copies out of sync (refused, see below)",
)
def test_callback_analyses_on_the_training_strategy(strategy):
    """InfluenceCallback on model.fit under MirroredStrategy analyses on that strategy."""
    x, y = _data()
    x = x.astype("float32")
    plain, mirrored = _models(strategy, "float32")  # Keras trains float64 models badly
    callback = tfi.callbacks.InfluenceCallback(x, y, solver="cg", damping=DAMPING, verbose=0)
    with strategy.scope():
        mirrored.compile(loss=_loss(), optimizer=keras.optimizers.SGD(0.05))
    mirrored.fit(x, y, epochs=2, batch_size=10, verbose=0, shuffle=False, callbacks=[callback])
    assert callback.influence_model.strategy is strategy
    plain.set_weights(mirrored.get_weights())
    expected = _run(plain, "cg", x, y, 32).self_influence(verbose=0)
    _close(callback.self_influence_, expected)


# -- several worker processes -----------------------------------------------------------
def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(problem, out, extra=(), timeout=240):
    """Runs two worker processes on localhost; returns their (code, elapsed, stderr tail)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    start = time.monotonic()
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=__import__("json").dumps(config))
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "distributed_worker.py"),
                    problem,
                    f"{out}{index}.npz",
                    *extra,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for process in processes:
            _, err = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            results.append((process.returncode, time.monotonic() - start, err[-3000:]))
    finally:
        for process in processes:  # stopped by the test, whatever happened
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _problem(tmp_path, solvers, **extra):
    x, y = _data(45)
    model = make_mlp()
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    path = str(tmp_path / "problem.npz")
    np.savez(
        path,
        x=x,
        y=y,
        x_test=x[:4] + 0.1,
        y_test=y[:4],
        damping=DAMPING,
        batch_size=8,
        solvers=",".join(solvers),
        **arrays,
        **extra,
    )
    model.compile(loss=_loss())
    return path, model, x, y


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One run of two workers on localhost through every scenario of distributed_worker.py.

    Each worker start costs a TensorFlow import and the strategy's set-up, so one run
    checks, in order: training data that differ between the workers (refused), the
    influences of Exact and CG, and a worker that dies after ``fit``.
    """
    tmp_path = tmp_path_factory.mktemp("cluster")
    x, _ = _data(45)
    solvers = ["exact", "cg"]
    path, model, x, y = _problem(tmp_path, solvers, x_other=x[::-1].copy())
    out = str(tmp_path / "out")
    codes = _start_workers(path, out, ["--die-after-fit"])
    return {"codes": codes, "out": out, "model": model, "x": x, "y": y, "solvers": solvers}


@pytest.mark.slow
def test_workers_with_different_data_are_refused(cluster):
    out = cluster["out"]
    for index in range(2):
        message = open(f"{out}{index}.npz.refused").read()
        assert message.startswith("ValueError: "), message
        assert "do not agree on the training data" in message, message
        assert "weights" not in message.split("agree on the")[1].split(":")[0]


@pytest.mark.slow
def test_multi_worker_matches_one_process(cluster):
    """Two MultiWorkerMirroredStrategy workers on localhost give one process's influences.

    They run after the refused fit of ``test_workers_with_different_data_are_refused``:
    a refusal leaves the workers in step. Exact and CG cover every kind of reduction
    across workers (products, gradients, scores). LiSSA reduces through the same code
    and is checked under MirroredStrategy (``test_mirrored_matches_one_device``); it
    is left out here to keep the suite within its time (its recursion sums across the
    workers at every step).
    """
    out, model, x, y = cluster["out"], cluster["model"], cluster["x"], cluster["y"]
    for index in range(2):
        assert os.path.exists(f"{out}{index}.npz"), cluster["codes"][index][2]
    for solver in cluster["solvers"]:
        im = tfi.InfluenceModel(model)
        im.compile(solver=solver, damping=DAMPING)
        im.fit(x, y, batch_size=8, verbose=0)
        expected = im.explain(x[:4] + 0.1, y[:4], verbose=0)
        expected_self = im.self_influence(verbose=0)
        for index in range(2):  # every worker holds the whole, identical result
            result = np.load(f"{out}{index}.npz")
            _close(result[f"{solver}/scores"], expected)
            _close(result[f"{solver}/self_influence"], expected_self)


@pytest.mark.slow
def test_dead_worker_gives_a_clear_error_not_a_hang(cluster):
    out = cluster["out"]
    (code0, elapsed, err), (code1, _, err1) = cluster["codes"]
    assert code1 == 3, err1
    assert code0 == 7, err
    assert elapsed < 240
    message = open(f"{out}0.npz.err").read()
    assert message.startswith(
        "WorkerError: `explain` stopped: a worker or device of MultiWorkerMirroredStrategy failed"
    ), message
    assert "Restart every worker" in message


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    """examples/distributed.py, as the README runs it, on two logical CPU devices."""
    out = tmp_path / "top.npz"
    script = os.path.join(os.path.dirname(HERE), "examples", "distributed.py")
    done = subprocess.run(
        [sys.executable, script, "--logical-cpus", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MirroredStrategy with 2 replicas" in done.stdout
    top = np.load(out)
    assert top["harmful_indices"].shape == (10, 5)
    assert np.all(np.diff(top["harmful_scores"], axis=1) <= 0)


def test_interrupted_explain_resumes_under_the_strategy(strategy, tmp_path, monkeypatch):
    """A resumed explain(output=...) skips finished global batches on the replicas too."""
    from tf_influence import resume

    x, y = _data()
    plain, mirrored = _models(strategy)
    im = _run(mirrored, "cg", x, y, 8)
    expected = _run(plain, "cg", x, y, 8).explain(x[:3], y[:3], verbose=0)
    out = str(tmp_path / "scores.npy")
    write = resume.ResumableOutput.write
    written = []

    def interrupted(self, start, block):
        write(self, start, block)
        written.append(start)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumableOutput, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        im.explain(x[:3], y[:3], verbose=0, output=out)
    monkeypatch.setattr(resume.ResumableOutput, "write", write)
    steps = []
    score_step = im.operator.replicas._score_step
    monkeypatch.setattr(
        im.operator.replicas, "_score_step", lambda impl: steps.append(1) or score_step(impl)
    )
    result = im.explain(x[:3], y[:3], verbose=0, output=out)
    assert len(steps) == 7 - 3  # 50 examples in 7 global batches of 8, 3 were done
    _close(result, expected)


def test_replicas_out_of_sync_are_refused(strategy):
    """Mirrored copies that drifted apart would mix models: refused, with the fix."""
    x, y = _data()
    _, mirrored = _models(strategy)
    kernel = mirrored.get_layer("hidden").kernel
    copies = kernel.value.values
    copies[1].assign(copies[1] + 0.01)
    im = tfi.InfluenceModel(mirrored)
    with pytest.raises(
        ValueError,
        match=r"replicas hold different values of weight '\w*/?hidden/"
        r"kernel'.*differ by up to 0.01.*set_weights",
    ):
        im.fit(x, y, verbose=0)
    mirrored.set_weights(mirrored.get_weights())  # the suggested fix
    im.fit(x, y, verbose=0)


def test_kronecker_subset_runs_on_the_replicas_and_from_a_dataset(strategy):
    """``max_examples``: the same subset, and the same draws, on replicas, one device
    and a ``tf.data`` pipeline (filtered by position), so the same factors."""
    from tf_influence.engine.output_draws import subset_positions

    x, y = _data()
    plain, mirrored = _models(strategy)

    def make():
        return tfi.solvers.EKFAC(samples=2, seed=3, max_examples=20)

    im = _run(mirrored, make(), x, y, 7)
    reference = _run(plain, make(), x, y, 7)
    inverse = approximate_inverse(reference)
    # Sums in another order move the eigenbases of these 20-example factors by about
    # 1e-10 (close eigenvalues); another subset or other draws move them by O(1).
    tolerance = {"rtol": 1e-7, "atol": 1e-8}
    np.testing.assert_allclose(approximate_inverse(im), inverse, **tolerance)
    streamed = tfi.InfluenceModel(plain)
    streamed.compile(solver=make(), damping=reference.damping)
    streamed.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(7), verbose=0)
    np.testing.assert_allclose(approximate_inverse(streamed), inverse, **tolerance)
    # Not the factors of every example, nor of another subset.
    whole = _run(plain, tfi.solvers.EKFAC(samples=2, seed=3), x, y, 7)
    assert np.max(np.abs(approximate_inverse(whole) - inverse)) > 1e-2 * np.max(np.abs(inverse))
    assert len(subset_positions(len(x), 20, 3)) == 20


@pytest.mark.parametrize(
    "options",
    [{"dim": 64}, {"dim": 32, "projection": "gaussian", "fisher": "empirical"}],
    ids=["kronecker-true", "gaussian-empirical"],
)
def test_projected_index_on_a_strategy_matches_one_device(strategy, options):
    """The index rows (one device) and the projected Gauss-Newton pass (the replicas)
    of a mirrored model give one device's scores and self-influence."""
    x, y = _data()
    plain, mirrored = _models(strategy)
    im = _run(mirrored, tfi.solvers.Projected(**options), x, y, 7)
    reference = _run(plain, tfi.solvers.Projected(**options), x, y, 7)
    _close(im.explain(x[:3], y[:3], verbose=0), reference.explain(x[:3], y[:3], verbose=0), 1e-9)
    _close(im.self_influence(verbose=0), reference.self_influence(verbose=0), 1e-9)
