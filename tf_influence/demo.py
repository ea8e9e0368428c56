"""End-to-end demo: which training digits made a Keras model predict this digit?

``python -m tf_influence demo`` (or ``make demo``) runs :func:`run_demo`:

1. trains an L2-regularised softmax regression on scikit-learn's 8x8 digits
   (shipped with scikit-learn, no download) with ``model.fit``, then polishes it
   to the exact optimum with a few Newton steps, because influence functions
   assume ``theta_hat`` minimises the training objective;
2. explains three test digits with ``tfi.InfluenceModel`` and conjugate
   gradients, printing the most helpful and most harmful training digits;
3. draws them in a PNG grid (one row per test digit);
4. checks the scores against real leave-one-out retraining: removing training
   example ``j`` should change the test loss by about ``-scores[i, j] / n``.

The model is convex (softmax regression with L2 on kernel and bias), so the
Hessian is positive definite and no damping is needed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

    from tf_influence.outputs import TopK

#: L2 strength of the Keras regularizers on kernel and bias (``l2 * sum(w**2)``).
L2 = 1e-2
#: Training examples removed one at a time in the leave-one-out check.
NUM_RETRAINED = 10
#: Helpful and harmful images shown per test digit in the picture.
NUM_SHOWN = 3


def load_data(seed: int = 0, test_size: float = 0.25) -> dict[str, np.ndarray]:
    """The 8x8 digits, split and standardised with the training mean and spread.

    Returns:
        dict with ``x_train`` ``(n_train, 64)`` and ``x_test`` (float64, standardised),
        ``y_train`` / ``y_test`` (int32 class indices), and ``images_train`` /
        ``images_test`` (the raw ``(n, 8, 8)`` images, for plotting).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(
        index, test_size=test_size, random_state=seed, stratify=digits.target
    )
    x = digits.data.astype("float64")
    mean = x[train].mean(axis=0)
    scale = x[train].std(axis=0)
    scale[scale == 0] = 1.0  # pixels that are always blank
    x = (x - mean) / scale
    y = digits.target.astype("int32")
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_test": x[test],
        "y_test": y[test],
        "images_train": digits.images[train],
        "images_test": digits.images[test],
    }


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Keras's float type set to float64 for the duration (restored afterwards).

    Keras 3 sums the compiled loss and the regularization losses in ``floatx()``,
    so ``fit`` on a float64 model with regularizers needs ``floatx() == "float64"``.
    """
    import keras

    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def build_model(
    num_inputs: int = 64, num_classes: int = 10, l2: float = L2, seed: int = 0
) -> keras.Model:
    """A float64 softmax regression on logits with L2 on kernel and bias (convex)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((num_inputs,), dtype="float64"),
            keras.layers.Dense(
                num_classes,
                dtype="float64",
                kernel_regularizer=keras.regularizers.L2(l2),
                bias_regularizer=keras.regularizers.L2(l2),
                name="logits",
            ),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
        metrics=["accuracy"],
    )
    return model


