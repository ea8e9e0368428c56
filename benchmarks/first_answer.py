"""Time to a first answer: a second InfluenceModel, and a fresh process, vs a careful baseline.

Three measurements, side by side in one run, on the digits MLP (64 -> 128 tanh -> 128
tanh -> 10 logits, 26k parameters, L2(1e-4) on kernels, 30 epochs of Adam; 1,437
training points from scikit-learn's ``load_digits``, standardised; damping 1e-2; CG
to a relative residual of 1e-5; batches of 128; 20 test points):

1. The careful baseline: a nested-tape Hessian-vector product compiled with
   ``tf.function``, one ``scipy.sparse.linalg.cg`` per test point, per-example
   gradients in a Python loop of a compiled one-example gradient. Timed after a
   warm-up call that traces it (so the baseline pays no tracing).
2. A second, fresh ``InfluenceModel`` on the same Keras model (after a first one
   traced): ``compile`` + ``fit`` + the first ``explain`` of the 20 test points. The
   two alternate, a few rounds; medians. Pearson of the two score matrices.
3. Fresh processes: import + build the model (trained weights loaded from a file) +
   fit + explain, for ours and for the baseline (tracing included), alternating,
   a few rounds; medians, with and without the import.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.first_answer                # about 3 minutes
    .venv/bin/python -m benchmarks.first_answer --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ".venv/bin/python -m benchmarks.first_answer"

SEED = 0
EPOCHS = 30
L2 = 1e-4
NUM_TESTS = 20
DAMPING = 1e-2
CG_TOL = 1e-5
CG_MAX_ITER = 1000
BATCH_SIZE = 128


# -- data and model ---------------------------------------------------------------------
def load_data():
    """Digits, split 80/20 with random_state=0, standardised with training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        y_train.astype(np.int32),
        scaler.transform(x_test).astype(np.float32),
        y_test.astype(np.int32),
    )


def build_model():
    import keras

    keras.utils.set_random_seed(SEED)
    reg = keras.regularizers.L2(L2)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(10, kernel_regularizer=reg),
        ],
        name="mlp",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# -- the careful baseline -------------------------------------------------------------------
