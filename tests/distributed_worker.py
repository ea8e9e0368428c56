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


def main(problem_path, out_path, die_after_fit):
    import tensorflow as tf

    # The strategy must exist before any other TensorFlow op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras
    import numpy as np
    from conftest import make_mlp  # conftest.py sits beside this script

    import tf_influence as tfi

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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1], sys.argv[2], "--die-after-fit" in sys.argv)
