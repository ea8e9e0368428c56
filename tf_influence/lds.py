"""The linear datamodeling score (LDS): attribution judged against many retrainings.

Park et al. (2023, TRAK) judge an attribution method by how well it predicts what
training on a *subset* of the data does. Train models on ``num_subsets`` random
subsets ``S`` (each a ``fraction`` of the training set); for each test point,
take the Spearman correlation, across the subsets, between the output measured
on the retrained model and the output predicted by summing the attributions over
the subset. The LDS is its mean over test points.

In our sign convention (``scores[i, j] > 0``: up-weighting training example
``j`` raises test loss ``i``), training on ``S`` instead of on nothing gives
test loss ``i`` about ``constant + sum_{j in S} scores[i, j] / n``: that sum is
the prediction. Spearman is blind to the constant and to any positive scale, so
any method's ``(n_test, n_train)`` matrix in this convention can be scored,
TracIn's included.

Retraining is the expensive part, so ``store=`` keeps it on disk, resumable and
fingerprinted: several methods are scored against the same retrainings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence._files import atomic_write
from tf_influence._fingerprint import arrays_fingerprint, differing
from tf_influence.resume import describe_function

__all__ = ["LDSResult", "KerasTrainer", "keras_trainer", "lds"]

_FORMAT = "tf_influence.lds/1"
# Test points per forward pass when measuring a retrained model.
MEASURE_BATCH = 1024


class LDSResult(NamedTuple):
    """What ``lds`` measured.

    Attributes:
        score: the LDS, the mean of ``per_test`` over the test points where it is
            defined.
        per_test: ``(n_test,)`` Spearman correlation, across subsets, of ``actual``
            and ``predicted`` for each test point (NaN where the measured output
            did not vary across subsets).
        masks: ``(num_subsets, n_train)`` booleans, True for the examples a subset
            trained on.
        actual: ``(num_subsets, n_test)`` the output measured on the retrained
            models, averaged over the seeds of a subset.
        predicted: ``(num_subsets, n_test)`` the output the scores predict, up to a
            constant and a positive factor: ``masks @ scores.T / n_train`` (its
            negative for ``measure="margin"``, which falls as the loss rises).
        seconds: time this call spent retraining (0 when the store had every run).
        per_seed: ``(seeds_per_subset,)`` the LDS against the retrainings of each
            seed alone (the spread over seeds).
        seeds: ``(num_subsets, seeds_per_subset)`` the seeds ``train_fn`` received.
    """

    score: float
    per_test: np.ndarray
    masks: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    seconds: float
    per_seed: np.ndarray
    seeds: np.ndarray


# -- a ready train_fn -----------------------------------------------------------------------
class KerasTrainer:
    """``train_fn(x, y, seed)``: a fresh model from ``build_fn``, trained by ``model.fit``.

    Made by ``keras_trainer``, which documents it.
    """

    def __init__(
        self,
        build_fn: Callable[[], Any],
        epochs: int,
        batch_size: int | None,
        fit_kwargs: dict[str, Any],
    ) -> None:
        from tf_influence._validation import check_positive_int

        if not callable(build_fn):
            raise TypeError(
                "Argument `build_fn` must be a callable that builds and compiles a new "
                f"keras.Model. Received: build_fn={describe(build_fn)}"
            )
        self.build_fn = build_fn
        self.epochs = check_positive_int("epochs", epochs)
        self.batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        reserved = sorted({"x", "y", "epochs", "batch_size", "shuffle"} & set(fit_kwargs))
        if reserved:
            raise TypeError(
                f"keras_trainer sets {reserved} itself; pass epochs and batch_size as its "
                f"own arguments. Received: {', '.join(f'{k}=' for k in reserved)}."
            )
        self.fit_kwargs = dict(fit_kwargs)

    @property
    def fingerprint(self) -> str:
        """What the retrainings depend on: ``build_fn``'s code and the fit settings."""
        settings = {"epochs": self.epochs, "batch_size": self.batch_size, **self.fit_kwargs}
        text = json.dumps(settings, sort_keys=True, default=repr)
        return f"keras_trainer({describe_function(self.build_fn)}, {text})"

    def __call__(self, x: Any, y: Any, seed: int) -> Any:
        import keras

        keras.utils.set_random_seed(int(seed))
        model = self.build_fn()
        if not isinstance(model, keras.Model):
            raise TypeError(
                "Argument `build_fn` of keras_trainer must return a keras.Model. Received: "
                f"{describe(model)}"
            )
        if not getattr(model, "compiled", False):
            raise ValueError(
                "The model `build_fn` returned is not compiled. Call model.compile(optimizer=..., "
                "loss=...) inside build_fn, so that each retraining starts afresh."
            )
        fit_kwargs = {"verbose": 0, **self.fit_kwargs}
        model.fit(x, y, epochs=self.epochs, batch_size=self.batch_size, shuffle=True, **fit_kwargs)
        return model

    def __repr__(self) -> str:
        return f"KerasTrainer({self.fingerprint})"


