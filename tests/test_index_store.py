"""The on-disk gradient store and the streaming queries, against dense numpy references."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from store_worker import BLOCK, DIM, FINGERPRINTS, NUM_ROWS, build, rows

from tf_influence.index import (
    GradientStore,
    kernels,
    stream_gram,
    stream_quadratic,
    stream_scores,
    stream_top_k,
)
from tf_influence.index import store as store_module

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_store(path, values, dtype="float16", block=64, fingerprints=None):
    store = GradientStore(
        path, fingerprints or {"weights": "w"}, len(values), values.shape[1], dtype
    )
    for start in range(0, len(values), block):
        store.write(start, values[start : start + block])
    store.finish()
    return GradientStore.open(path)


def stored_rows(store):
    return np.concatenate([block for _, block in store.blocks(block_rows=50)])


def integer_problem(seed=0, n=203, dim=8, m=4):
    """Rows and queries of small integers: every score is exact, and many are tied.

    Each nonzero row has max |entry| = 4, so float16 with its per-row scale stores it
    exactly; rows 10-19 repeat rows 0-9 and row 5 is zero.
    """
    rng = np.random.default_rng(seed)
    values = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    values[np.arange(n), rng.integers(0, dim, n)] = 4 * rng.choice([-1, 1], n)
    values[10:20] = values[:10]
    values[5] = 0
    queries = rng.integers(-2, 3, size=(m, dim)).astype(np.float32)
    return values, queries


def dense_top_k(scores, k):
    harmful = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: lower index first
    helpful = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return harmful, helpful


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stream_top_k_equals_dense_top_k_with_ties(tmp_path, dtype):
    values, queries = integer_problem()
    store = make_store(str(tmp_path / "s.npy"), values, dtype)
    np.testing.assert_array_equal(stored_rows(store), values)  # stored exactly
    scores = -(queries.astype(np.float64) @ values.T.astype(np.float64))
    assert max(len(row) - len(np.unique(row)) for row in scores) > 100  # many ties
    for k, block_rows in [(1, 7), (10, 16), (25, 203), (40, 1000), (203, 64)]:
        top = stream_top_k(store, queries, k, block_rows=block_rows)
        harmful, helpful = dense_top_k(scores, k)
        np.testing.assert_array_equal(top["top_harmful_indices"], harmful)
        np.testing.assert_array_equal(top["top_helpful_indices"], helpful)
        np.testing.assert_array_equal(
            top["top_harmful_scores"], np.take_along_axis(scores, harmful, 1)
        )
        np.testing.assert_array_equal(
            top["top_helpful_scores"], np.take_along_axis(scores, helpful, 1)
        )
        assert top["top_harmful_indices"].dtype == np.int64
        assert top["top_harmful_scores"].dtype == np.float32


def test_stream_top_k_of_continuous_scores_and_k_above_n(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((500, 32)).astype(np.float32)
    # Blocks in which the best scores rise with the index: many values pass the k-th.
    values *= np.linspace(0.1, 3, 500, dtype=np.float32)[:, None]
    queries = rng.standard_normal((3, 32)).astype(np.float32)
    store = make_store(str(tmp_path / "s.npy"), values, block=100)
    for block_rows in (16, 128):
        scores = stream_scores(store, queries, block_rows=block_rows)
        for k in (5, 300):
            top = stream_top_k(store, queries, k, block_rows=block_rows)
            harmful, helpful = dense_top_k(scores, k)
            np.testing.assert_array_equal(top["top_harmful_indices"], harmful)
            np.testing.assert_array_equal(top["top_helpful_indices"], helpful)
    top = stream_top_k(store, queries, 10_000)  # clamped to n
    assert top["top_harmful_indices"].shape == (3, 500)
    np.testing.assert_array_equal(
        np.sort(top["top_helpful_indices"], 1), np.tile(np.arange(500), (3, 1))
    )
    empty = stream_top_k(store, queries[:0], 4)
    assert empty["top_helpful_scores"].shape == (0, 4)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scores_quadratic_and_gram_equal_dense(tmp_path, dtype):
    rng = np.random.default_rng(2)
    # Rows from 1e-8 (below float16's smallest number) to 1e6 (above its largest).
    values = rng.standard_normal((301, 16)) * np.logspace(-8, 6, 301)[:, None]
    queries = rng.standard_normal((5, 16))
    store = make_store(str(tmp_path / "s.npy"), values, dtype)
    stored = stored_rows(store).astype(np.float64)
    # float16 with a per-row scale: every entry within 2**-11 of its row's largest.
    tolerance = np.abs(values).max(1, keepdims=True) * (2.0**-11 if dtype == "float16" else 1e-7)
    assert (np.abs(stored - values) <= tolerance).all()

    scale = np.abs(queries).sum(1)[:, None] * np.abs(stored).max(1)[None]  # bounds |score|
    scores = stream_scores(store, queries, block_rows=40)
    np.testing.assert_array_less(np.abs(scores + queries @ stored.T), 1e-5 * scale)
    out = np.lib.format.open_memmap(str(tmp_path / "out.npy"), "w+", np.float32, (5, 301))
    assert stream_scores(store, queries, out=out) is out
    np.testing.assert_allclose(out, scores, rtol=1e-6, atol=0)

    matrix = rng.standard_normal((16, 16))
    matrix = matrix @ matrix.T
    quadratic = stream_quadratic(store, matrix, block_rows=64)
    expected = np.einsum("ij,jk,ik->i", stored, matrix, stored)
    np.testing.assert_allclose(quadratic, expected, rtol=1e-4, atol=0)
    np.testing.assert_allclose(stream_gram(store, block_rows=64), stored.T @ stored, rtol=1e-5)


def test_traced_once_per_shape(tmp_path):
    values, queries = integer_problem(n=100)
    store = make_store(str(tmp_path / "s.npy"), values)
    stream_top_k(store, queries, 3, block_rows=33)
    traces = kernels.dots.experimental_get_tracing_count()
    stream_top_k(store, queries + 1, 5, block_rows=33)  # the last, short block too
    assert kernels.dots.experimental_get_tracing_count() == traces


def _kill_mid_write(path, dtype, kill_at):
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "store_worker.py"), path, dtype, str(kill_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # The worker imports this checkout's tf_influence, as the test does.
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])),
    )
    try:
        line = process.stdout.readline()  # blocks until the worker is mid-write
        assert line.strip() == "KILL ME", process.stderr.read()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _files(path):
    return {
        name: open(os.path.join(os.path.dirname(path), name), "rb").read()
        for name in sorted(os.listdir(os.path.dirname(path)))
        if name.startswith(os.path.basename(path)) and not name.endswith(".json")
    }


def test_killed_build_resumes_to_the_identical_file(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    expected = str(tmp_path / "a" / "index.npy")
    build(GradientStore(expected, FINGERPRINTS, NUM_ROWS, DIM))
    path = str(tmp_path / "b" / "index.npy")
    _kill_mid_write(path, "float16", kill_at=5)
    with open(path + ".progress.json") as handle:
        record = json.load(handle)
    assert (record["rows_written"], record["complete"]) == (5 * BLOCK, False)
    assert _files(path)[os.path.basename(path)] != _files(expected)[os.path.basename(expected)]

    store = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM)
    assert store.rows_written == 5 * BLOCK
    build(store)
    assert list(_files(path).values()) == list(_files(expected).values())  # byte for byte
    np.testing.assert_array_equal(
        stored_rows(GradientStore.open(path)), stored_rows(GradientStore.open(expected))
    )


def test_a_store_of_another_build_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 0)
    path = str(tmp_path / "index.npy")
    build(GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM), blocks=2)
    before = _files(path)
    other = dict(FINGERPRINTS, weights="w1", projection="seed=1")
    with pytest.raises(ValueError, match=r"made with other: projection, weights\. .*delete"):
        GradientStore(path, other, NUM_ROWS, DIM)
    with pytest.raises(ValueError, match=r"made with other: dim \(24 there, 25 here\)"):
        GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM + 1)
    with pytest.raises(ValueError, match=r"made with other: dtype"):
        GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM, "float32")
    assert _files(path) == before  # nothing touched
    with pytest.raises(ValueError, match=r"not complete: 64 of 300 rows.*resume"):
        GradientStore.open(path)
    build(GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM))
    with pytest.raises(ValueError, match=r"built for other: weights\. Build a store"):
        GradientStore.open(path, dict(FINGERPRINTS, weights="w1"))
    assert GradientStore.open(path, FINGERPRINTS).complete
    # Reopening a complete store with the same arguments has nothing left to write.
    again = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM)
    assert again.complete and again.rows_written == NUM_ROWS


@pytest.mark.parametrize("failing", ["pwrite", "fsync"])
def test_full_disk_keeps_what_is_written_and_resumes(tmp_path, monkeypatch, failing):
    expected = str(tmp_path / "expected.npy")
    build(GradientStore(expected, FINGERPRINTS, NUM_ROWS, DIM))
    path = str(tmp_path / "index.npy")
    monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 0)
    store = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM)
    real, calls = getattr(os, failing), []

    def full(fd, *args):
        if fd in store._fds:  # the rows and the scales, not the record
            calls.append(fd)
        if len(calls) == 7:  # in the 4th block: 2 writes (or syncs) per block
            if failing == "pwrite":
                real(fd, args[0][: len(args[0]) // 2], args[1])  # a partial write
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, failing, full)
    with pytest.raises(OSError, match=r"disk is full") as info:
        build(store)
    monkeypatch.setattr(os, failing, real)
    message = str(info.value)
    kept = 3 * BLOCK
    assert info.value.errno == errno.ENOSPC
    for part in [path, "needed", "free", f"Rows 0:{kept} are kept", f"resumes at row {kept}"]:
        assert part in message
    with open(path + ".progress.json") as handle:
        assert json.load(handle)["rows_written"] == kept
    assert store.rows_written == kept
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    build(store)  # the same object goes on once there is space
    assert list(_files(path).values()) == list(_files(expected).values())


def test_full_disk_while_recording_keeps_the_older_record(tmp_path, monkeypatch):
    path = str(tmp_path / "index.npy")
    monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 0)
    store = build(GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM), blocks=2)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "fsync", full)  # the record cannot be written either
    with pytest.raises(OSError, match=r"Rows 0:64 are kept.*resumes at row 64"):
        build(store)
    monkeypatch.undo()
    assert GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM).rows_written == 2 * BLOCK
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_other_write_errors_say_how_to_resume(tmp_path, monkeypatch):
    store = GradientStore(str(tmp_path / "s.npy"), FINGERPRINTS, NUM_ROWS, DIM)

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", broken)
    with pytest.raises(OSError, match=r"rows 0:32 .* failed: .*Input/output.*resumes at row 0"):
        build(store)


def test_extras_round_trip(tmp_path):
    path = str(tmp_path / "s.npy")
    store = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM, "float32")
    gram = np.arange(DIM * DIM, dtype=np.float64).reshape(DIM, DIM)
    store.write_extra("gram", gram)
    build(store)
    opened = GradientStore.open(path)
    np.testing.assert_array_equal(opened.read_extra("gram"), gram)
    assert opened.read_extra("gram").dtype == np.float64
    expected = rows(0, NUM_ROWS).astype(np.float64)
    expected = expected.T @ expected
    np.testing.assert_allclose(stream_gram(opened), expected, atol=1e-6 * expected.max())
    with pytest.raises(ValueError, match=r"no extra array named 'eigen'; it has \['gram'\]"):
        opened.read_extra("eigen")
    with pytest.raises(ValueError, match=r"Argument `name` must be .*Received: name='../x'"):
        store.write_extra("../x", gram)
    with pytest.raises(ValueError, match=r"read-only.*GradientStore\("):
        opened.write_extra("more", gram)


def test_bad_arguments(tmp_path):
    path = str(tmp_path / "s.npy")
    store = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM)
    queries = np.ones((2, DIM), np.float32)
    with pytest.raises(ValueError, match=r"not complete: 0 of 300 rows.*resume"):
        stream_top_k(store, queries, 3)
    with pytest.raises(
        ValueError, match=r"Argument `start` must equal `rows_written` \(0\).*start=32"
    ):
        store.write(32, rows(32, 64))
    with pytest.raises(ValueError, match=r"Argument `block` must be a real \(rows, 24\) array"):
        store.write(0, rows(0, 4)[:, :5])
    nan = rows(0, 4)
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in row 2 of the store"):
        store.write(0, nan)
    with pytest.raises(ValueError, match=r"not full: rows 0:300 are not written"):
        store.finish()
    build(store)
    for kwargs, match in [
        ({"k": 0}, r"Argument `k` must be a positive integer. Received: k=0"),
        ({"k": 2.5}, r"Received: k=2.5"),
        ({"block_rows": 0}, r"Argument `block_rows` must be a positive integer .*block_rows=0"),
        (
            {"queries": np.ones((2, DIM + 1))},
            r"`queries` must be a real \(m, 24\) array.*v\[None\]",
        ),
        ({"queries": np.ones(DIM)}, r"`queries` must be a real \(m, 24\)"),
        ({"queries": np.full((2, DIM), np.inf)}, r"`queries` holds NaN or inf \(row 0\)"),
    ]:
        arguments = {"store": store, "queries": queries, "k": 3, **kwargs}
        with pytest.raises(ValueError, match=match):
            stream_top_k(**arguments)
    with pytest.raises(ValueError, match=r"Argument `store` must be a tf_influence.index"):
        stream_top_k(path, queries, 3)
    with pytest.raises(ValueError, match=r"`out` must be a float32 array of shape \(2, 300\)"):
        stream_scores(store, queries, out=np.empty((2, 300)))
    with pytest.raises(ValueError, match=r"`matrix` must be a finite \(24, 24\) array"):
        stream_quadratic(store, np.eye(DIM + 1))
    with pytest.raises(
        ValueError, match=r"Argument `dtype` must be one of \['float16', 'float32'\]"
    ):
        GradientStore(str(tmp_path / "t.npy"), FINGERPRINTS, 10, 4, "float64")
    with pytest.raises(ValueError, match=r"Argument `path` must be a path ending in .npy"):
        GradientStore(str(tmp_path / "t.bin"), FINGERPRINTS, 10, 4)
    with pytest.raises(ValueError, match=r"Argument `num_rows` must be a positive integer"):
        GradientStore(str(tmp_path / "t.npy"), FINGERPRINTS, 0, 4)
    with pytest.raises(ValueError, match=r"Argument `fingerprints` must be a dict"):
        GradientStore(str(tmp_path / "t.npy"), ["weights"], 10, 4)
    np.save(str(tmp_path / "mine.npy"), np.zeros(3))
    with pytest.raises(ValueError, match=r"existing file that is not a gradient store"):
        GradientStore(str(tmp_path / "mine.npy"), FINGERPRINTS, 10, 4)
    with pytest.raises(ValueError, match=r"names no gradient store"):
        GradientStore.open(str(tmp_path / "none.npy"))
    with open(path + ".progress.json", "w") as handle:
        handle.write("{not json")
    with pytest.raises(
        ValueError, match=r"progress file .* cannot be read.*To start again, delete"
    ):
        GradientStore.open(path)


def test_only_aligned_arrays_are_shared_with_tensorflow():
    aligned = kernels.aligned_empty((3, 5), np.float32)
    aligned[:] = np.arange(15).reshape(3, 5)
    shared = kernels.as_tensor(aligned)
    aligned[0, 0] = 7  # the tensor sees the buffer (no copy)
    assert shared.numpy()[0, 0] == 7
    misaligned = np.arange(17, dtype=np.float32)[1:].reshape(4, 4)  # 4 bytes off
    copied = kernels.as_tensor(misaligned)
    misaligned[0, 0] = -1
    assert copied.numpy()[0, 0] == 1  # a copy: TensorFlow never sees a misaligned buffer


def test_a_store_larger_than_the_free_disk_warns(tmp_path, monkeypatch):
    from tf_influence.index import layout

    usage = layout.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(layout.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.warns(UserWarning, match=r"will need 15.2 KiB and its disk has 1000 bytes free"):
        GradientStore(str(tmp_path / "s.npy"), FINGERPRINTS, NUM_ROWS, DIM)


def test_a_missing_folder_is_created(tmp_path):
    path = str(tmp_path / "new" / "folder" / "s.npy")
    store = GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM, "float32")
    build(store)
    np.testing.assert_array_equal(
        np.concatenate([block for _, block in GradientStore.open(path).blocks(5)]),
        rows(0, NUM_ROWS).astype(np.float32),
    )
