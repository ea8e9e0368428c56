"""A process running ``explain(output=...)`` that the test kills mid-run.

    python tests/resumable_worker.py PROBLEM.npz OUT.npy BLOCKS

After BLOCKS blocks are written (and checkpointed) it prints "KILL ME" and waits
inside ``explain``; tests/test_resume.py then kills it with SIGKILL.
"""

import os
import sys
import time


def build(problem):
    """The fitted ``InfluenceModel`` of PROBLEM.npz's weights and data (also used by the test)."""
    import keras
    from conftest import make_mlp  # conftest.py sits beside this file

    import tf_influence as tfi

    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights([problem[f"w{i}"] for i in range(len(model.weights))])
    im = tfi.InfluenceModel(model)
    # Forward-mode scoring takes one pass per batch of 16 (factored scoring would take
    # all 400 examples in one pass), so the kill lands between passes.
    im.compile(solver="cg", damping=float(problem["damping"]), scoring="jvp")
    return im.fit(problem["x"], problem["y"], batch_size=int(problem["batch_size"]), verbose=0)


def main(problem_path, out, blocks):
    import numpy as np

    from tf_influence import resume

    problem = np.load(problem_path)
    im = build(problem)
    resume.CHECKPOINT_SECONDS = 0  # record progress after every block
    write = resume.ResumableOutput.write
    written = []

    def write_then_wait(self, start, block):
        write(self, start, block)
        written.append(start)
        if len(written) == blocks:
            print("KILL ME", flush=True)
            time.sleep(600)

    resume.ResumableOutput.write = write_then_wait
    im.explain(problem["x_test"], problem["y_test"], verbose=0, output=out)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