class NewtonRefiner:
    """Minimises ``sum_j w_j L(z_j) / sum_j w_j + sum(model.losses)`` with Newton steps.

    This is the objective ``model.fit`` minimises (all weights 1), or the same objective
    with some examples removed (their weights 0). The dense Hessian is formed, so it
    is meant for small models (a few thousand parameters at most). It uses the
    model's compiled loss and ``model.losses`` directly, independent of
    ``tf_influence``'s own objective, so that the leave-one-out check is a real check.

    Args:
        model: a built, compiled keras model (its weights are updated in place).
        x, y: the training inputs and targets.
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray):
        import tensorflow as tf

        self.model = model
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.num_params = int(sum(np.prod(s) for s in self.shapes))
        config = dict(model.loss.get_config())
        config["reduction"] = None
        per_example = type(model.loss).from_config(config)
        dtype = tf.as_dtype(self.variables[0].dtype)
        x = tf.constant(x, dtype)
        y = tf.constant(y)

        def objective(weights):
            losses = tf.cast(per_example(y, model(x, training=False)), dtype)
            total = tf.reduce_sum(weights * losses) / tf.reduce_sum(weights)
            for regularization in model.losses:  # Omega(theta), as model.fit adds it
                total += tf.cast(regularization, dtype)
            return total

        @tf.function
        def value_and_grad(weights):
            with tf.GradientTape() as tape:
                value = objective(weights)
            grads = tape.gradient(value, self.variables)
            return value, tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        @tf.function
        def hessian(weights):
            with tf.GradientTape() as outer:
                _, flat = value_and_grad(weights)
            jac = outer.jacobian(flat, self.variables)
            return tf.concat([tf.reshape(j, [self.num_params, -1]) for j in jac], 1)

        self._value_and_grad = value_and_grad
        self._hessian = hessian
        self._ones = np.ones(len(y), dtype=dtype.as_numpy_dtype)
        self._inverse = None  # inverse Hessian from the last refresh, reused while it works

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the current values of the trainable variables."""
        return [v.numpy().copy() for v in self.variables]

    def set_weights(self, values: Sequence[np.ndarray]) -> None:
        """Assigns values (as from ``get_weights``) to the trainable variables."""
        for variable, value in zip(self.variables, values, strict=True):
            variable.assign(value)

    def _unflatten(self, flat):
        parts, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            parts.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return parts

    def minimize(
        self, removed: Sequence[int] | np.ndarray = (), tol: float = 1e-11, max_steps: int = 50
    ) -> int:
        """Runs Newton steps until ``|grad| <= tol``; returns the number of steps.

        The inverse Hessian is kept from step to step (and from call to call) while
        each step cuts the gradient at least fourfold, and recomputed otherwise: a
        warm-started leave-one-out retraining then needs no new Hessian at all. A step
        is accepted when it lowers the objective, or, once the objective no longer
        changes beyond its rounding error, when it lowers the gradient norm.

        Args:
            removed: indices of training examples left out of the objective.
            tol: gradient norm at which to stop.
            max_steps: most Newton steps.
        """
        weights = self._ones.copy()
        weights[np.asarray(removed, dtype=int)] = 0.0
        value, grad = (t.numpy() for t in self._value_and_grad(weights))
        norm = np.linalg.norm(grad)
        for step in range(max_steps):
            if norm <= tol:
                return step
            if self._inverse is None:
                self._inverse = np.linalg.inv(self._hessian(weights).numpy())
            direction = self._unflatten(self._inverse @ grad)
            start, size = self.get_weights(), 1.0
            # Near the optimum the objective changes by less than its rounding error
            # (a change of about |grad|^2), so there the gradient norm decides.
            rounding = 64 * np.finfo(self._ones.dtype).eps * max(1.0, abs(float(value)))
            while True:  # backtracking: accept the first step that makes progress
                self.set_weights([w - size * d for w, d in zip(start, direction, strict=True)])
                new_value, new_grad = (t.numpy() for t in self._value_and_grad(weights))
                new_norm = np.linalg.norm(new_grad)
                progress = new_value <= value or (new_value <= value + rounding and new_norm < norm)
                if progress or size < 1e-6:
                    break
                size *= 0.5
            if new_norm > 0.25 * norm:
                self._inverse = None  # slow progress: refresh the curvature next step
            value, grad, norm = new_value, new_grad, new_norm
        return max_steps


