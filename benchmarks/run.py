"""Speed and memory of tf_influence, measured side by side in one run.

Prints one markdown table; every line says the command that made it. Rows:

1. Hessian-vector product over the training set / gradient of the mean loss over
   the same batches (both compiled ``tf.function``s), for ``hvp="reverse_over_reverse"``
   and ``hvp="forward_over_reverse"``, with 1 and 20 vectors per product.
2. ``explain`` of 20 test points against every training point (CG) versus a careful
   straightforward implementation in the same process: per-example gradients in a
   Python loop, a nested-tape HVP ``tf.function``, ``scipy.sparse.linalg.cg`` with
   numpy round trips, one solve per test point. Time ratio and Pearson correlation,
   for the first call (tracing included), a second call on new test points (which
   starts from the search directions CG kept from the first), calls 5-8, the same
   second call with ``CG(recycle=0)``, and both sides at a looser tolerance.
3. Scoring every training point against the solved vectors (``scoring="jvp"``,
   ``"jacobian"`` with its factored Dense/Conv2D layers, and ``"jacobian"`` by pfor
   alone) versus a Python loop over per-example gradients; each runs the loop
   ``explain`` runs after solving.
4. Time and peak memory of ``explain`` as the training set grows 1x -> 10x -> 50x
   (noisy copies of the digits), each size in its own subprocess.

Models (float32, fixed seeds, trained with Adam on scikit-learn's 8x8 digits,
standardised, ``train_test_split(test_size=0.2, random_state=0)``, 1437 training
points): ``mlp`` 64 -> 128 tanh -> 128 tanh -> 10 logits and ``cnn`` Conv2D(16, 3,
relu) -> Conv2D(32, 3, relu) -> Flatten -> Dense(10), both with L2(1e-4) on kernels.

Usage, from the repository root::

    .venv/bin/python benchmarks/run.py                # full run (7-11 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick        # reduced run (1-2.5 min)
    .venv/bin/python benchmarks/run.py --rows 1,3 --models mlp

Timings are medians over interleaved repeats (the compared functions alternate, so
a change of machine load hits both), after a warm-up call that traces them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SEED = 0
L2 = 1e-4
EPOCHS = 30
NUM_TESTS = 20
# Damping per model, so that CG converges on the trained model: the MLP needs ~20
# iterations at 1e-2 (tol 1e-5). On the relu CNN, CG with 1e-2 meets negative curvature
# (p^T (H + 1e-2 I) p / p^T p = -1.1e-3); 2e-2 / 3e-2 / 5e-2 need 94 / 44 / 28 iterations.
DAMPING = {"mlp": 1e-2, "cnn": 5e-2}
CG_TOL = 1e-5  # relative residual, same for our CG and SciPy's (float32 reaches it)
CG_MAX_ITER = 1000
LOOSE_TOL = 1e-3  # row 2 also compares both sides at this looser tolerance
WIDE_BATCH = 512  # row 1 also measures one vector at this batch size
TOP_K = 10
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")
SCORING_MODES = ("jvp", "jacobian")
PFOR_ONLY = "jacobian, pfor only"
SCORING_LABELS = {
    "jvp": 'scoring="jvp"',
    "jacobian": 'scoring="jacobian" (factored Dense/Conv2D)',
    PFOR_ONLY: 'scoring="jacobian", pfor only (factoring off)',
}
SCORING_KS = (1, 8, NUM_TESTS, 64)  # solved vectors per scoring pass, jvp vs jacobian

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data and models ------------------------------------------------------------------
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


def inputs(name, x):
    """The model's view of the 64 standardised pixels: flat for the MLP, 8x8x1 for the CNN."""
    return x if name == "mlp" else x.reshape(-1, 8, 8, 1)


def build_model(name):
    import keras

    keras.utils.set_random_seed(SEED)
    reg = keras.regularizers.L2(L2)
    if name == "mlp":
        layers = [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(10, kernel_regularizer=reg),
        ]
    elif name == "cnn":
        layers = [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", kernel_regularizer=reg),
            keras.layers.Conv2D(32, 3, activation="relu", kernel_regularizer=reg),
            keras.layers.Flatten(),
            keras.layers.Dense(10, kernel_regularizer=reg),
        ]
    else:
        raise ValueError(f"unknown model {name!r}")
    model = keras.Sequential(layers, name=name)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(name, data, epochs):
    x_train, y_train, x_test, y_test = data
    model = build_model(name)
    model.fit(inputs(name, x_train), y_train, epochs=epochs, batch_size=32, verbose=0)
    accuracy = model.evaluate(inputs(name, x_test), y_test, verbose=0)[1]
    return model, float(accuracy)


# -- timing helpers -----------------------------------------------------------------
def _run(fn):
    out = fn()
    # Materialise the result, so that time is not hidden in an asynchronous op.
    for leaf in out if isinstance(out, (list, tuple)) else [out]:
        if hasattr(leaf, "numpy"):
            leaf.numpy()
    return out


