"""Scaling of ``explain`` over tf.distribute replicas and workers, measured in one run.

The digits MLP of ``benchmarks.common.digits`` (64 -> 128 -> 128 -> 10, trained with Adam,
26k parameters, 1,437 training points, CG at damping 1e-2) is explained for 20 test
points against every training point with:

* no strategy (the reference);
* ``MirroredStrategy`` over 1, 2 and 4 logical CPU devices (one process);
* ``MultiWorkerMirroredStrategy`` with 2 and 4 worker processes on localhost
  (``TF_CONFIG`` with 127.0.0.1 ports).

Each configuration runs in its own process(es), because logical devices and the
multi-worker runtime must be set up before TensorFlow starts. In each: ``fit``, a
first ``explain`` that traces everything, then three ``explain`` calls on new test
points (new solves, no cache hit); the median of the three is reported, with the
ratio to the reference and the largest score difference relative to the largest
score. Logical devices share the machine's cores, so on a 2-core CPU the numbers
measure the cost of distribution, not a speed-up; on several GPUs or machines each
replica brings its own arithmetic.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.distributed            # all configurations (~3 min)
    .venv/bin/python -m benchmarks.distributed --configs none,mirrored:2,workers:2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from benchmarks.common import digits
from benchmarks.common.timing import log

CONFIGS = "none,mirrored:1,mirrored:2,mirrored:4,workers:2,workers:4"
NUM_TESTS = 20
BATCH_SIZE = 128
REPEATS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ".venv/bin/python -m benchmarks.distributed"


def child(spec):
    """One process: set up the strategy, fit, explain; prints a JSON line (worker 0)."""
    import tensorflow as tf

    kind, count = spec["kind"], spec["count"]
    if kind == "mirrored":
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * count,
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif kind == "workers":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = None

    import tf_influence as tfi

    warnings.simplefilter("ignore")
    x_train, y_train, x_test, y_test = digits.load_data()
    if strategy is not None:
        with strategy.scope():
            model = digits.build_model("mlp")
    else:
        model = digits.build_model("mlp")
    model.load_weights(spec["weights"])
    im = tfi.InfluenceModel(model)
    im.compile(solver="cg", damping=digits.DAMPING["mlp"])
    start = time.perf_counter()
    im.fit(x_train, y_train, batch_size=BATCH_SIZE, verbose=0)
    fit_seconds = time.perf_counter() - start

    def explain(index):
        part = slice(index * NUM_TESTS, (index + 1) * NUM_TESTS)
        start = time.perf_counter()
        scores = im.explain(x_test[part], y_test[part], verbose=0)
        return time.perf_counter() - start, scores

    first_seconds, _ = explain(0)  # traces the solver and scoring graphs
    timings, kept = [], None
    for index in range(1, REPEATS + 1):
        seconds, scores = explain(index)
        timings.append(seconds)
        if index == 1:
            kept = scores
    task = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
    if task == 0:
        np.save(spec["scores"], kept)
        print(
            json.dumps(
                {
                    "replicas": 1 if strategy is None else int(strategy.num_replicas_in_sync),
                    "fit": fit_seconds,
                    "first": first_seconds,
                    "explain": float(np.median(timings)),
                    "iterations": int(im.diagnostics.iterations),
                }
            ),
            flush=True,
        )


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_config(kind, count, weights, directory, timeout):
    spec = {
        "kind": kind,
        "count": count,
        "weights": weights,
        "scores": os.path.join(directory, f"{kind}{count}.npy"),
    }
    command = [sys.executable, "-m", "benchmarks.distributed", "--child", json.dumps(spec)]
    processes = []
    if kind == "workers":
        cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]}
        for index in range(count):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CONFIG=json.dumps(config))
            processes.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            )
    else:
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    outputs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=timeout)
            if process.returncode != 0:
                raise RuntimeError(f"{kind}:{count} failed with exit code {process.returncode}")
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    result = json.loads(outputs[0].strip().splitlines()[-1])
    result["scores"] = np.load(spec["scores"])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    log("training the digits MLP")
    model, accuracy = digits.train_model("mlp", digits.load_data(), digits.EPOCHS)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        weights = os.path.join(directory, "mlp.weights.h5")
        model.save_weights(weights)
        for config in args.configs.split(","):
            kind, _, count = config.partition(":")
            log(f"{config}")
            rows.append(
                (
                    kind,
                    int(count or 1),
                    run_config(kind, int(count or 1), weights, directory, args.timeout),
                )
            )
    reference = next((r for k, _, r in rows if k == "none"), rows[0][2])
    scale = float(np.max(np.abs(reference["scores"])))
    print(
        f"# explain under tf.distribute: digits MLP ({model.count_params()} params, test acc "
        f"{accuracy:.3f}), {NUM_TESTS} test x 1437 train, CG, batch {BATCH_SIZE}, "
        f"{os.cpu_count()} cores; `{COMMAND}`\n"
    )
    print(
        "| strategy | replicas | fit (s) | first explain (s) | explain (s) | vs no strategy "
        "| CG iterations | max score diff / max score |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {"none": "none", "mirrored": "MirroredStrategy", "workers": "MultiWorkerMirrored"}
    for kind, count, r in rows:
        label = names[kind] + (f", {count} worker processes" if kind == "workers" else "")
        difference = float(np.max(np.abs(r["scores"] - reference["scores"]))) / scale
        print(
            f"| {label} | {r['replicas']} | {r['fit']:.2f} | {r['first']:.2f} | "
            f"{r['explain']:.2f} | {r['explain'] / reference['explain']:.2f}x time | "
            f"{r['iterations']} | {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