def per_example_loss(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The model's compiled loss for each example, without reduction."""
    config = dict(model.loss.get_config())
    config["reduction"] = None
    loss = type(model.loss).from_config(config)
    return np.asarray(loss(y, model(x, training=False)), dtype="float64")


def leave_one_out(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    removed: Sequence[int] | np.ndarray,
    refiner: NewtonRefiner | None = None,
) -> np.ndarray:
    """Actual change in test loss when each training example is removed and the model retrained.

    Each retraining is warm-started at the current (optimal) weights and run to a
    gradient norm of 1e-11 with Newton steps; the weights are restored afterwards.

    Args:
        model: a trained keras model at the optimum of its training objective.
        x_train, y_train: its training data.
        x_test, y_test: test points whose loss is tracked.
        removed: training indices, removed one at a time.
        refiner: the ``NewtonRefiner`` of ``model`` on this training data, if one
            exists already (its inverse Hessian is reused); None makes one.

    Returns:
        ``np.ndarray`` of shape ``(len(x_test), len(removed))``:
        ``L(z_test_i, theta_without_j) - L(z_test_i, theta_hat)``. Influence predicts
        it as ``-scores[i, j] / n_train``.
    """
    refiner = refiner or NewtonRefiner(model, x_train, y_train)
    optimum = refiner.get_weights()
    base = per_example_loss(model, x_test, y_test)
    changes = np.empty((len(base), len(removed)))
    try:
        for column, j in enumerate(removed):
            refiner.minimize(removed=[int(j)])
            changes[:, column] = per_example_loss(model, x_test, y_test) - base
            refiner.set_weights(optimum)
    finally:
        refiner.set_weights(optimum)
    return changes


def choose_test_points(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """Three test digits worth explaining: a typical correct one (median loss), the least
    confident correct one, and the worst mistake (or the next least confident if none)."""
    losses = per_example_loss(model, x_test, y_test)
    predicted = np.argmax(np.asarray(model(x_test, training=False)), axis=1)
    correct = np.flatnonzero(predicted == y_test)
    wrong = np.flatnonzero(predicted != y_test)
    by_loss = correct[np.argsort(losses[correct], kind="stable")]
    confident = int(by_loss[len(by_loss) // 2])  # a typical, correctly classified digit
    unsure = int(by_loss[-1])
    worst = int(wrong[np.argmax(losses[wrong])]) if len(wrong) else int(by_loss[-2])
    return np.array([confident, unsure, worst])


def plot_grid(
    path: str | os.PathLike,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    test_predicted: np.ndarray,
    test_indices: Sequence[int],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    top: TopK,
    num_shown: int = NUM_SHOWN,
) -> str | os.PathLike:
    """Saves a PNG: one row per test digit, then its most helpful and most harmful
    training digits, each titled with its index, label and score."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend change.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(test_indices), 1 + 2 * num_shown
    fig = Figure(figsize=(1.55 * cols, 1.95 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        ax = axes[r, 0]
        ax.imshow(test_images[r], cmap="gray_r", vmin=0, vmax=16)
        colour = "black" if test_predicted[r] == test_labels[r] else "red"
        ax.set_title(
            f"TEST #{test_indices[r]}\nlabel {test_labels[r]}, pred {test_predicted[r]}",
            fontsize=8,
            color=colour,
            fontweight="bold",
        )
        for spine in ax.spines.values():
            spine.set_color(colour)
        for c in range(num_shown):
            for kind, offset, indices, scores, colour in (
                ("helpful", 1, top.helpful_indices, top.helpful_scores, "tab:green"),
                ("harmful", 1 + num_shown, top.harmful_indices, top.harmful_scores, "tab:red"),
            ):
                ax = axes[r, offset + c]
                j = int(indices[r, c])
                ax.imshow(train_images[j], cmap="gray_r", vmin=0, vmax=16)
                ax.set_title(
                    f"{kind} #{j}\nlabel {train_labels[j]}, {scores[r, c]:+.4g}",
                    fontsize=8,
                    color=colour,
                )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for k, ax in enumerate(axes.ravel()):
        is_test = k % cols == 0
        for spine in ax.spines.values():  # a frame around the test digits only
            spine.set_visible(is_test)
            spine.set_linewidth(2)
    fig.suptitle(
        "Which training digits made the model predict this?  "
        "(I_up,loss score: < 0 helpful, > 0 harmful)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_demo(
    output_dir: str | os.PathLike = "demo_output", seed: int = 0, verbose: int = 1
) -> dict[str, Any]:
    """Trains a digits classifier, explains three test digits, draws and checks them.

    Args:
        output_dir: folder for ``influence_digits.png`` (created if missing).
        seed: seed of the split and the weight initialisation.
        verbose: 0 silent, 1 prints the story (2 also shows the library's progress).

    Returns:
        dict with ``accuracy`` (test), ``n_train``, ``num_params``, ``test_indices``,
        ``top_k`` (the ``tfi.TopK`` of the explained digits, scores are ``I_up,loss``),
        ``removed`` (training indices retrained without), ``predicted_change``
        (``-scores / n_train``), ``actual_change`` (from retraining), ``pearson``,
        ``png`` (path of the picture) and ``seconds``.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()
    import tf_influence as tfi

    def say(*args):
        if verbose:
            print(*args, flush=True)

    lib_verbose = 1 if verbose >= 2 else 0

    # 1. Data and a Keras model, trained the usual way, then polished to the optimum.
    data = load_data(seed)
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    n_train = len(x_train)
    say(f"Training a softmax regression (L2={L2}) on {n_train} digits, {len(x_test)} held out ...")
    with float64():
        model = build_model(x_train.shape[1], 10, seed=seed)
        model.fit(x_train, y_train, batch_size=64, epochs=20, shuffle=True, verbose=0)
        refiner = NewtonRefiner(model, x_train, y_train)
        steps = refiner.minimize()
        accuracy = float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
    say(
        f"  Adam for 20 epochs, then {steps} Newton steps to the exact optimum; "
        f"test accuracy {accuracy:.3f}"
    )

    # 2. Influence: which training digits helped or hurt three test predictions?
    im = tfi.InfluenceModel(model)
    im.compile(solver="cg", damping=0.0)  # convex with L2: H is positive definite
    im.fit(x_train, y_train, batch_size=512, verbose=lib_verbose)
    test_indices = choose_test_points(model, x_test, y_test)
    x_explain, y_explain = x_test[test_indices], y_test[test_indices]
    predicted = np.argmax(np.asarray(model(x_explain, training=False)), axis=1)
    top = im.top_k(x_explain, y_explain, k=NUM_RETRAINED // 2, verbose=lib_verbose)
    say(
        f"\nInfluence of all {n_train} training digits on {len(test_indices)} test digits "
        f"({im.num_params} parameters, CG, {im.diagnostics.iterations} iterations)."
    )
    say("Score I_up,loss: > 0 harmful (up-weighting it raises the test loss), < 0 helpful.")
    for r, i in enumerate(test_indices):
        status = "correct" if predicted[r] == y_explain[r] else "WRONG"
        say(f"\nTest digit #{i}: label {y_explain[r]}, predicted {predicted[r]} ({status})")
        for kind, indices, values in (
            ("most helpful", top.helpful_indices[r], top.helpful_scores[r]),
            ("most harmful", top.harmful_indices[r], top.harmful_scores[r]),
        ):
            items = ", ".join(
                f"#{j} (label {y_train[j]}, {s:+.3f})"
                for j, s in zip(indices[:NUM_SHOWN], values[:NUM_SHOWN], strict=True)
            )
            say(f"  {kind}: {items}")

    # 3. The picture.
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "influence_digits.png"
    plot_grid(
        png,
        data["images_test"][test_indices],
        y_explain,
        predicted,
        test_indices,
        data["images_train"],
        y_train,
        top,
    )

    # 4. Leave-one-out check on the last test digit: retrain without each of its
    #    most helpful and most harmful training digits.
    row = len(test_indices) - 1
    removed = np.concatenate([top.helpful_indices[row], top.harmful_indices[row]])
    predicted_change = -np.concatenate([top.helpful_scores[row], top.harmful_scores[row]]) / n_train
    say(
        f"\nLeave-one-out check for test digit #{test_indices[row]}: retraining "
        f"{len(removed)} times, each without one of its most influential training digits ..."
    )
    actual_change = leave_one_out(
        model,
        x_train,
        y_train,
        x_explain[row : row + 1],
        y_explain[row : row + 1],
        removed,
        refiner=refiner,
    )[0]
    pearson = float(np.corrcoef(predicted_change, actual_change)[0, 1])
    say("  removed   predicted   actual   (change in test loss)")
    for j, p, a in zip(removed, predicted_change, actual_change, strict=True):
        say(f"  #{j:<6d} {p:+.2e}  {a:+.2e}")
    say(f"  Pearson correlation, predicted vs actual: {pearson:.4f}")

    seconds = time.perf_counter() - start
    say(f"\nPicture of the helpful and harmful training digits: {png.resolve()}")
    say(f"Done in {seconds:.1f} s.")
    return {
        "accuracy": accuracy,
        "n_train": n_train,
        "num_params": im.num_params,
        "test_indices": test_indices,
        "top_k": top,
        "removed": removed,
        "predicted_change": predicted_change,
        "actual_change": actual_change,
        "pearson": pearson,
        "png": str(png.resolve()),
        "seconds": seconds,
    }
