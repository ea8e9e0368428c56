"""Leave-one-out retraining on a convex model, to check influence scores against reality.

The model is L2-regularised binary logistic regression on scikit-learn's bundled
digits (no network), built as a float64 Keras model. Its training objective is
exactly the one of DESIGN.md,

    R(theta) = (1/n) * sum_j L(z_j, theta) + l2 * |w|^2        (bias not regularised)

with ``L`` the binary cross-entropy on logits. Training and every retraining
are done here, in closed form with NumPy (damped Newton to a gradient norm of
about 1e-13), independently of the package under test. Removing training point
``j`` minimises ``(1/n) * sum_{k != j} L(z_k) + l2 * |w|^2`` (the original ``n``,
which is what ``-scores[i, j] / n`` predicts), warm-started from ``theta_hat``.

Shared by ``tests/test_retraining.py`` and ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

# The experiment, fixed. Digits "3" against "8" (often confused), 70% train.
CLASSES = (3, 8)
TRAIN_FRACTION = 0.7
L2 = 2.0**-6  # exactly representable in float32: Keras rounds L2(l2) to float32.
NUM_TEST_POINTS = 3
NUM_TOP = 20
NUM_RANDOM = 20
SEED = 0
GRAD_TOL = 1e-13


# -- data ------------------------------------------------------------------------------
def load_data(classes=CLASSES, train_fraction=TRAIN_FRACTION, seed=SEED):
    """Standardised float64 digits of two classes: ``(x_train, y_train, x_test, y_test)``.

    ``y`` is 1.0 for ``classes[1]`` and 0.0 for ``classes[0]``, shape ``(n,)``.
    Features are standardised with the training mean and std (constant pixels
    are left at 0).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    x = digits.data[keep].astype(np.float64)
    y = (digits.target[keep] == classes[1]).astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_train = int(round(train_fraction * len(y)))
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


# -- closed-form logistic regression ------------------------------------------------------
def _design(x):
    return np.hstack([x, np.ones((len(x), 1))])


def per_example_loss(theta, x, y):
    """Binary cross-entropy on logits, ``softplus(z) - y z``, per example."""
    z = _design(x) @ theta
    return np.logaddexp(0.0, z) - y * z


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def objective(theta, x, y, l2, weights=None, n=None):
    """``R(theta) = (1/n) sum_j weights_j L_j + l2 |w|^2``, its gradient and Hessian.

    ``theta = [w (d,), b]``; ``weights`` default to ones and ``n`` to ``len(x)``.
    """
    n = len(x) if n is None else n
    c = np.ones(len(x)) if weights is None else weights
    a = _design(x)
    z = a @ theta
    p = _sigmoid(z)
    w = theta[:-1]
    value = np.sum(c * (np.logaddexp(0.0, z) - y * z)) / n + l2 * np.dot(w, w)
    reg_grad = np.append(2.0 * l2 * w, 0.0)
    grad = a.T @ (c * (p - y)) / n + reg_grad
    reg_hess = np.diag(np.append(np.full(len(w), 2.0 * l2), 0.0))
    hess = (a.T * (c * p * (1.0 - p))) @ a / n + reg_hess
    return value, grad, hess


def newton(x, y, l2, weights=None, n=None, theta0=None, tol=GRAD_TOL, max_iter=100):
    """Minimises ``objective`` by damped Newton; returns ``theta`` with ``|grad| <= tol``.

    Raises:
        RuntimeError: if the tolerance is not reached (the test then fails loudly
            instead of comparing against a poorly trained model).
    """
    theta = np.zeros(x.shape[1] + 1) if theta0 is None else np.array(theta0, dtype=np.float64)
    for _ in range(max_iter):
        value, grad, hess = objective(theta, x, y, l2, weights, n)
        if np.linalg.norm(grad) <= tol:
            return theta
        step = np.linalg.solve(hess, -grad)
        # Backtrack only on a clear increase: near the optimum the objective's changes
        # are below round-off and the full Newton step is always right.
        t = 1.0
        while t > 1e-6 and objective(theta + t * step, x, y, l2, weights, n)[0] > value + 1e-12 * abs(value):
            t *= 0.5
        theta = theta + t * step
    grad = objective(theta, x, y, l2, weights, n)[1]
    if np.linalg.norm(grad) > tol:
        raise RuntimeError(
            f"Newton did not reach |grad| <= {tol:g}; got {np.linalg.norm(grad):.3e}."
        )
    return theta