def keras_trainer(
    build_fn: Callable[[], Any], epochs: int, batch_size: int | None = 32, **fit_kwargs: Any
) -> KerasTrainer:
    """A ``train_fn`` for ``lds``: a new model from ``build_fn``, trained with ``model.fit``.

    Each call seeds Keras (``keras.utils.set_random_seed(seed)``: the
    initialisation, the shuffling of every epoch and dropout), calls
    ``build_fn()`` for a freshly initialised, compiled model and trains it with
    ``model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True,
    verbose=0, **fit_kwargs)``. The same seed and subset give the same model.

    Args:
        build_fn: ``() -> keras.Model``, built and compiled (optimizer and loss).
        epochs: training epochs of every retraining.
        batch_size: ``model.fit``'s batch size.
        **fit_kwargs: further arguments of ``model.fit`` (e.g. ``class_weight``).

    Returns:
        A callable ``train_fn(x, y, seed) -> keras.Model``. Its ``fingerprint`` (the
        code of ``build_fn`` and these settings) identifies an ``lds`` store.

    Example:
        >>> def build():
        ...     model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        ...     model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ...     return model
        >>> train_fn = tfi.evaluation.keras_trainer(build, epochs=20, batch_size=64)
    """
    return KerasTrainer(build_fn, epochs, batch_size, fit_kwargs)


# -- inputs -----------------------------------------------------------------------------------
def _arrays(value: Any, name: str) -> Any:
    if isinstance(value, tf.data.Dataset):
        raise TypeError(
            f"Argument `{name}` must be arrays (numpy arrays, tensors, or a list or dict of "
            "them): lds trains on subsets of the examples. Received: a tf.data.Dataset. "
            "Convert it, e.g. with `np.concatenate([b for b in ds.as_numpy_iterator()])`."
        )
    return tf.nest.map_structure(np.asarray, value)


def _length(value: Any, name: str) -> int:
    lengths = {int(np.shape(leaf)[0]) for leaf in tf.nest.flatten(value) if np.ndim(leaf) > 0}
    if len(lengths) != 1:
        raise ValueError(
            f"Argument `{name}` must hold arrays with one leading example axis of one length. "
            f"Received lengths {sorted(lengths)}."
        )
    return lengths.pop()


def _describe_loss(loss: Any) -> str | None:
    if loss is None:
        return None
    if isinstance(loss, str):
        return loss
    get_config = getattr(loss, "get_config", None)
    if callable(get_config) and not isinstance(loss, type):
        try:
            config = json.dumps(get_config(), sort_keys=True, default=repr)
        except Exception:  # noqa: BLE001 - a loss without a serialisable config
            config = ""
        return f"{type(loss).__module__}.{type(loss).__qualname__}:{config}"
    return describe_function(loss)


def _train_fn_identity(train_fn: Callable) -> str:
    fingerprint = getattr(train_fn, "fingerprint", None)
    if isinstance(fingerprint, str):
        return fingerprint
    return describe_function(train_fn) or repr(type(train_fn))


# -- measuring a retrained model -----------------------------------------------------------
def _batches(x: Any, size: int):
    n = _length(x, "x_test")
    for start in range(0, n, size):
        rows = slice(start, start + size)
        yield tf.nest.map_structure(lambda a, rows=rows: a[rows], x), rows


def _measure_loss(model: Any, loss: Any, x: Any, y: Any) -> np.ndarray:
    from tf_influence.engine.objective import Objective

    if loss is None and getattr(model, "loss", None) is None:
        raise ValueError(
            'measure="loss" needs a loss: the model `train_fn` returned is not compiled with '
            "one. Pass `loss=` to lds (a keras loss object, name or callable), or compile "
            "the model in train_fn."
        )
    objective = Objective(model, loss)
    values = []
    for batch, rows in _batches(x, MEASURE_BATCH):
        labels = tf.nest.map_structure(lambda a, rows=rows: a[rows], y)
        values.append(objective.per_example_loss(batch, labels).numpy())
    return np.concatenate(values).astype(np.float64)