def timed(fn):
    start = time.perf_counter()
    _run(fn)
    return time.perf_counter() - start


def timed_loop(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        _run(fn)
    return (time.perf_counter() - start) / calls


def compare(fns, repeats, sample_seconds=0.05):
    """Warm-up (trace) then interleaved repeats; returns ``{name: (first, median)}`` seconds.

    A fast function is called several times per sample (at least ``sample_seconds``
    per sample), so that timer and scheduling noise do not dominate it.
    """
    first = {name: timed(fn) for name, fn in fns.items()}
    calls = {name: max(1, int(np.ceil(sample_seconds / timed(fn)))) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_loop(fn, calls[name]))
    return {name: (first[name], float(np.median(times[name]))) for name in fns}


def fmt_time(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def peak_rss_mb():
    """Peak resident set size of this process so far, MiB.

    ``VmHWM`` from /proc where there is one: ``getrusage(RUSAGE_SELF).ru_maxrss`` of a
    child process is at least the parent's RSS at the time of the fork (Linux keeps
    the pre-``exec`` high-water mark), which would hide the child's own peak.
    """
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the table ------------------------------------------------------------------------
class Table:
    HEADER = (
        "| row | measurement | model | setting | measured | baseline | ratio | goal | met "
        "| command |"
    )

    def __init__(self):
        self.lines = []

    def add(self, row, what, model, setting, ours, reference, ratio, goal, met, command):
        met_text = "" if met is None else ("yes" if met else "**no**")
        cells = [str(row), what, model, setting, ours, reference, ratio, goal, met_text]
        self.lines.append("| " + " | ".join(cells) + f" | `{command}` |")
        log("  " + self.lines[-1])

    def render(self):
        separator = "|" + "|".join(["---"] * (self.HEADER.count("|") - 1)) + "|"
        return "\n".join([self.HEADER, separator, *self.lines])


# -- reference (straightforward) implementation ---------------------------------------
class Reference:
    """Careful straightforward influence, independent of tf_influence.

    * gradients: one ``tf.GradientTape`` per example inside a ``tf.function`` traced
      once for a batch of one, called from a Python loop;
    * Hessian-vector product: nested tapes in a ``tf.function`` that loops over the
      same batches as tf_influence (full batches in a ``tf.range`` loop, the rest after);
    * solves: ``scipy.sparse.linalg.cg`` on a ``LinearOperator`` with numpy round trips,
      one solve per test point;
    * numpy's BLAS is held to one thread while it runs (``one_blas_thread``): on a
      2-core machine OpenBLAS's spinning threads otherwise fight TensorFlow's, and the
      per-example loop gets 3x (idle machine) to 10x (loaded machine) slower.
    """

    def __init__(self, model, x, y, batch_size, damping):
        import keras
        import tensorflow as tf

        self.model = model
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.variables = list(model.trainable_variables)
        self.num_params = int(sum(int(np.prod(v.shape)) for v in self.variables))
        self.damping = damping
        self.x, self.y = x, y
        x_t, y_t = tf.constant(x), tf.constant(y)
        n = len(x)
        full, rest = divmod(n, batch_size)

        def flat(tensors):
            """One vector; variables without a gradient (biases in Omega) count as zeros."""
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
        """Traces both functions, so that the timed run measures work, not tracing."""
        self.example_gradient(self.x[:1], self.y[:1]).numpy()
        self.hvp(np.zeros(self.num_params, np.float32)).numpy()

    def gradients(self, x, y):
        return np.stack(
            [self.example_gradient(x[j : j + 1], y[j : j + 1]).numpy() for j in range(len(x))]
        )

    def solve(self, rhs, tol, max_iter):
        """One ``scipy.sparse.linalg.cg`` per column of ``rhs``; returns (solutions, iterations)."""
        import tensorflow as tf
        from scipy.sparse.linalg import LinearOperator, cg

        p = self.num_params
        operator = LinearOperator(
            (p, p),
            matvec=lambda v: self.hvp(tf.constant(np.asarray(v, np.float32).reshape(-1))).numpy(),
            dtype=np.float32,
        )
        solutions, iterations = [], []
        for column in rhs.T:
            count = [0]
            solution, info = cg(
                operator,
                column,
                rtol=tol,
                atol=0.0,
                maxiter=max_iter,
                callback=lambda _x, count=count: count.__setitem__(0, count[0] + 1),
            )
            solutions.append(solution)
            iterations.append(count[0])
        return np.stack(solutions, axis=1), iterations

    def scores(self, solutions):
        """``-grad L(z_j) . solutions[:, i]`` for every training example, a Python loop."""
        out = np.empty((solutions.shape[1], len(self.x)), np.float32)
        for j in range(len(self.x)):
            gradient = self.example_gradient(self.x[j : j + 1], self.y[j : j + 1]).numpy()
            out[:, j] = -(solutions.T @ gradient)
        return out

    def explain(self, x_test, y_test, tol, max_iter):
        """Scores ``(m, n)``, CG iterations per test point, seconds solving and scoring."""
        with one_blas_thread():
            start = time.perf_counter()
            tests = self.gradients(x_test, y_test)  # (m, p)
            solutions, iterations = self.solve(tests.T, tol, max_iter)
            middle = time.perf_counter()
            scores = self.scores(solutions)
            end = time.perf_counter()
        return scores, iterations, middle - start, end - middle


def one_blas_thread():
    """A context in which numpy's BLAS uses one thread (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# -- benchmark --------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.batch_size = args.batch_size
        self.repeats = args.repeats or (3 if self.quick else 7)
        self.table = Table()
        self.data = None
        self.models = {}
        self.accuracy = {}
        self.start_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def command(self, row):
        parts = [".venv/bin/python benchmarks/run.py", f"--rows {row}"]
        if self.quick:
            parts.append("--quick")
        if self.args.models_given:
            parts.append(f"--models {','.join(self.args.models)}")
        if self.batch_size != 128:
            parts.append(f"--batch-size {self.batch_size}")
        if self.args.repeats:
            parts.append(f"--repeats {self.args.repeats}")
        if self.args.scale_given and row == 4:
            parts.append(f"--scale {','.join(str(f) for f in self.args.scale)}")
        return " ".join(parts)

    def setup(self):
        self.data = load_data()
        for name in self.args.models:
            start = time.perf_counter()
            model, accuracy = train_model(name, self.data, self.args.epochs)
            self.models[name] = model
            self.accuracy[name] = accuracy
            log(
                f"trained {name}: {model.count_params()} parameters, test accuracy "
                f"{accuracy:.4f}, {time.perf_counter() - start:.1f} s"
            )

    def train_xy(self, name):
        return inputs(name, self.data[0]), self.data[1]

    def test_xy(self, name, start, stop):
        return inputs(name, self.data[2][start:stop]), self.data[3][start:stop]

    def influence_model(self, name, batch_size=None, **compile_args):
        import tf_influence as tfi

        im = tfi.InfluenceModel(self.models[name])
        settings = {"solver": tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER)}
        settings.update(compile_args)
        im.compile(damping=DAMPING[name], **settings)
        x, y = self.train_xy(name)
        im.fit(x, y, batch_size=batch_size or self.batch_size, verbose=0)
        return im

    # -- row 1 --------------------------------------------------------------------------
    def gradient_pass(self, im, name):
        """Gradient of the mean loss + Omega over the training set, same batches as the HVP."""
        import tensorflow as tf

        objective = im.objective
        variables = objective.variables
        layout = objective.layout
        x, y = self.train_xy(name)
        x_t, y_t = tf.constant(x), tf.constant(y)
        n, size = len(x), im._data.batch_size
        full, rest = divmod(n, size)

        def take(t, start, count):
            begin = [start] + [0] * (len(t.shape) - 1)
            return tf.slice(t, begin, [count] + list(t.shape[1:]))

        def batch_gradient(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(objective.per_example_loss(xb, yb)) / n
            return layout.flatten(tape.gradient(loss, variables))

        @tf.function
        def gradient():
            total = tf.zeros([layout.num_params], objective.dtype)
            for i in tf.range(full):
                total += batch_gradient(take(x_t, i * size, size), take(y_t, i * size, size))
            if rest:
                total += batch_gradient(x_t[full * size :], y_t[full * size :])
            with tf.GradientTape() as tape:
                omega = objective.regularization()
            return total + layout.flatten(tape.gradient(omega, variables), objective.dtype)

        return gradient

    def row1(self):
        import tensorflow as tf

        command = self.command(1)
        for name in self.args.models:
            log(f"row 1: HVP / gradient, {name}")
            x, y = self.train_xy(name)
            operators = {}
            for mode in HVP_MODES:
                operators[mode] = self.influence_model(name, hvp=mode).operator
            gradient = self.gradient_pass(self.influence_model(name), name)
            reference = Reference(self.models[name], x, y, self.batch_size, DAMPING[name])
            p = operators[HVP_MODES[0]].num_params
            rng = np.random.default_rng(SEED)
            v1 = tf.constant(rng.normal(size=p).astype(np.float32))
            v20 = tf.constant(rng.normal(size=(p, NUM_TESTS)).astype(np.float32))
            fns = {"gradient": gradient, ("reference", 1): lambda r=reference, v=v1: r.hvp(v)}
            for mode, op in operators.items():
                fns[(mode, 1)] = lambda op=op, v=v1: op.matvec(v)
            one = compare(fns, self.repeats)
            fns = {"gradient": gradient}
            for mode, op in operators.items():
                fns[(mode, NUM_TESTS)] = lambda op=op, v=v20: op.matvec(v)
            many = compare(fns, self.repeats)
            base = {1: one["gradient"][1], NUM_TESTS: many["gradient"][1]}
            setting = f"B={self.batch_size}, damping={DAMPING[name]:g}"
            lines = [(mode, 1, one) for mode in HVP_MODES]
            lines.append(("reference", 1, one))
            lines += [(mode, NUM_TESTS, many) for mode in HVP_MODES]
            for mode, k, results in lines:
                seconds = results[(mode, k)][1]
                per_column = seconds / k
                ratio = per_column / base[k]
                if k == 1:
                    what = "HVP / gradient time, 1 vector"
                    measured = fmt_time(seconds)
                else:
                    what = f"HVP / gradient time per column, {k} vectors"
                    measured = f"{fmt_time(per_column)}/col ({fmt_time(seconds)})"
                if mode == "reference":
                    label = "straightforward nested tapes, static shape (p,) (row 2's reference)"
                else:
                    label = f'`op.matvec`, hvp="{mode}"'
                self.table.add(
                    1,
                    what,
                    name,
                    f"{label}, {setting}",
                    measured,
                    f"gradient {fmt_time(base[k])}",
                    f"{ratio:.2f}",
                    "<= 2.5",
                    ratio <= 2.5,
                    command,
                )
            trace = {mode: one[(mode, 1)][0] for mode in HVP_MODES}
            self.table.add(
                1,
                "first matvec (tracing) time, reverse_over_reverse vs forward_over_reverse",
                name,
                setting,
                fmt_time(trace["reverse_over_reverse"]),
                fmt_time(trace["forward_over_reverse"]),
                f"{trace['reverse_over_reverse'] / trace['forward_over_reverse']:.2f}",
                "",
                None,
                command,
            )
            self.row1_wide_batch(name, command)

    def row1_wide_batch(self, name, command):
        """One vector at a wider batch: a product has ~3x a gradient's ops per batch,
        so on small models fewer, larger batches move the ratio toward its arithmetic."""
        import tensorflow as tf

        size = min(WIDE_BATCH, len(self.train_xy(name)[0]))
        if size == self.batch_size:
            return
        im = self.influence_model(name, batch_size=size)
        operator = im.operator
        rng = np.random.default_rng(SEED)
        v1 = tf.constant(rng.normal(size=operator.num_params).astype(np.float32))
        results = compare(
            {"gradient": self.gradient_pass(im, name), "hvp": lambda: operator.matvec(v1)},
            self.repeats,
        )
        gradient, product = results["gradient"][1], results["hvp"][1]
        ratio = product / gradient
        self.table.add(
            1,
            "HVP / gradient time, 1 vector",
            name,
            f'`op.matvec`, hvp="{HVP_MODES[0]}", B={size}, damping={DAMPING[name]:g}',
            fmt_time(product),
            f"gradient {fmt_time(gradient)}",
            f"{ratio:.2f}",
            "<= 2.5",
            ratio <= 2.5,
            command,
        )

    # -- row 2 --------------------------------------------------------------------------
    def row2(self):
        import tf_influence as tfi

        command = self.command(2)
        for name in self.row23_models():
            log(f"row 2: explain vs straightforward, {name}")
            x, y = self.train_xy(name)
            first_x, first_y = self.test_xy(name, 0, NUM_TESTS)
            new_x, new_y = self.test_xy(name, NUM_TESTS, 2 * NUM_TESTS)
            damping = DAMPING[name]

            reference = Reference(self.models[name], x, y, self.batch_size, damping)
            reference.warm_up()
            start = time.perf_counter()
            expected, iterations, solving, scoring = reference.explain(
                first_x, first_y, CG_TOL, CG_MAX_ITER
            )
            reference_seconds = time.perf_counter() - start
            log(f"  reference: {reference_seconds:.1f} s, CG iterations {iterations}")

            start = time.perf_counter()
            im = tfi.InfluenceModel(self.models[name])
            im.compile(solver=tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER), damping=damping)
            im.fit(x, y, batch_size=self.batch_size, verbose=0)
            scores = im.explain(first_x, first_y, verbose=0)
            cold = time.perf_counter() - start
            cold_iterations = im.diagnostics.iterations
            start = time.perf_counter()
            new_scores = im.explain(new_x, new_y, verbose=0)
            times = [time.perf_counter() - start]
            warm_iterations = im.diagnostics.iterations
            recycled = im.diagnostics.info.get("recycled_directions", 0)
            times += self.later_calls(im, name)
            warm = float(np.median(times))
            # Calls 5-8: the recycled space has grown (recycle="auto" keeps more
            # directions where products cost more per parameter, as on the CNN).
            steady = float(np.median(self.later_calls(im, name, count=4, first_set=4)))
            steady_iterations = im.diagnostics.iterations
            steady_recycled = im.diagnostics.info.get("recycled_directions", 0)
            # The second call starts from directions the first one kept (CG's
            # recycling): check its scores against the reference too.
            new_expected, _, _, _ = reference.explain(new_x, new_y, CG_TOL, CG_MAX_ITER)
            # The same second call with every solve on its own (no recycled directions).
            _, alone_seconds, alone_iterations = self.second_calls(
                name, tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER, recycle=0)
            )
            agreement = []
            for ours, theirs in ((scores, expected), (new_scores, new_expected)):
                pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
                error = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
                agreement.append((pearson, error))

            setting = (
                f"{NUM_TESTS} test x {len(x)} train, CG tol={CG_TOL:g}, damping={damping:g}, "
                f"B={self.batch_size}"
            )
            reference_text = (
                f"{reference_seconds:.1f} s ({NUM_TESTS} SciPy solves of "
                f"{min(iterations)}-{max(iterations)} it. {solving:.1f} s, gradient loop "
                f"{scoring:.1f} s)"
            )
            speedup = reference_seconds / cold
            self.table.add(
                2,
                "explain time, first call (compile+fit+explain, incl. tracing)",
                name,
                setting,
                f"{cold:.1f} s ({cold_iterations} it.)",
                reference_text,
                f"{speedup:.1f}x faster",
                ">= 10x",
                speedup >= 10,
                command,
            )
            speedup = reference_seconds / warm
            self.table.add(
                2,
                "explain time, second call on 20 new test points (median of 3 such calls)",
                name,
                setting,
                f"{warm:.2f} s ({warm_iterations} it., {recycled} recycled directions)",
                reference_text,
                f"{speedup:.1f}x faster",
                ">= 10x",
                speedup >= 10,
                command,
            )
            speedup = reference_seconds / steady
            self.table.add(
                2,
                "explain time, calls 5-8 on 20 new test points each (median)",
                name,
                setting,
                f"{steady:.2f} s ({steady_iterations} it. in call 8, {steady_recycled} recycled "
                "directions)",
                reference_text,
                f"{speedup:.1f}x faster",
                ">= 10x",
                speedup >= 10,
                command,
            )
            speedup = reference_seconds / alone_seconds
            self.table.add(
                2,
                "explain time, second call on 20 new test points, CG(recycle=0) (median of 3)",
                name,
                setting,
                f"{alone_seconds:.2f} s ({alone_iterations} it.)",
                reference_text,
                f"{speedup:.1f}x faster",
                ">= 10x",
                speedup >= 10,
                command,
            )
            self.row2_loose(name, reference, reference_seconds, new_expected, setting, command)
            for call, (pearson, error) in zip(("first", "second"), agreement, strict=True):
                self.table.add(
                    2,
                    f"Pearson of the two {NUM_TESTS} x {len(x)} score matrices, {call} call",
                    name,
                    setting,
                    f"{pearson:.6f}",
                    f"max abs diff / max abs = {error:.1e}",
                    "",
                    ">= 0.99",
                    pearson >= 0.99,
                    command,
                )

    def row2_loose(self, name, reference, tight_seconds, tight_expected, setting, command):
        """Row 2's second calls with both sides at ``LOOSE_TOL``; Pearson against the tight
        reference. Shows whether a looser tolerance changes the ratio."""
        import tf_influence as tfi

        new_x, new_y = self.test_xy(name, NUM_TESTS, 2 * NUM_TESTS)
        start = time.perf_counter()
        loose_expected, iterations, _, _ = reference.explain(new_x, new_y, LOOSE_TOL, CG_MAX_ITER)
        reference_seconds = time.perf_counter() - start
        scores, seconds, ours_iterations = self.second_calls(
            name, tfi.solvers.CG(tol=LOOSE_TOL, max_iter=CG_MAX_ITER)
        )
        ours_pearson = float(np.corrcoef(scores.ravel(), tight_expected.ravel())[0, 1])
        reference_pearson = float(np.corrcoef(loose_expected.ravel(), tight_expected.ravel())[0, 1])
        self.table.add(
            2,
            f"second call, both sides at CG tol={LOOSE_TOL:g} (median of 3); Pearson vs the "
            f"reference at tol={CG_TOL:g}",
            name,
            setting.replace(f"tol={CG_TOL:g}", f"tol={LOOSE_TOL:g}"),
            f"{seconds:.2f} s ({ours_iterations} it.), Pearson {ours_pearson:.6f}",
            f"{reference_seconds:.1f} s ({min(iterations)}-{max(iterations)} it.), Pearson "
            f"{reference_pearson:.6f}",
            f"{reference_seconds / seconds:.1f}x faster",
            ">= 10x",
            reference_seconds / seconds >= 10,
            command,
        )
        self.table.add(
            2,
            f"ours at tol={LOOSE_TOL:g} (second call above) vs the reference at tol={CG_TOL:g}",
            name,
            setting,
            f"{seconds:.2f} s, Pearson {ours_pearson:.6f}",
            f"{tight_seconds:.1f} s",
            f"{tight_seconds / seconds:.1f}x faster",
            "(not equal tolerances)",
            None,
            command,
        )

    def second_calls(self, name, solver):
        """A fresh model with ``solver`` explains the first 20 test points; then its second
        call and two later ones are timed. Returns the second call's scores, the median
        seconds of the three calls and the second call's iterations."""
        import tf_influence as tfi

        x, y = self.train_xy(name)
        im = tfi.InfluenceModel(self.models[name])
        im.compile(solver=solver, damping=DAMPING[name])
        im.fit(x, y, batch_size=self.batch_size, verbose=0)
        im.explain(*self.test_xy(name, 0, NUM_TESTS), verbose=0)
        start = time.perf_counter()
        scores = im.explain(*self.test_xy(name, NUM_TESTS, 2 * NUM_TESTS), verbose=0)
        times = [time.perf_counter() - start]
        iterations = im.diagnostics.iterations
        return scores, float(np.median(times + self.later_calls(im, name))), iterations

    def later_calls(self, im, name, count=2, first_set=2):
        """Seconds of ``explain`` on ``count`` more sets of 20 new test points."""
        times = []
        for j in range(first_set, first_set + count):
            x_new, y_new = self.test_xy(name, j * NUM_TESTS, (j + 1) * NUM_TESTS)
            start = time.perf_counter()
            im.explain(x_new, y_new, verbose=0)
            times.append(time.perf_counter() - start)
        return times

    def row23_models(self):
        # The CNN's straightforward reference takes minutes; --quick keeps the MLP only.
        return [m for m in self.args.models if not (self.quick and m == "cnn")]

    # -- row 3 --------------------------------------------------------------------------
    def row3(self):
        import tensorflow as tf

        command = self.command(3)
        for name in self.row23_models():
            log(f"row 3: scoring vs Python loop, {name}")
            x, y = self.train_xy(name)
            test_x, test_y = self.test_xy(name, 0, NUM_TESTS)
            im = self.influence_model(name)
            solutions = im.inverse_hvp_tests(test_x, test_y, verbose=0)  # (p, 20)
            scorers = {}
            for mode in SCORING_MODES:
                im.compile(solver=im.solver, damping=DAMPING[name], hvp=im.hvp, scoring=mode)
                scorers[mode] = im._gradients
            # The same per-example gradients by pfor alone, without the factored layers.
            im.compile(solver=im.solver, damping=DAMPING[name], hvp=im.hvp, scoring="jacobian")
            scorers[PFOR_ONLY] = im._gradients
            scorers[PFOR_ONLY]._factored_state = "off"

            def score_all(scorer, vectors, im=im):
                # The loop `explain` runs after solving: as many batches per pass as the
                # scorer takes, one numpy block per pass.
                im._gradients = scorer
                rows = im._rows_per_pass(int(vectors.shape[1]))
                blocks = [block for _, block, _ in im._training_blocks(vectors, 0, rows)]
                return np.concatenate(blocks, axis=1)

            # 64 columns: the 20 solutions and 44 random vectors (time does not depend on
            # the values), to see where the jvp / jacobian crossover lies.
            extra = np.random.default_rng(SEED).normal(size=(im.num_params, 44))
            wide = tf.concat([solutions, tf.constant(extra, solutions.dtype)], axis=1)
            results = {}
            for k in SCORING_KS:
                vectors = tf.constant(wide[:, :k])
                fns = {
                    mode: (lambda s=scorer, v=vectors: score_all(s, v))
                    for mode, scorer in scorers.items()
                }
                results[k] = compare(fns, self.repeats)

            reference = Reference(self.models[name], x, y, self.batch_size, DAMPING[name])
            reference.warm_up()
            solutions_np = solutions.numpy()
            with one_blas_thread():
                start = time.perf_counter()
                expected = reference.scores(solutions_np)
                loop_seconds = time.perf_counter() - start
            error = max(
                float(np.max(np.abs(score_all(scorer, solutions) - expected)))
                for scorer in scorers.values()
            ) / float(np.max(np.abs(expected)))

            setting = f"{len(x)} train x {NUM_TESTS} solved vectors, B={self.batch_size}"
            for mode in (*SCORING_MODES, PFOR_ONLY):
                seconds = results[NUM_TESTS][mode][1]
                speedup = loop_seconds / seconds
                self.table.add(
                    3,
                    "score all training points",
                    name,
                    f"{SCORING_LABELS[mode]}, {setting}",
                    fmt_time(seconds),
                    f"Python loop {fmt_time(loop_seconds)} (max rel. diff {error:.0e})",
                    f"{speedup:.0f}x faster",
                    ">= 50x",
                    speedup >= 50,
                    command,
                )
            for k in SCORING_KS:
                jvp, jacobian = results[k]["jvp"][1], results[k]["jacobian"][1]
                pfor = results[k][PFOR_ONLY][1]
                self.table.add(
                    3,
                    "scoring time jvp / jacobian (pfor only / jacobian)",
                    name,
                    f"{k} solved vector{'s' if k > 1 else ''}, B={self.batch_size}",
                    f"jvp {fmt_time(jvp)}, pfor only {fmt_time(pfor)}",
                    f"jacobian {fmt_time(jacobian)}",
                    f"{jvp / jacobian:.2f} ({pfor / jacobian:.2f})",
                    "(< 1: jvp faster)",
                    None,
                    command,
                )

    # -- row 4 --------------------------------------------------------------------------
    def row4(self):
        command = self.command(4)
        name = "mlp"
        if name not in self.models:
            log("row 4 needs the mlp model (--models mlp); skipped")
            return
        factors = self.args.scale
        iterations = 5 if self.quick else 10
        runs = [("top_k", factor) for factor in factors]
        if not self.quick:
            runs.append(("dense", factors[-1]))
        results = {}
        with tempfile.TemporaryDirectory() as directory:
            weights = os.path.join(directory, "mlp.weights.h5")
            self.models[name].save_weights(weights)
            for variant, factor in runs:
                log(f"row 4: {variant} output, {factor}x training set (subprocess)")
                spec = {
                    "weights": weights,
                    "factor": factor,
                    "variant": variant,
                    "iterations": iterations,
                    "batch_size": self.batch_size,
                }
                output = subprocess.run(
                    [sys.executable, HERE, "--child", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    check=False,
                    cwd=ROOT,
                )
                lines = [s for s in output.stdout.splitlines() if s.startswith("{")]
                if output.returncode != 0 or not lines:
                    raise RuntimeError(
                        f"child {spec} failed:\n{output.stdout}\n{output.stderr[-3000:]}"
                    )
                results[(variant, factor)] = json.loads(lines[-1])
                log(f"  {results[(variant, factor)]}")
        n = len(self.data[0])
        base = results[("top_k", factors[0])]
        for variant, factor in runs:
            result = results[(variant, factor)]
            output_text = f"top_k={TOP_K}" if variant == "top_k" else "dense (20, n) output"
            setting = (
                f"{output_text}, {factor}x = {factor * n} train, CG {iterations} it. fixed, "
                f"B={self.batch_size}"
            )
            if variant == "top_k":
                reference, ideal = base, factor / factors[0]
                what = f"explain time vs {factors[0]}x (top_k={TOP_K})"
            else:
                reference, ideal = results[("top_k", factor)], 1
                what = f"explain time, dense output vs top_k={TOP_K}, same size"
            ratio = result["seconds"] / reference["seconds"]
            self.table.add(
                4,
                what,
                name,
                setting,
                f"{result['seconds']:.2f} s",
                f"{reference['seconds']:.2f} s",
                f"{ratio:.1f}",
                f"ideal {ideal:g}",
                None,
                command,
            )
        for variant, factor in runs:
            result = results[(variant, factor)]
            output_text = f"top_k={TOP_K}" if variant == "top_k" else "dense output"
            reference = base if variant == "top_k" else results[("top_k", factor)]
            total = result["peak_total"] - result["rss_data"]
            reference_total = reference["peak_total"] - reference["rss_data"]
            if result["peak_explain"] is not None:
                explain = result["peak_explain"] - result["rss_before_explain"]
                reference_explain = reference["peak_explain"] - reference["rss_before_explain"]
                measured = f"explain +{explain:.0f} MiB; fit+trace+explain +{total:.0f} MiB"
                baseline = f"+{reference_explain:.0f}; +{reference_total:.0f} MiB"
                ratio = f"{explain - reference_explain:+.0f}; {total - reference_total:+.0f} MiB"
            else:
                measured = f"fit+trace+explain +{total:.0f} MiB"
                baseline = f"+{reference_total:.0f} MiB"
                ratio = f"{total - reference_total:+.0f} MiB"
            vs = f"{factors[0]}x" if variant == "top_k" else f"top_k={TOP_K}"
            self.table.add(
                4,
                f"peak RSS growth vs {vs}",
                name,
                f"{output_text}, {factor}x = {factor * n} train (model+data resident "
                f"{result['rss_data']:.0f} MiB)",
                measured,
                baseline,
                ratio,
                "ideal +0 (flat)",
                None,
                command,
            )

    # -- driver ---------------------------------------------------------------------------
    def header(self):
        import keras
        import scipy
        import tensorflow as tf

        cpu = "unknown CPU"
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            cpu = platform.processor() or cpu
        lines = [
            f"# tf_influence benchmarks{' (--quick)' if self.quick else ''}",
            "",
            f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"* machine: {cpu}, {os.cpu_count()} cores, {platform.system()} "
            f"{platform.machine()}; 1-min load average at start {self.start_load:.2f}",
            f"* python {platform.python_version()}, tensorflow {tf.__version__}, keras "
            f"{keras.__version__}, numpy {np.__version__}, scipy {scipy.__version__}; "
            "float32, CPU only",
            "* models: "
            + ", ".join(
                f"{m} ({self.models[m].count_params()} params, test acc "
                f"{self.accuracy[m]:.3f}, damping {DAMPING[m]:g})"
                for m in self.args.models
            )
            + f"; L2 {L2:g} on kernels; Adam {self.args.epochs} epochs; 1437 training points",
            f"* batch size B={self.batch_size} for every pass over the training data; "
            f"timings: median of {self.repeats} interleaved repeats after a warm-up call",
            "",
        ]
        return "\n".join(lines)

    def run(self):
        start = time.perf_counter()
        self.setup()
        rows = {1: self.row1, 2: self.row2, 3: self.row3, 4: self.row4}
        for row in self.args.rows:
            rows[row]()
        print(self.header())
        print(self.table.render())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nTotal {time.perf_counter() - start:.0f} s; load average at the end {load:.2f}.")


# -- scaling child process -------------------------------------------------------------
def _status_mib(field):
    """``VmRSS`` / ``VmHWM`` of this process from /proc, MiB (None if unavailable)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mib("VmHWM") is not None
    except OSError:
        return False


def child(spec):
    """Row 4, one training-set size: time and peak memory of fit + explain.

    Memory: ``rss_data`` is the RSS once model and data are built (what a baseline
    child that does not explain would hold); the peak is then reset (Linux
    ``/proc/self/clear_refs``), so ``peak_total`` is the peak of fit + tracing +
    explain and ``peak_explain`` the peak of the timed ``explain`` alone. Without
    ``clear_refs`` it falls back to the peak at the end minus the peak before fit.
    """
    import tensorflow as tf

    import tf_influence as tfi

    warnings.simplefilter("ignore")
    x_train, y_train, x_test, y_test = load_data()
    factor = spec["factor"]
    rng = np.random.default_rng(SEED)
    copies = [x_train] + [
        (x_train + 0.05 * rng.standard_normal(x_train.shape)).astype(np.float32)
        for _ in range(factor - 1)
    ]
    x = np.concatenate(copies)
    y = np.tile(y_train, factor)
    del copies
    model = build_model("mlp")
    model.load_weights(spec["weights"])
    can_reset = _reset_peak()
    rss_data = _status_mib("VmRSS") if can_reset else peak_rss_mb()

    im = tfi.InfluenceModel(model)
    solver = tfi.solvers.CG(tol=1e-30, max_iter=spec["iterations"])
    im.compile(solver=solver, damping=DAMPING["mlp"])
    im.fit(x, y, batch_size=spec["batch_size"], verbose=0)
    # Trace everything explain runs, on the same operator, without doing its work: a zero
    # right-hand side stops CG before its first iteration.
    test_x, test_y = x_test[:NUM_TESTS], y_test[:NUM_TESTS]
    zeros = tf.zeros([im.num_params, NUM_TESTS], im.objective.dtype)
    im.solver.solve(im.operator, zeros)
    im._gradients(test_x, test_y).numpy()
    im._gradients.scores(x[: spec["batch_size"]], y[: spec["batch_size"]], zeros)[0].numpy()
    del zeros
    peak_setup = peak_rss_mb()
    rss_before = _status_mib("VmRSS")
    if can_reset:
        _reset_peak()

    top_k = TOP_K if spec["variant"] == "top_k" else None
    start = time.perf_counter()
    result = im.explain(test_x, test_y, verbose=0, top_k=top_k)
    seconds = time.perf_counter() - start
    peak_explain = peak_rss_mb()
    if im.diagnostics.iterations != spec["iterations"]:
        raise RuntimeError(f"CG ran {im.diagnostics.iterations} iterations: {im.diagnostics}")
    del result
    print(
        json.dumps(
            {
                "n_train": len(x),
                "seconds": seconds,
                "rss_data": rss_data,
                "rss_before_explain": rss_before,
                "peak_total": max(peak_setup, peak_explain),
                "peak_explain": peak_explain if can_reset else None,
            }
        ),
        flush=True,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (~3 min)")
    parser.add_argument("--rows", default="1,2,3,4", help="rows to run, e.g. 1,3")
    parser.add_argument("--models", default=None, help="mlp,cnn (default both)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument(
        "--scale", default=None, help="training-set multiples for row 4 (default 1,10,50)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = sorted({int(r) for r in args.rows.split(",") if r.strip()})
    if not set(args.rows) <= {1, 2, 3, 4}:
        parser.error(f"--rows takes numbers from 1 to 4. Received: {args.rows}")
    args.models_given = args.models is not None
    args.models = (args.models or "mlp,cnn").split(",")
    if not set(args.models) <= {"mlp", "cnn"}:
        parser.error(f"--models takes mlp and/or cnn. Received: {args.models}")
    args.scale_given = args.scale is not None
    default_scale = "1,5" if args.quick else "1,10,50"
    args.scale = [int(f) for f in (args.scale or default_scale).split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    Bench(args).run()


if __name__ == "__main__":
    main()
