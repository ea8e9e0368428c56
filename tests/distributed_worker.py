"""One worker of a MultiWorkerMirroredStrategy run, started by tests/test_distribute.py.

    TF_CONFIG=... python tests/distributed_worker.py PROBLEM.npz OUT.npz [--die-after-fit]

Reads the weights and data from PROBLEM.npz, builds the model under the strategy,
explains the test points and writes the results to OUT.npz. A ``WorkerError`` is
written to OUT.npz.err (exit code 7); ``--die-after-fit`` makes worker 1 exit
abruptly after ``fit`` (a crashed machine).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# The strategy must exist before any other TensorFlow op runs.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_mlp  # noqa: E402

import tf_influence as tfi  # noqa: E402


def main(problem_path, out_path, die_after_fit):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    problem = np.load(problem_path, allow_pickle=False)
    with strategy.scope():
        model = make_mlp()
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights([problem[f"w{i}"] for i in range(len(model.weights))])
    x = problem[f"x{task}"] if f"x{task}" in problem else problem["x"]
    results = {}
    try:
        for solver in str(problem["solvers"]).split(","):
            im = tfi.InfluenceModel(model)
            assert im.strategy is strategy
            im.compile(solver=solver, damping=float(problem["damping"]))
            im.fit(x, problem["y"], batch_size=int(problem["batch_size"]), verbose=0)
            if die_after_fit and task == 1:
                os._exit(3)
            tests = problem["x_test"], problem["y_test"]
            results[f"{solver}/scores"] = im.explain(*tests, verbose=0)
            results[f"{solver}/self_influence"] = im.self_influence(verbose=0)
    except (tfi.distribute.WorkerError, ValueError) as error:
        with open(out_path + ".err", "w") as handle:
            handle.write(f"{type(error).__name__}: {error}")
        sys.stdout.flush()
        os._exit(7)  # the strategy's threads wait for the dead worker at exit
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--die-after-fit" in sys.argv)