def _measure_margin(model: Any, x: Any, y: Any) -> np.ndarray:
    margins = []
    for batch, rows in _batches(x, MEASURE_BATCH):
        logits = model(batch, training=False)
        if not isinstance(logits, tf.Tensor) or logits.shape.rank != 2 or logits.shape[1] < 2:
            raise ValueError(
                'measure="margin" needs a model with one output of class scores, shape '
                f"(batch, classes >= 2). Received an output {describe(logits)}. Pass "
                'measure="loss" or a callable fn(model, x, y).'
            )
        logits = logits.numpy().astype(np.float64)
        labels = np.asarray(y[rows])
        if labels.ndim == 2 and labels.shape[1] == logits.shape[1]:
            labels = labels.argmax(axis=1)  # one-hot
        labels = labels.reshape(len(logits)).astype(np.int64)
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(
                f'measure="margin" needs class indices from 0 to {logits.shape[1] - 1} in '
                f"`y_test`. Received labels from {labels.min()} to {labels.max()}."
            )
        correct = logits[np.arange(len(labels)), labels]
        others = logits.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        margins.append(correct - others.max(axis=1))
    return np.concatenate(margins)


# -- the store ------------------------------------------------------------------------------
class _Store:
    """Masks, seeds and measurements of one LDS run, in memory and (with ``path``) on disk."""

    def __init__(self, path: str | None, masks, seeds, n_test: int, fingerprints: dict) -> None:
        self.path = path
        self.masks, self.seeds, self.fingerprints = masks, seeds, fingerprints
        self.measured = np.full(seeds.shape + (n_test,), np.nan)
        self.done = np.zeros(seeds.shape, bool)
        if path is not None and os.path.exists(path):
            self._reopen()

    def _reopen(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                stored = {key: saved[key] for key in saved.files}
            header = json.loads(str(stored["header"]))
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"Argument `store` names a file that is not a readable lds store "
                f"({self.path!r}: {error}). Delete it or choose another path."
            ) from error
        if header.get("format") != _FORMAT:
            raise ValueError(
                f"Argument `store` names a file that is not an lds store ({self.path!r}, "
                f"format {header.get('format')!r}). Delete it or choose another path."
            )
        differ = differing(header["fingerprints"], self.fingerprints)
        if differ:
            raise ValueError(
                f"Argument `store` holds retrainings ({self.path!r}, {int(stored['done'].sum())} "
                f"done) made with other settings than this call: {', '.join(differ)} differ. "
                "Its measurements do not belong to this data and these subsets. Call lds with "
                "the arguments the store was made with, or choose another `store` path (or "
                "delete the file to start again)."
            )
        self.measured, self.done = stored["measured"], stored["done"]

    def save(self) -> None:
        if self.path is None:
            return
        header = json.dumps({"format": _FORMAT, "fingerprints": self.fingerprints})
        arrays = {
            "header": np.array(header),
            "masks": self.masks,
            "seeds": self.seeds,
            "measured": self.measured,
            "done": self.done,
        }
        atomic_write(self.path, lambda handle: np.savez(handle, **arrays))