def one_blas_thread():
    """numpy's BLAS on one thread while the baseline runs (OpenBLAS spins against TF)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class Baseline:
    """A careful straightforward implementation of the same scores.

    A nested-tape HVP over the training batches compiled with ``tf.function`` (the
    regulariser's product added once), ``scipy.sparse.linalg.cg`` per test point on a
    ``LinearOperator`` with numpy round trips, and per-example gradients from a
    compiled one-example gradient in a Python loop.
    """

    def __init__(self, model, x, y, batch_size, damping):
        import keras
        import tensorflow as tf

        self.model = model
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.variables = list(model.trainable_variables)
        self.num_params = int(sum(int(np.prod(v.shape)) for v in self.variables))
        self.x, self.y = x, y
        x_t, y_t = tf.constant(x), tf.constant(y)
        n = len(x)
        full, rest = divmod(n, batch_size)

        def flat(tensors):
            parts = [
                tf.zeros([int(np.prod(w.shape))]) if t is None else tf.reshape(t, [-1])
                for t, w in zip(tensors, self.variables, strict=True)
            ]
            return tf.concat(parts, axis=0)

        def take(t, start, size):
            begin = [start] + [0] * (len(t.shape) - 1)
            return tf.slice(t, begin, [size] + list(t.shape[1:]))

        example = tf.TensorSpec((1,) + x.shape[1:], tf.float32)
        label = tf.TensorSpec((1,), tf.int32)

        @tf.function(input_signature=[example, label])
        def example_gradient(xj, yj):
            with tf.GradientTape() as tape:
                loss = self.loss(yj, model(xj, training=False))[0]
            return flat(tape.gradient(loss, self.variables))

        def batch_hvp(xb, yb, v):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss = tf.reduce_sum(self.loss(yb, model(xb, training=False))) / n
                dot = tf.reduce_sum(flat(inner.gradient(loss, self.variables)) * v)
            return flat(outer.gradient(dot, self.variables))

        @tf.function(input_signature=[tf.TensorSpec([self.num_params], tf.float32)])
        def hvp(v):
            total = tf.zeros_like(v)
            for i in tf.range(full):
                begin = i * batch_size
                total += batch_hvp(take(x_t, begin, batch_size), take(y_t, begin, batch_size), v)
            if rest:
                total += batch_hvp(x_t[full * batch_size :], y_t[full * batch_size :], v)
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    omega = tf.add_n(model.losses)
                dot = tf.reduce_sum(flat(inner.gradient(omega, self.variables)) * v)
            return total + flat(outer.gradient(dot, self.variables)) + damping * v

        self.example_gradient = example_gradient
        self.hvp = hvp

    def warm_up(self):
        """Traces both functions."""
        self.example_gradient(self.x[:1], self.y[:1]).numpy()
        self.hvp(np.zeros(self.num_params, np.float32)).numpy()

    def gradients(self, x, y):
        return np.stack(
            [self.example_gradient(x[j : j + 1], y[j : j + 1]).numpy() for j in range(len(x))]
        )

    def solve(self, rhs):
        import tensorflow as tf
        from scipy.sparse.linalg import LinearOperator, cg

        p = self.num_params
        operator = LinearOperator(
            (p, p),
            matvec=lambda v: self.hvp(tf.constant(np.asarray(v, np.float32).reshape(-1))).numpy(),
            dtype=np.float32,
        )
        columns = [
            cg(operator, column, rtol=CG_TOL, atol=0.0, maxiter=CG_MAX_ITER)[0] for column in rhs.T
        ]
        return np.stack(columns, axis=1)

    def explain(self, x_test, y_test):
        """Scores ``(m, n)``: ``-grad L(z_test) @ inv(H + damping*I) @ grad L(z_train)``."""
        with one_blas_thread():
            solutions = self.solve(self.gradients(x_test, y_test).T)
            out = np.empty((solutions.shape[1], len(self.x)), np.float32)
            for j in range(len(self.x)):
                gradient = self.example_gradient(self.x[j : j + 1], self.y[j : j + 1]).numpy()
                out[:, j] = -(solutions.T @ gradient)
        return out


def ours(model, data, first_test=0):
    """A fresh InfluenceModel: compile + fit + the first explain of 20 test points.

    Returns ``(scores, seconds, influence model)``.
    """
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    tests = slice(first_test, first_test + NUM_TESTS)
    start = time.perf_counter()
    im = tfi.InfluenceModel(model)
    im.compile(solver=tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER), damping=DAMPING)
    im.fit(x_train, y_train, batch_size=BATCH_SIZE, verbose=0)
    scores = im.explain(x_test[tests], y_test[tests], verbose=0)
    return scores, time.perf_counter() - start, im


# -- 1 and 2: one process ---------------------------------------------------------------
def in_process(rounds, weights_path):
    data = load_data()
    x_train, y_train, x_test, y_test = data
    model = build_model()
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=32, verbose=0)
    model.save_weights(weights_path)

    _, first_seconds, im = ours(model, data)
    start = time.perf_counter()
    im.explain(x_test[NUM_TESTS : 2 * NUM_TESTS], y_test[NUM_TESTS : 2 * NUM_TESTS], verbose=0)
    second_call = time.perf_counter() - start
    del im

    start = time.perf_counter()
    baseline = Baseline(model, x_train, y_train, BATCH_SIZE, DAMPING)
    baseline.warm_up()
    baseline_trace = time.perf_counter() - start
    from tf_influence.engine import HessianOperator

    times = {"ours": [], "ours_new": [], "ours_shared": [], "baseline": []}
    for round_ in range(rounds):
        scores, seconds, _ = ours(model, data)
        times["ours"].append(seconds)
        # Test points no InfluenceModel on this model explained before.
        _, seconds, _ = ours(model, data, first_test=(round_ + 2) * NUM_TESTS)
        times["ours_new"].append(seconds)
        # The same with HessianOperator.share_values: CG starts from the recycled
        # directions of the InfluenceModels before it (new test points again).
        HessianOperator.share_values = True
        try:
            if round_ == 0:
                ours(model, data)  # the first one with shared values only leaves them
            _, seconds, _ = ours(model, data, first_test=(round_ + 10) * NUM_TESTS)
        finally:
            HessianOperator.share_values = False
        times["ours_shared"].append(seconds)
        start = time.perf_counter()
        expected = baseline.explain(x_test[:NUM_TESTS], y_test[:NUM_TESTS])
        times["baseline"].append(time.perf_counter() - start)
    pearson = float(np.corrcoef(scores.ravel(), expected.ravel())[0, 1])
    error = float(np.max(np.abs(scores - expected)) / np.max(np.abs(expected)))
    return {
        "first": first_seconds,
        "second_call": second_call,
        "baseline_trace": baseline_trace,
        "ours": times["ours"],
        "ours_new": times["ours_new"],
        "ours_shared": times["ours_shared"],
        "baseline": times["baseline"],
        "pearson": pearson,
        "error": error,
    }


# -- 3: fresh processes -------------------------------------------------------------------
def child(kind, weights_path):
    """In a fresh process: import, build the model, load its weights, fit, explain."""
    start = time.perf_counter()
    if kind == "ours":
        import tf_influence  # noqa: F401
    else:
        import keras  # noqa: F401
        import scipy.sparse.linalg  # noqa: F401
        import tensorflow  # noqa: F401
    imported = time.perf_counter()
    data = load_data()
    model = build_model()
    model.load_weights(weights_path)
    ready = time.perf_counter()
    if kind == "ours":
        ours(model, data)
    else:
        x_train, y_train, x_test, y_test = data
        baseline = Baseline(model, x_train, y_train, BATCH_SIZE, DAMPING)
        baseline.explain(x_test[:NUM_TESTS], y_test[:NUM_TESTS])  # traces on the way
    end = time.perf_counter()
    print(
        json.dumps({"import": imported - start, "model": ready - imported, "answer": end - ready})
    )


def fresh_processes(rounds, weights_path):
    results = {"ours": [], "baseline": []}
    for _ in range(rounds):
        for kind in ("ours", "baseline"):
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.first_answer", "--child", kind, weights_path],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            results[kind].append(json.loads(output.stdout.strip().splitlines()[-1]))
    return results


# -- report ---------------------------------------------------------------------------------
def median(values):
    return float(np.median(values))


def report(same, fresh, rounds):
    command = f"{COMMAND} --rounds {rounds}"
    ours_s, base_s = median(same["ours"]), median(same["baseline"])
    print(f"Digits MLP, 26,506 parameters, {NUM_TESTS} test x 1,437 train, CG tol={CG_TOL:g}, ")
    print(f"damping={DAMPING:g}, B={BATCH_SIZE}; medians of {rounds} alternating rounds.\n")
    print("| measurement | ours | careful baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| second InfluenceModel on the same model: compile + fit + first explain | "
        f"{ours_s:.2f} s | {base_s:.2f} s (traced beforehand, {same['baseline_trace']:.2f} s) | "
        f"{base_s / ours_s:.1f}x faster | >= 5x |"
    )
    new_s = median(same["ours_new"])
    print(
        f"| the same, on {NUM_TESTS} test points no InfluenceModel explained before | "
        f"{new_s:.2f} s | {base_s:.2f} s | {base_s / new_s:.1f}x faster | |"
    )
    shared_s = median(same["ours_shared"])
    print(
        f"| the same, new test points, with `HessianOperator.share_values = True` (CG starts "
        f"from the directions earlier InfluenceModels kept) | {shared_s:.2f} s | {base_s:.2f} s "
        f"| {base_s / shared_s:.1f}x faster | |"
    )
    answer = {k: [r["answer"] + r["model"] for r in fresh[k]] for k in fresh}
    total = {k: [r["import"] + r["model"] + r["answer"] for r in fresh[k]] for k in fresh}
    imports = {k: median([r["import"] for r in fresh[k]]) for k in fresh}
    a_ours, a_base = median(answer["ours"]), median(answer["baseline"])
    t_ours, t_base = median(total["ours"]), median(total["baseline"])
    print(
        f"| fresh process, first answer after import (build + load weights + fit + explain, "
        f"tracing included) | {a_ours:.2f} s | {a_base:.2f} s | {a_base / a_ours:.1f}x faster "
        f"| >= 3x |"
    )
    print(
        f"| fresh process, first answer including import (import {imports['ours']:.1f} s / "
        f"{imports['baseline']:.1f} s) | {t_ours:.2f} s | {t_base:.2f} s | "
        f"{t_base / t_ours:.1f}x faster | |"
    )
    print(
        f"| for reference: first InfluenceModel in the process (traces) | {same['first']:.2f} s "
        f"| | | |"
    )
    print(
        f"| for reference: second explain on the same InfluenceModel (new test points) | "
        f"{same['second_call']:.2f} s | | | |"
    )
    print(
        f"| Pearson of the two {NUM_TESTS} x 1,437 score matrices | {same['pearson']:.6f} | "
        f"max abs diff / max abs = {same['error']:.1e} | | >= 0.99 |"
    )
    print(f"\nCommand: `{command}`")
    print("Per round, s:", json.dumps({"same process": same, "fresh": fresh}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per part")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1. Received: {args.rounds}")
    with tempfile.TemporaryDirectory() as folder:
        weights_path = os.path.join(folder, "mlp.weights.h5")
        same = in_process(args.rounds, weights_path)
        fresh = fresh_processes(args.rounds, weights_path)
    report(same, fresh, args.rounds)


if __name__ == "__main__":
    main()