# -- the Keras model ----------------------------------------------------------------------
def make_model(theta, l2=L2):
    """A float64 ``keras.Sequential`` logistic regression holding ``theta``, compiled."""
    import keras

    num_features = len(theta) - 1
    model = keras.Sequential(
        [
            keras.Input((num_features,), dtype="float64"),
            keras.layers.Dense(1, dtype="float64", kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    dense = model.layers[0]
    dense.kernel.assign(theta[:-1, None])
    dense.bias.assign(theta[-1:])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def keras_objective(model, x, y):
    """``R`` and its gradient as Keras computes them (mean per-example loss + model.losses)."""
    import keras
    import tensorflow as tf

    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float64")
    with tf.GradientTape() as tape:
        per_example = loss(tf.constant(y[:, None]), model(tf.constant(x), training=False))
        total = tf.reduce_mean(per_example) + tf.add_n(model.losses)
    grads = tape.gradient(total, model.trainable_variables)
    flat = np.concatenate([g.numpy().ravel() for g in grads])
    return float(total), per_example.numpy(), flat


# -- the experiment ------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One solver's agreement between predicted and actual leave-one-out changes."""

    solver: str
    pearson: np.ndarray  # (num_test_points,)
    spearman: np.ndarray  # (num_test_points,)
    seconds: float  # wall time of InfluenceModel.compile + fit + explain
    removed: np.ndarray  # (num_test_points, NUM_TOP + NUM_RANDOM) training indices
    predicted: np.ndarray  # same shape: -scores / n
    actual: np.ndarray  # same shape: retrained test loss minus original
    scores: np.ndarray  # (num_test_points, n_train)


class Experiment:
    """Data, the trained model, the chosen test points and cached retrainings."""

    def __init__(self, l2=L2, seed=SEED, num_test_points=NUM_TEST_POINTS):
        self.l2 = l2
        self.seed = seed
        self.x_train, self.y_train, self.x_test, self.y_test = load_data(seed=seed)
        self.n = len(self.y_train)
        self.theta_hat = newton(self.x_train, self.y_train, l2)
        test_losses = per_example_loss(self.theta_hat, self.x_test, self.y_test)
        # The highest-loss test points: the ones influence is usually asked about.
        self.test_index = np.argsort(-test_losses, kind="stable")[:num_test_points]
        self.x_explain = self.x_test[self.test_index]
        self.y_explain = self.y_test[self.test_index]
        self.base_losses = test_losses[self.test_index]
        self._retrained: dict[int, np.ndarray] = {}
        self.retrain_seconds = 0.0

    def model(self):
        return make_model(self.theta_hat, self.l2)

    def retrained(self, j: int) -> np.ndarray:
        """``theta`` minimising the objective without training point ``j`` (cached)."""
        j = int(j)
        if j not in self._retrained:
            start = time.perf_counter()
            weights = np.ones(self.n)
            weights[j] = 0.0
            self._retrained[j] = newton(
                self.x_train, self.y_train, self.l2, weights, n=self.n, theta0=self.theta_hat
            )
            self.retrain_seconds += time.perf_counter() - start
        return self._retrained[j]

    def actual_change(self, j: int) -> np.ndarray:
        """Change of each explained test loss when point ``j`` is removed, shape ``(n_test,)``."""
        losses = per_example_loss(self.retrained(j), self.x_explain, self.y_explain)
        return losses - self.base_losses

    def chosen_points(self, scores_row: np.ndarray, row: int) -> np.ndarray:
        """The ``NUM_TOP`` largest ``|scores|`` and ``NUM_RANDOM`` other random points."""
        top = np.argsort(-np.abs(scores_row), kind="stable")[:NUM_TOP]
        # One fixed permutation per test point, whatever the solver: the random
        # points (hence the cached retrainings) are shared across solvers.
        permutation = np.random.default_rng([self.seed, row]).permutation(self.n)
        others = permutation[~np.isin(permutation, top)][:NUM_RANDOM]
        return np.concatenate([top, others])

    def evaluate(self, solver, name=None) -> Result:
        """Runs ``InfluenceModel`` with ``solver`` and compares with retraining."""
        from scipy import stats

        import tf_influence as tfi

        model = self.model()
        start = time.perf_counter()
        im = tfi.InfluenceModel(model)
        im.compile(solver=solver, damping=0.0)
        im.fit(self.x_train, self.y_train[:, None], verbose=0)
        scores = im.explain(self.x_explain, self.y_explain[:, None], verbose=0)
        seconds = time.perf_counter() - start
        if scores.shape != (len(self.test_index), self.n):
            raise AssertionError(f"scores of shape {scores.shape}")
        removed = np.stack([self.chosen_points(scores[i], i) for i in range(len(scores))])
        predicted = -np.take_along_axis(scores, removed, axis=1) / self.n
        actual = np.stack(
            [
                np.array([self.actual_change(j)[i] for j in removed[i]])
                for i in range(len(scores))
            ]
        )
        pearson = np.array([stats.pearsonr(p, a)[0] for p, a in zip(predicted, actual)])
        spearman = np.array([stats.spearmanr(p, a)[0] for p, a in zip(predicted, actual)])
        return Result(
            solver=name or type(solver).__name__,
            pearson=pearson,
            spearman=spearman,
            seconds=seconds,
            removed=removed,
            predicted=predicted,
            actual=actual,
            scores=scores,
        )


def solvers():
    """The solvers checked, by name (fresh instances each call)."""
    import tf_influence as tfi

    return {
        "Exact": tfi.solvers.Exact(),
        "CG": tfi.solvers.CG(tol=1e-10),
        "LiSSA": tfi.solvers.LiSSA(recursion_depth=1000, num_repeats=4, batch_size=64, seed=0),
    }
