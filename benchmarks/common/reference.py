"""A careful straightforward influence implementation, independent of tf_influence.

Rows 1-3 compare tf_influence with it in the same process.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common.timing import one_blas_thread


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
