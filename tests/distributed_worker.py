"""One worker of a MultiWorkerMirroredStrategy run, started by tests/test_distribute.py.

    TF_CONFIG=... python tests/distributed_worker.py PROBLEM.npz OUT.npz [--die-after-fit]

Reads the weights and data from PROBLEM.npz and builds the model under the strategy.
Then, in order (each start of a worker costs a TensorFlow import, so one run
checks every scenario):

1. if PROBLEM.npz holds ``x_other``, worker 1 fits on it while worker 0 fits on
   ``x``: both must refuse; the message is written to OUT.npz.refused;
2. every solver of ``solvers`` is fitted on ``x`` and explains the test points;
   the results are written to OUT.npz;
3. with ``--die-after-fit``, CG is fitted again and worker 1 exits abruptly
   (exit code 3, a crashed machine) before the others explain.

A ``WorkerError`` or ``ValueError`` outside step 1 is written to OUT.npz.err
(exit code 7).
"""

import json
import os
import sys


def _write(path, error):
    with open(path, "w") as handle:
        handle.write(f"{type(error).__name__}: {error}")


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
    tests = problem["x_test"], problem["y_test"]

    def fitted(solver, x):
        im = tfi.InfluenceModel(model)
        assert im.strategy is strategy
        im.compile(solver=solver, damping=float(problem["damping"]))
        return im.fit(x, problem["y"], batch_size=int(problem["batch_size"]), verbose=0)

    try:
        if "x_other" in problem:
            try:
                fitted("cg", problem["x_other"] if task == 1 else problem["x"])
            except ValueError as error:
                _write(out_path + ".refused", error)
            else:
                _write(out_path + ".refused", AssertionError("fit accepted different data"))
        results = {}
        for solver in str(problem["solvers"]).split(","):
            im = fitted(solver, problem["x"])
            results[f"{solver}/scores"] = im.explain(*tests, verbose=0)
            results[f"{solver}/self_influence"] = im.self_influence(verbose=0)
        np.savez(out_path, **results)
        if die_after_fit:
            im = fitted("cg", problem["x"])
            if task == 1:
                os._exit(3)
            im.explain(*tests, verbose=0)
    except (tfi.distribute.WorkerError, ValueError) as error:
        _write(out_path + ".err", error)
        sys.stdout.flush()
        os._exit(7)  # the strategy's threads wait for the dead worker at exit


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1], sys.argv[2], "--die-after-fit" in sys.argv)
