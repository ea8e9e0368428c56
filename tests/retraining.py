"""Leave-one-out retraining on a convex model, to check influence scores against reality.

The model is L2-regularised binary logistic regression on scikit-learn's bundled
digits ("3" against "8", no network), built as a float64 Keras model. Its
training objective is exactly the one of DESIGN.md,

    R(theta) = (1/n) * sum_j L(z_j, theta) + l2 * |w|^2        (bias not regularised)

with ``L`` the binary cross-entropy on logits. Training and every retraining
are done here in closed form with NumPy (Newton's method, to a gradient norm
below 1e-13), independently of the package under test. Removing training point
``j`` minimises ``(1/n) * sum_{k != j} L(z_k) + l2 * |w|^2`` (the original
``n``: that is what ``-scores[i, j] / n`` predicts), warm-started from
``theta_hat``.

For each of the highest-loss test points, the 20 training points with the
largest ``|scores|`` and 20 other random ones are removed one at a time; the
actual change of that test loss is compared with ``-scores / n``.

Shared by ``tests/test_retraining.py`` and ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

CLASSES = (3, 8)  # digits 3 (label 0) and 8 (label 1): 357 images, 250 for training
TRAIN_FRACTION = 0.7
# Keras's L2 regulariser rounds its factor to float32 even for float64 weights, so
# the factor is a power of two: the NumPy and Keras objectives are then identical.
L2 = 2.0**-6
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
    stay at 0).
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


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def per_example_loss(theta, x, y):
    """Binary cross-entropy on logits, ``softplus(z) - y z``, per example."""
    z = _design(x) @ theta
    return np.logaddexp(0.0, z) - y * z


def per_example_grad(theta, x, y):
    """``grad L(z_j, theta)`` for each example, shape ``(len(x), d + 1)``."""
    a = _design(x)
    return a * (_sigmoid(a @ theta) - y)[:, None]


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
    grad = a.T @ (c * (p - y)) / n + np.append(2.0 * l2 * w, 0.0)
    hess = (a.T * (c * p * (1.0 - p))) @ a / n + np.diag(np.append(np.full(len(w), 2.0 * l2), 0.0))
    return value, grad, hess


def newton(x, y, l2, weights=None, n=None, theta0=None, tol=GRAD_TOL, max_iter=50):
    """Minimises ``objective`` by Newton's method; returns ``theta`` with ``|grad| <= tol``.

    Raises:
        RuntimeError: the tolerance was not reached (better than comparing against
            a poorly trained model).
    """
    theta = np.zeros(x.shape[1] + 1) if theta0 is None else np.array(theta0, dtype=np.float64)
    for _ in range(max_iter):
        value, grad, hess = objective(theta, x, y, l2, weights, n)
        if np.linalg.norm(grad) <= tol:
            return theta
        step = np.linalg.solve(hess, -grad)
        # Backtrack only on a clear increase: close to the optimum, changes of the
        # objective are below round-off and the full Newton step is right.
        t = 1.0
        while t > 1e-6:
            new_value = objective(theta + t * step, x, y, l2, weights, n)[0]
            if new_value <= value + 1e-12 * abs(value):
                break
            t *= 0.5
        theta = theta + t * step
    norm = np.linalg.norm(objective(theta, x, y, l2, weights, n)[1])
    if norm > tol:
        raise RuntimeError(f"Newton did not reach |grad| <= {tol:g}; got {norm:.3e}.")
    return theta


# -- the Keras model ----------------------------------------------------------------------
def make_model(theta, l2=L2):
    """A compiled float64 ``keras.Sequential`` logistic regression holding ``theta``."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((len(theta) - 1,), dtype="float64"),
            keras.layers.Dense(1, dtype="float64", kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    dense = model.layers[0]
    dense.kernel.assign(theta[:-1, None])
    dense.bias.assign(theta[-1:])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def keras_objective(model, x, y):
    """Per-example losses and ``grad R`` as Keras computes them: ``(losses, flat_grad)``."""
    import keras
    import tensorflow as tf

    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float64")
    with tf.GradientTape() as tape:
        per_example = loss(tf.constant(y[:, None]), model(tf.constant(x), training=False))
        total = tf.reduce_mean(per_example) + tf.add_n(model.losses)
    grads = tape.gradient(total, model.trainable_variables)
    return per_example.numpy(), np.concatenate([g.numpy().ravel() for g in grads])


# -- the experiment ------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One solver's agreement between predicted and actual leave-one-out changes.

    Arrays of shape ``(num_test_points, NUM_TOP + NUM_RANDOM)`` hold, per test
    point, the removed training indices (the top ones first), the predicted
    change ``-scores / n`` and the actual change of the test loss.
    """

    solver: str
    pearson: np.ndarray  # (num_test_points,)
    spearman: np.ndarray  # (num_test_points,)
    slope: np.ndarray  # (num_test_points,) least-squares slope of actual on predicted
    score_error: np.ndarray  # (num_test_points,) |scores - closed form| / |closed form|
    fit_seconds: float  # InfluenceModel.compile + fit
    explain_seconds: float  # InfluenceModel.explain
    converged: bool  # the solver's own diagnostics
    unconverged_warnings: list[str]
    removed: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
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
        # The highest-loss test points: the ones whose influences are large.
        self.test_index = np.argsort(-test_losses, kind="stable")[:num_test_points]
        self.x_explain = self.x_test[self.test_index]
        self.y_explain = self.y_test[self.test_index]
        self.base_losses = test_losses[self.test_index]
        self._retrained: dict[int, np.ndarray] = {}
        self.retrain_seconds = 0.0

    @property
    def num_retrained(self) -> int:
        return len(self._retrained)

    def closed_form_scores(self) -> np.ndarray:
        """``-grad L(z_test_i)^T inv(H) grad L(z_j)`` from the NumPy Hessian, ``(n_test, n)``."""
        _, _, hess = objective(self.theta_hat, self.x_train, self.y_train, self.l2)
        train = per_example_grad(self.theta_hat, self.x_train, self.y_train)
        test = per_example_grad(self.theta_hat, self.x_explain, self.y_explain)
        return -test @ np.linalg.solve(hess, train.T)

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
        """Change of every explained test loss when point ``j`` is removed, ``(n_test,)``."""
        losses = per_example_loss(self.retrained(j), self.x_explain, self.y_explain)
        return losses - self.base_losses

    def chosen_points(self, scores_row: np.ndarray, row: int) -> np.ndarray:
        """The ``NUM_TOP`` largest ``|scores|``, then ``NUM_RANDOM`` other random points."""
        top = np.argsort(-np.abs(scores_row), kind="stable")[:NUM_TOP]
        # One fixed permutation per test point, whatever the solver, so that the
        # random points (and their cached retrainings) are shared by all solvers.
        permutation = np.random.default_rng([self.seed, row]).permutation(self.n)
        others = permutation[~np.isin(permutation, top)][:NUM_RANDOM]
        return np.concatenate([top, others])

    def evaluate(self, solver, name=None) -> Result:
        """Runs ``InfluenceModel`` with ``solver`` (damping 0) and compares with retraining."""
        from scipy import stats

        import tf_influence as tfi

        model = self.model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            start = time.perf_counter()
            im = tfi.InfluenceModel(model)
            im.compile(solver=solver, damping=0.0)
            im.fit(self.x_train, self.y_train[:, None], verbose=0)
            middle = time.perf_counter()
            scores = im.explain(self.x_explain, self.y_explain[:, None], verbose=0)
            end = time.perf_counter()
        expected_shape = (len(self.test_index), self.n)
        if scores.shape != expected_shape:
            raise AssertionError(f"explain returned shape {scores.shape}, not {expected_shape}")
        exact = self.closed_form_scores()
        removed = np.stack([self.chosen_points(row, i) for i, row in enumerate(scores)])
        predicted = -np.take_along_axis(scores, removed, axis=1) / self.n
        actual = np.stack(
            [[self.actual_change(j)[i] for j in removed[i]] for i in range(len(scores))]
        )
        pairs = list(zip(predicted, actual, strict=True))
        return Result(
            solver=name or type(solver).__name__,
            pearson=np.array([stats.pearsonr(p, a)[0] for p, a in pairs]),
            spearman=np.array([stats.spearmanr(p, a)[0] for p, a in pairs]),
            slope=np.sum(predicted * actual, axis=1) / np.sum(predicted**2, axis=1),
            score_error=np.linalg.norm(scores - exact, axis=1) / np.linalg.norm(exact, axis=1),
            fit_seconds=middle - start,
            explain_seconds=end - middle,
            converged=bool(im.diagnostics is not None and im.diagnostics.all_converged),
            unconverged_warnings=[
                str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
            ],
            removed=removed,
            predicted=predicted,
            actual=actual,
            scores=scores,
        )


# Per solver: (Pearson, Spearman) that every test point must reach. Exact and CG
# from the project issue; LiSSA is allowed 0.02 less, being stochastic.
THRESHOLDS = {"Exact": (0.95, 0.97), "CG": (0.95, 0.97), "LiSSA": (0.93, 0.95)}
# Per solver: largest relative error of a test point's scores against the NumPy
# closed form (LiSSA measured 0.03-0.05 over seeds 0-5 with the configuration below).
SCORE_TOLERANCES = {"Exact": 1e-8, "CG": 1e-7, "LiSSA": 0.1}


def make_solver(name):
    """A fresh solver by name, configured for this experiment.

    LiSSA: the Hessian's eigenvalues lie in [0.023, 0.35]; with the automatic scale
    (1.5x the largest eigenvalue seen on a few batches) 200 steps leave a negligible
    bias, and 16 repeats on batches of 256 (drawn with replacement) bring the noise to
    3-5% of the solution (relative residual <= 0.051 over seeds 0-5, against LiSSA's
    own tolerance of 0.1).
    """
    import tf_influence as tfi

    if name == "Exact":
        return tfi.solvers.Exact()
    if name == "CG":
        return tfi.solvers.CG(tol=1e-10)
    if name == "LiSSA":
        return tfi.solvers.LiSSA(recursion_depth=200, num_repeats=16, batch_size=256, seed=0)
    raise ValueError(f"Unknown solver {name!r}")
