"""The on-disk gradient store: build time, file size, query latency and RAM, float16 vs float32.

Rows: the digits MLP of ``benchmarks.common.digits`` (64-128-128-10 tanh, 26,122
parameters) is trained; the per-example loss gradients of its 1,437 training
points are projected to ``--dim`` (1,024) dimensions with a Gaussian
Johnson-Lindenstrauss matrix (entries N(0, 1/dim)). Row j of a store of n rows is
the projected gradient of training point ``j % 1437`` plus Gaussian noise of 0.3
times that row's RMS entry, so that no two rows are equal (the latency benchmark
does not need the projection that ``tfi.solvers.Projected`` builds, only rows of
the same size and distribution). The queries are 20 test points' projected
gradients solved with TRAK's curvature, ``inv(Phi^T Phi / 1437 + 1e-2 I) @ phi_test``.

For each n (``--sizes``) and dtype (float32 first, the reference, then float16):

* build: seconds spent in ``GradientStore.write`` + ``finish`` (the rows are made
  outside the timer), per row and in all, and the size of the files;
* query: ``stream_top_k`` of 1 test point (k=10) and of 20 test points: the first
  call (it compiles the kernel for the shape), the median of ``--repeats`` warm
  calls (the file in the page cache), and a cold call (the file's pages dropped
  from the page cache with ``posix_fadvise(DONTNEED)`` first: a read from disk);
* peak RSS above the baseline (the RSS after imports, the model, the projected
  rows, before the store is opened; ``VmHWM`` reset before the queries);
* float16 against float32: Pearson of the 20 x n scores, and the overlap of the
  top-10 harmful and helpful sets.

Then, at the largest n in float16, the alternatives the store does not use, to
show why: numpy's float16 -> float32 cast into a reused buffer + a numpy product
(instead of the compiled fused kernel), and ``np.memmap`` (whose pages count in the
process's RSS). The store files go to a temporary folder (``--dir``), deleted at
the end; 1M x 1,024 float16 is 2 GiB (float32 4 GiB). Usage, from the repository
root::

    .venv/bin/python -m benchmarks.index_store                 # about 5 minutes
    .venv/bin/python -m benchmarks.index_store --sizes 10000,100000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import digits
from benchmarks.common.report import machine, markdown_table, now
from benchmarks.common.timing import fmt_time, log, reset_peak, status_mib

COMMAND = ".venv/bin/python -m benchmarks.index_store"
NOISE = 0.3
DAMPING = 1e-2
WRITE_BLOCK = 8192
K = 10


def projected_digits(dim, seed=0):
    """``(base (1437, dim), queries (20, dim))``: projected gradients, and solved test ones."""
    import keras
    import tensorflow as tf

    data = digits.load_data()
    model, _ = digits.train_model("mlp", data)
    x_train, y_train, x_test, y_test = data
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def gradients(x, y, batch=128):
        parts = []
        for start in range(0, len(x), batch):
            with tf.GradientTape() as tape:
                losses = loss(y[start : start + batch], model(x[start : start + batch]))
            jacobians = tape.jacobian(losses, model.trainable_variables)
            parts.append(np.concatenate([j.numpy().reshape(len(losses), -1) for j in jacobians], 1))
        return np.concatenate(parts)

    rng = np.random.default_rng(seed)
    train = gradients(x_train, y_train)
    projection = rng.standard_normal((train.shape[1], dim), dtype=np.float32) / np.sqrt(dim)
    base = train @ projection
    tests = gradients(x_test[: digits.NUM_TESTS], y_test[: digits.NUM_TESTS]) @ projection
    gram = base.T.astype(np.float64) @ base / len(base) + DAMPING * np.eye(dim)
    queries = np.linalg.solve(gram, tests.T.astype(np.float64)).T.astype(np.float32)
    log(f"{train.shape[1]} parameters, projected to {dim}; {len(base)} base rows")
    return base.astype(np.float32), queries


def release_freed_memory():
    """Returns the heap's freed pages to the system (glibc), so that RSS counts live data.

    Without it the baseline would include memory freed after the gradients were
    computed, which later allocations reuse without raising RSS: peaks above the
    baseline would read too low.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def make_rows(base, start, stop, seed=1):
    """Rows ``start:stop``: ``base[j % len(base)]`` plus noise (the same for any blocking)."""
    rng = np.random.default_rng([seed, start])
    rows = base[np.arange(start, stop) % len(base)]
    rms = np.sqrt(np.mean(rows**2, axis=1, keepdims=True))
    return rows + NOISE * rms * rng.standard_normal(rows.shape, dtype=np.float32)