# -- lds ------------------------------------------------------------------------------------------
def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``."""
    from tf_influence.evaluation import _pearson, _ranks

    return np.array([_pearson(_ranks(a[:, i]), _ranks(b[:, i])) for i in range(a.shape[1])])


def _mean_defined(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def lds(
    scores: Any,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    train_fn: Callable[[Any, Any, int], Any],
    num_subsets: int = 100,
    fraction: float = 0.5,
    seeds_per_subset: int = 1,
    measure: str | Callable[[Any, Any, Any], Any] = "loss",
    seed: int = 0,
    store: str | os.PathLike | None = None,
    loss: Any = None,
    shared_init: bool = False,
    verbose: str | int = "auto",
) -> LDSResult:
    """The linear datamodeling score of an attribution matrix, against real retrainings.

    Draws ``num_subsets`` random subsets of ``round(fraction * n_train)`` training
    examples (seeded by ``seed``), trains ``seeds_per_subset`` models on each with
    ``train_fn`` and measures their output on the test points. For test point
    ``i`` the prediction of subset ``S`` is ``sum_{j in S} scores[i, j] / n_train``
    (test loss ``i`` after training on ``S`` is about a constant plus it); the LDS
    is the mean over test points of the Spearman correlation, across subsets, of
    the measured and the predicted outputs (Park et al. 2023).

    Args:
        scores: ``(n_test, n_train)`` attributions in our convention: ``scores[i, j]
            > 0`` when up-weighting training example ``j`` raises test loss ``i``
            (``im.explain``; any method's matrix in this sign, e.g. TracIn's).
        x_train: the training inputs as arrays (or lists / dicts of them), in the
            order of the columns of ``scores``.
        y_train: the training targets, in the same order.
        x_test: the test inputs, in the order of the rows of ``scores``.
        y_test: the test targets, in the same order.
        train_fn: ``fn(x_subset, y_subset, seed) -> keras.Model`` that trains a new
            model on the subset, e.g. ``keras_trainer(build_fn, epochs)``.
        num_subsets: how many random subsets (at least 2).
        fraction: the share of the training set in each subset, in (0, 1).
        seeds_per_subset: models trained per subset; their outputs are averaged.
        measure: the output measured on each test point: ``"loss"`` (the per-example
            loss: ``loss``, or the loss the returned model is compiled with),
            ``"margin"`` (the correct class's logit minus the largest other logit;
            compared with minus the prediction, as it falls when the loss rises), or
            ``fn(model, x_test, y_test) -> (n_test,)``, compared with the prediction
            as it is (return a quantity that rises with the loss, or score it with
            ``explain(target=...)``).
        seed: draws the subsets and the training seeds.
        store: a path ending in ``.npz`` that keeps the subsets and every measured
            output. It is rewritten atomically after each retraining: a run stopped by
            Ctrl-C, a kill or an error goes on where it stopped when called again, and
            other methods' ``scores`` are judged against the same retrainings at no
            cost. It is fingerprinted by the data, the subsets, the seeds, ``train_fn``
            (its ``fingerprint``, or its module, name and code), ``measure`` and
            ``loss``; a store made with other ones is refused.
        loss: the loss of ``measure="loss"`` (a keras loss object, name or callable
            ``(y_true, y_pred)``); None uses each retrained model's compiled loss.
        shared_init: False (the published protocol): every retraining gets its own
            seed. True: every subset is trained with the same seeds (one shared
            initialisation and data order per seed index), which removes the noise of
            the initialisation from the comparison and gives a higher LDS.
        verbose: "auto", 0, 1 (a progress bar over the retrainings) or 2.

    Returns:
        ``LDSResult(score, per_test, masks, actual, predicted, seconds, per_seed,
        seeds)``.

    Raises:
        ValueError: a ``scores`` matrix of the wrong shape, a ``fraction`` outside
            (0, 1), ``num_subsets < 2``, a store made with other data, or a
            retraining whose measured output is not finite.
        TypeError: ``train_fn`` returns something other than a ``keras.Model``.

    Example:
        >>> scores = im.explain(x_test, y_test)
        >>> result = tfi.evaluation.lds(
        ...     scores, x_train, y_train, x_test, y_test,
        ...     tfi.evaluation.keras_trainer(build, epochs=20), store="lds_runs.npz")
        >>> result.score
    """
    import keras

    from tf_influence._progress import Progress, resolve_verbose
    from tf_influence._validation import check_positive_int

    verbose = resolve_verbose(verbose)
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, (int, np.integer)):
        raise TypeError(
            f"Argument `num_subsets` must be an integer of at least 2. Received: "
            f"num_subsets={num_subsets!r}"
        )
    if num_subsets < 2:
        raise ValueError(
            "Argument `num_subsets` must be at least 2: a correlation across subsets needs "
            f"two of them (100 is usual). Received: num_subsets={num_subsets}"
        )
    seeds_per_subset = check_positive_int("seeds_per_subset", seeds_per_subset)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (float, int, np.floating, np.integer))
        or not 0.0 < float(fraction) < 1.0
    ):
        raise ValueError(
            "Argument `fraction` must be a number in (0, 1), the share of the training set "
            f"each subset keeps (0.5 is usual). Received: fraction={fraction!r}"
        )
    if not callable(train_fn):
        raise TypeError(
            "Argument `train_fn` must be a callable fn(x_subset, y_subset, seed) -> "
            f"keras.Model, e.g. tfi.evaluation.keras_trainer(build_fn, epochs). Received: "
            f"train_fn={describe(train_fn)}"
        )
    if not (measure in ("loss", "margin") or callable(measure)):
        raise ValueError(
            'Argument `measure` must be "loss", "margin" or a callable fn(model, x, y). '
            f"Received: measure={measure!r}"
        )
    if store is not None:
        store = os.fspath(store)
        if not store.endswith(".npz"):
            raise ValueError(
                f"Argument `store` must be a path ending in .npz. Received: store={store!r}"
            )
    x_train, y_train = _arrays(x_train, "x_train"), _arrays(y_train, "y_train")
    x_test, y_test = _arrays(x_test, "x_test"), _arrays(y_test, "y_test")
    n_train, n_test = _length(x_train, "x_train"), _length(x_test, "x_test")
    if _length(y_train, "y_train") != n_train or _length(y_test, "y_test") != n_test:
        raise ValueError(
            "Arguments `y_train` and `y_test` must have one target per example of `x_train` "
            f"and `x_test`. Received: {_length(y_train, 'y_train')} targets for {n_train} "
            f"training examples, {_length(y_test, 'y_test')} for {n_test} test points."
        )
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_test, n_train):
        raise ValueError(
            f"Argument `scores` must have shape (n_test, n_train) = ({n_test}, {n_train}), one "
            f"row per test point and one column per training example. Received: shape "
            f"{scores.shape}."
        )
    if not np.isfinite(scores).all():
        raise ValueError(
            "Argument `scores` has non-finite values; an LDS of them would mean nothing. "
            f"Received {int((~np.isfinite(scores)).sum())} NaN or inf entries."
        )
    size = int(round(float(fraction) * n_train))
    if not 1 <= size <= n_train - 1:
        raise ValueError(
            f"Argument `fraction` keeps {size} of the {n_train} training examples; a subset "
            f"must keep at least one and leave out at least one. Received: fraction={fraction}"
        )

    rng = np.random.default_rng([int(seed), 0])
    masks = np.zeros((num_subsets, n_train), bool)
    for row in masks:
        row[rng.choice(n_train, size, replace=False)] = True
    seed_rng = np.random.default_rng([int(seed), 1])
    if shared_init:
        seeds = np.tile(seed_rng.integers(0, 2**31 - 1, (1, seeds_per_subset)), (num_subsets, 1))
    else:
        seeds = seed_rng.integers(0, 2**31 - 1, (num_subsets, seeds_per_subset))
    measure_name = measure if isinstance(measure, str) else describe_function(measure)
    fingerprints = {
        "data": arrays_fingerprint(x_train, y_train, x_test, y_test),
        "masks": arrays_fingerprint(masks),
        "seeds": arrays_fingerprint(seeds),
        "train_fn": _train_fn_identity(train_fn),
        "measure": str(measure_name),
        "loss": str(_describe_loss(loss)),
    }
    runs = _Store(store, masks, seeds, n_test, fingerprints)

    todo = [(s, r) for s in range(num_subsets) for r in range(seeds_per_subset)]
    todo = [(s, r) for s, r in todo if not runs.done[s, r]]
    progress = Progress(len(todo), verbose, "LDS retraining")
    start = time.perf_counter()
    try:
        for step, (s, r) in enumerate(todo, start=1):
            keep = masks[s]
            model = train_fn(
                tf.nest.map_structure(lambda a, keep=keep: a[keep], x_train),
                tf.nest.map_structure(lambda a, keep=keep: a[keep], y_train),
                int(seeds[s, r]),
            )
            if not isinstance(model, keras.Model):
                raise TypeError(
                    "Argument `train_fn` must return the trained keras.Model. Received: "
                    f"{describe(model)} from train_fn={describe(train_fn)}"
                )
            if measure == "loss":
                values = _measure_loss(model, loss, x_test, y_test)
            elif measure == "margin":
                values = _measure_margin(model, x_test, y_test)
            else:
                values = np.asarray(measure(model, x_test, y_test), dtype=np.float64)
                if values.shape != (n_test,):
                    raise ValueError(
                        f"Argument `measure` must return one value per test point, shape "
                        f"({n_test},). Received: shape {values.shape} from "
                        f"measure={describe(measure)}"
                    )
            if not np.isfinite(values).all():
                raise ValueError(
                    f"The model `train_fn` trained on subset {s} (seed {int(seeds[s, r])}) "
                    f"gives a non-finite {measure_name} on {int((~np.isfinite(values)).sum())} "
                    "test points: the retraining diverged. Lower its learning rate or epochs; "
                    "the runs before it are kept in `store`."
                )
            runs.measured[s, r] = values
            runs.done[s, r] = True
            runs.save()
            del model
            progress.update(step)
    finally:
        progress.done()
    seconds = time.perf_counter() - start if todo else 0.0

    predicted = masks.astype(np.float64) @ scores.T / n_train
    if measure == "margin":
        predicted = -predicted
    actual = runs.measured.mean(axis=1)
    per_test = _spearman_columns(actual, predicted)
    per_seed = np.array(
        [
            _mean_defined(_spearman_columns(runs.measured[:, r], predicted))
            for r in range(seeds_per_subset)
        ]
    )
    return LDSResult(
        score=_mean_defined(per_test),
        per_test=per_test,
        masks=masks,
        actual=actual,
        predicted=predicted,
        seconds=seconds,
        per_seed=per_seed,
        seeds=seeds,
    )