def build(path, base, n, dtype):
    """Writes the store; returns (seconds in write + finish, bytes on disk)."""
    from tf_influence.index import GradientStore

    store = GradientStore(path, {"rows": f"digits+noise n={n}"}, n, base.shape[1], dtype)
    seconds = 0.0
    for start in range(0, n, WRITE_BLOCK):
        rows = make_rows(base, start, min(start + WRITE_BLOCK, n))
        begin = time.perf_counter()
        store.write(start, rows)
        seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    store.finish()
    seconds += time.perf_counter() - begin
    folder, name = os.path.split(path)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if name in f)
    return seconds, size


def drop_cache(path):
    """Drops the store's pages from the page cache (our own files only)."""
    folder, name = os.path.split(path)
    for file in os.listdir(folder):
        if file.startswith(name):
            fd = os.open(os.path.join(folder, file), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def latency(store, queries, repeats, path):
    """Seconds of ``stream_top_k(store, queries, K)``: a dict with the first call, the warm
    median (wall and CPU, all threads), the cold median, and the peak RSS (MiB) of the
    first call and of the others."""
    from tf_influence.index import stream_top_k

    def once():
        wall, cpu = time.perf_counter(), time.process_time()
        stream_top_k(store, queries, K)
        return time.perf_counter() - wall, time.process_time() - cpu

    reset_peak()
    first = once()[0]
    peak_first = status_mib("VmHWM")
    reset_peak()
    warm = np.median([once() for _ in range(repeats)], axis=0)
    cold = []
    for _ in range(2):
        drop_cache(path)
        cold.append(once()[0])
    once()  # back in the page cache for what follows
    return {
        "first": first,
        "warm": float(warm[0]),
        "cpu": float(warm[1]),
        "cold": float(np.median(cold)),
        "peak_first": peak_first,
        "peak": status_mib("VmHWM"),
    }


def numpy_alternatives(store, query, repeats):
    """Seconds and peak RSS (MiB above now) of the two ways the store does not read."""
    from tf_influence.index.stream import RunningTopK

    def numpy_cast():
        block_rows = 16384
        buffer = np.empty((block_rows, store.dim), np.float32)
        top = RunningTopK(1, K)
        for start, count, block, scales in store.raw_blocks(block_rows):
            np.copyto(buffer[:count], block[:count])  # float16 -> float32
            top.update(start, -(buffer[:count] @ query)[None] * scales[:count])
        return top

    def memmap():
        rows = np.load(store.path, mmap_mode="r")
        scales = np.load(store.path + ".scales.npy", mmap_mode="r")
        top = RunningTopK(1, K)
        for start in range(0, store.num_rows, 16384):
            block = rows[start : start + 16384].astype(np.float32)
            top.update(start, -(block @ query)[None] * scales[start : start + 16384])
        del rows, scales
        return top

    results = {}
    for name, fn in [("numpy float16->float32 cast", numpy_cast), ("np.memmap + numpy", memmap)]:
        fn()
        baseline = status_mib("VmRSS")
        reset_peak()
        times = []
        for _ in range(max(1, repeats // 2)):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        results[name] = (float(np.median(times)), status_mib("VmHWM") - baseline)
    return results


def agreement(reference, scores):
    """``(min Pearson over queries, top-10 overlap harmful, helpful)`` of two score matrices."""
    pearson = min(np.corrcoef(a, b)[0, 1] for a, b in zip(reference, scores, strict=True))

    def overlap(a, b, sign):
        top_a = np.argsort(sign * a, kind="stable")[:K]
        top_b = np.argsort(sign * b, kind="stable")[:K]
        return len(set(top_a) & set(top_b)) / K

    harmful = np.mean([overlap(a, b, -1) for a, b in zip(reference, scores, strict=True)])
    helpful = np.mean([overlap(a, b, 1) for a, b in zip(reference, scores, strict=True)])
    return float(pearson), float(harmful), float(helpful)


def size_text(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="n_train values")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="warm query repeats")
    parser.add_argument("--dir", default=None, help="parent folder of the temporary stores")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()

    from tf_influence.index import GradientStore, stream_scores

    base, queries = projected_digits(args.dim)
    folder = tempfile.mkdtemp(prefix="index_store_", dir=args.dir)
    needed = max(sizes) * (args.dim * 4) * 1.05
    free = shutil.disk_usage(folder).free
    log(f"store files in {folder}: {size_text(free)} free, largest store {size_text(needed)}")
    if free < needed:
        sys.exit(f"Not enough free disk in {folder} for n={max(sizes)}; pass --dir or --sizes.")
    release_freed_memory()
    baseline = status_mib("VmRSS")
    log(f"baseline RSS after imports, model and projected rows: {baseline:.0f} MiB")
    lines, extra = [], {}
    try:
        for n in sizes:
            for dtype in ("float32", "float16"):
                path = os.path.join(folder, f"rows_{n}_{dtype}.npy")
                log(f"n={n} {dtype}: building")
                release_freed_memory()
                reset_peak()
                build_seconds, size = build(path, base, n, dtype)
                build_peak = status_mib("VmHWM") - baseline
                store = GradientStore.open(path)
                release_freed_memory()
                one = latency(store, queries[:1], args.repeats, path)
                twenty = latency(store, queries, args.repeats, path)
                query_peak = max(one["peak"], twenty["peak"]) - baseline
                first_peak = max(one["peak_first"], twenty["peak_first"]) - baseline
                # The reference waits on disk, so that it is not in the next RSS peaks.
                reference_path = os.path.join(folder, f"reference_{n}.npy")
                if dtype == "float32":
                    np.save(reference_path, stream_scores(store, queries))
                    compared = "reference"
                else:
                    scores = stream_scores(store, queries)
                    pearson, harmful, helpful = agreement(np.load(reference_path), scores)
                    compared = f"{pearson:.6f} / {harmful:.2f} / {helpful:.2f}"
                    del scores
                    os.remove(reference_path)
                    if n == max(sizes):
                        release_freed_memory()
                        extra = numpy_alternatives(store, queries[0], args.repeats)
                lines.append(
                    f"| {n:,} | {dtype} | {size_text(size)} | {fmt_time(build_seconds)} "
                    f"({build_seconds / n * 1e6:.1f} us/row) | {build_peak:.0f} MiB | "
                    f"{fmt_time(one['warm'])} ({fmt_time(one['cpu'])} CPU) | "
                    f"{fmt_time(one['cold'])} | {fmt_time(one['first'])} | "
                    f"{fmt_time(twenty['warm'])} ({fmt_time(twenty['cpu'])} CPU) | "
                    f"{fmt_time(twenty['cold'])} | {query_peak:.0f} MiB "
                    f"({first_peak:.0f} MiB) | {compared} |"
                )
                log(lines[-1])
                del store
                for file in os.listdir(folder):
                    if file.startswith(os.path.basename(path)):
                        os.remove(os.path.join(folder, file))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"# Gradient store: {machine()}, {now()}\n")
    print(f"Command: `{COMMAND} {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(
        f"dim {args.dim}, k={K}, baseline RSS {baseline:.0f} MiB (imports, model, rows); "
        f"1-min load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n"
    )
    print(
        "| n_train | dtype | files | build (write+finish) | build peak RSS | top-10, 1 test "
        "point, warm (CPU) | cold | first call | 20 test points, warm (CPU) | cold | "
        "query peak RSS "
        "above baseline (first calls) | "
        "vs float32: Pearson (min of 20) / top-10 overlap harmful / helpful |"
    )
    print("|" + "---|" * 12)
    print("\n".join(lines))
    if extra:
        print(f"\nAlternatives at n={max(sizes):,}, float16, 1 test point, top-10 (warm):\n")
        columns = ("reading and product", "time", "peak RSS above the RSS before")
        rows = [(name, fmt_time(s), f"{peak:.0f} MiB") for name, (s, peak) in extra.items()]
        print("\n".join(markdown_table(columns, rows)))


if __name__ == "__main__":
    main()
