"""Examples in a fixed order: arrays, tensors or a batched ``tf.data.Dataset`` of ``(x, y)``.

Training data with sample or class weights holds ``(x, WeightedTargets(y, w))``:
every batch consumer passes the targets on to ``Objective.per_example_loss``,
which unpacks them, so the weights reach every product and gradient.

Column ``j`` of every score matrix is the ``j``-th example of the training
data, so the order is fixed here once and never shuffled (except by LiSSA's
explicitly seeded sampling stream, which does not affect column order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe, first_nonfinite_index
from tf_influence._validation import check_positive_int
from tf_influence.engine import weights as weights_lib
from tf_influence.engine.losses import WeightedTargets
from tf_influence.engine.targets import check_numeric_targets

DEFAULT_BATCH_SIZE = 32


def _is_dataset(x) -> bool:
    return isinstance(x, tf.data.Dataset)


def _to_numpy_tree(x, argument):
    def convert(leaf):
        if isinstance(leaf, (np.ndarray, tf.Tensor)) or hasattr(leaf, "__array__"):
            return np.asarray(leaf)
        if isinstance(leaf, (list, tuple)) and leaf and np.isscalar(leaf[0]):
            return np.asarray(leaf)
        raise TypeError(
            f"Argument `{argument}` must be a numpy array, a tensor, a list/dict of those, or "
            f"a tf.data.Dataset. Received: {argument}={describe(leaf)}"
        )

    if isinstance(x, dict):
        return {k: convert(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]) and hasattr(x[0], "shape"):
        # A tuple: tf.data reads a list as one tensor to stack, a tuple as a structure.
        return tuple(convert(v) for v in x)
    return convert(x)


def _digest_batch(digest, batch) -> None:
    for leaf in tf.nest.flatten(batch):
        array = np.ascontiguousarray(leaf.numpy() if hasattr(leaf, "numpy") else leaf)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())


class ExampleData:
    """A fixed-order set of examples ``(x, y)``, served in batches.

    Args:
        x: input arrays/tensors (a single array, or a list/dict for several inputs), or
            a batched ``tf.data.Dataset`` yielding ``(x, y)`` in a fixed order.
        y: targets, shape ``(n, ...)``; must be None when ``x`` is a dataset.
        batch_size: examples per batch (default 32, as Keras); must be None for a dataset.
        x_name: the inputs' argument name, used in error messages.
        y_name: the targets' argument name, used in error messages.
        require_y: whether targets are required.
        sample_weight: ``(n,)`` non-negative weights of the examples (training data
            only), or None.
        class_weight: ``{class index: weight}``, turned into sample weights as Keras
            does (training data with one output only), or None.

    Attributes:
        num_examples: n, the number of examples.
        class_weight: the checked ``class_weight`` dict, or None.
        weighted: whether the targets carry weights (``WeightedTargets``).
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        batch_size: int | None = None,
        x_name: str = "x",
        y_name: str = "y",
        require_y: bool = True,
        sample_weight: Any = None,
        class_weight: dict | None = None,
    ):
        self.x_name, self.y_name = x_name, y_name
        batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        if isinstance(y, WeightedTargets):  # a saved state's weighted targets
            y, sample_weight = y
        if sample_weight is not None and class_weight is not None:
            raise ValueError(
                "Arguments `sample_weight` and `class_weight` cannot both be given, as in "
                "keras.Model.fit. Received: both. Multiply the class weights into the "
                "sample weights instead."
            )
        self.class_weight = None
        if class_weight is not None:
            self.class_weight = weights_lib.check_class_weight(class_weight)
        if _is_dataset(x):
            self._init_dataset(x, y, batch_size, require_y, sample_weight)
        else:
            self._init_arrays(x, y, batch_size, require_y, sample_weight)
        self.weighted = require_y and isinstance(self._batched.element_spec[-1], WeightedTargets)

    # -- construction ---------------------------------------------------------------
    def _init_arrays(self, x, y, batch_size, require_y, sample_weight):
        if x is None:
            raise ValueError(f"Argument `{self.x_name}` is required. Received: {self.x_name}=None")
        x = _to_numpy_tree(x, self.x_name)
        leaves = tf.nest.flatten(x)
        lengths = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
        if None in lengths or len(lengths) != 1:
            raise ValueError(
                f"All inputs in `{self.x_name}` must have the same number of examples along "
                f"axis 0. Received shapes: {[leaf.shape for leaf in leaves]}"
            )
        n = lengths.pop()
        if n == 0:
            raise ValueError(
                f"Argument `{self.x_name}` is empty. Received: {self.x_name} with 0 examples. "
                "Pass at least one example."
            )
        for leaf in leaves:
            bad = first_nonfinite_index(leaf)
            if bad is not None:
                raise ValueError(
                    f"Argument `{self.x_name}` holds NaN or inf at example {bad}. Received: "
                    f"{self.x_name}[{bad}] not finite. Clean or drop that example first."
                )
        if y is None:
            if require_y:
                raise ValueError(
                    f"Argument `{self.y_name}` is required: influence is computed on the loss "
                    f"of each example. Received: {self.y_name}=None with {self.x_name} of "
                    f"{n} examples. Pass the training targets."
                )
        else:
            if _is_dataset(y):
                raise ValueError(
                    f"Argument `{self.y_name}` must be an array when `{self.x_name}` is an "
                    f"array. Received: {self.y_name}={describe(y)}. Pass a dataset of (x, y) "
                    f"as `{self.x_name}` instead."
                )
            y = _to_numpy_tree(y, self.y_name)
            y_leaves = tf.nest.flatten(y)
            for leaf in y_leaves:
                if leaf.ndim == 0 or leaf.shape[0] != n:
                    raise ValueError(
                        f"Arguments `{self.x_name}` and `{self.y_name}` must hold the same "
                        f"number of examples. Received: {self.x_name} with {n} examples and "
                        f"{self.y_name} of shape {leaf.shape}."
                    )
                bad = first_nonfinite_index(leaf)
                if bad is not None:
                    raise ValueError(
                        f"Argument `{self.y_name}` holds NaN or inf at example {bad}. "
                        f"Received: {self.y_name}[{bad}]={leaf[bad]!r}. Fix that label."
                    )
        weights = self._array_weights(y, n, sample_weight)
        if weights is not None:
            y = WeightedTargets(y, weights)
        self.num_examples = int(n)
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        elements = (x, y) if y is not None else (x,)
        # Kept as tensors (on the device) and sliced in the graph: much cheaper per
        # batch than iterating a tf.data pipeline inside a tf.function.
        self._tensors = tf.nest.map_structure(tf.convert_to_tensor, elements)
        self._digest = None  # computed when first asked for (content_key)
        self._unbatched = tf.data.Dataset.from_tensor_slices(elements)
        self._batched = self._unbatched.batch(self.batch_size)

    def _array_weights(self, y, n, sample_weight):
        """The ``(n,)`` weights of ``sample_weight`` or ``class_weight``, or None."""
        if sample_weight is None and self.class_weight is None:
            return None
        name = "sample_weight" if sample_weight is not None else "class_weight"
        if y is None:
            raise ValueError(
                f"Argument `{name}` weighs the training targets, so `{self.y_name}` is "
                f"required. Received: {self.y_name}=None. Pass the targets."
            )
        if sample_weight is not None:
            return weights_lib.check_sample_weight(sample_weight, n)
        weights_lib.reject_nested_targets(y)
        return weights_lib.class_weight_to_sample_weight(y, self.class_weight)

    def _init_dataset(self, dataset, y, batch_size, require_y, sample_weight=None):
        if y is not None:
            raise ValueError(
                f"Argument `{self.y_name}` must be None when `{self.x_name}` is a "
                f"tf.data.Dataset (the dataset yields (x, y)). Received: "
                f"{self.y_name}={describe(y)}"
            )
        if batch_size is not None:
            raise ValueError(
                f"Argument `batch_size` must be None when `{self.x_name}` is a tf.data.Dataset "
                f"(batch the dataset itself). Received: batch_size={batch_size}"
            )
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (1, 2, 3):
            if require_y:
                raise ValueError(
                    f"A dataset passed as `{self.x_name}` must yield tuples (x, y). Received a "
                    f"dataset with element_spec={spec}. Map it, e.g. `ds.map(lambda x: (x, y))`."
                )
            spec = (spec,)
            dataset = dataset.map(lambda *e: (e[0],) if len(e) == 1 else e)
        if sample_weight is not None:
            raise ValueError(
                f"Argument `sample_weight` must be None when `{self.x_name}` is a "
                "tf.data.Dataset: let the dataset yield (x, y, sample_weight). Received: "
                f"sample_weight={describe(sample_weight)}"
            )
        if len(spec) >= 2:
            check_numeric_targets(spec[1], self.y_name)
        if len(spec) == 3 and require_y:  # (x, y, sample_weight)
            if self.class_weight is not None:
                raise ValueError(
                    "Argument `class_weight` cannot be combined with a dataset that yields "
                    f"(x, y, sample_weight). Received: element_spec={spec}. Fold the class "
                    "weights into the sample weights."
                )
            dataset = dataset.map(lambda x, y, w: (x, WeightedTargets(y, tf.reshape(w, [-1]))))
        elif len(spec) == 3:  # test points are not weighted
            dataset = dataset.map(lambda x, y, w: (x, y))
        elif self.class_weight is not None and len(spec) == 2:
            weights_lib.reject_nested_targets(spec[1])
            weigh = weights_lib.class_weight_fn(self.class_weight)
            dataset = dataset.map(lambda x, y: (x, WeightedTargets(y, weigh(y))))
        if require_y and len(dataset.element_spec) < 2:
            raise ValueError(
                f"A dataset passed as `{self.x_name}` must yield tuples (x, y). Received: "
                f"element_spec={dataset.element_spec}"
            )
        n, first_batch = 0, None
        digest = hashlib.sha256()
        for batch in dataset:
            _digest_batch(digest, batch)
            size = int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
            if len(batch) > 1 and isinstance(batch[1], WeightedTargets):
                weights = batch[1].sample_weight.numpy()
                if weights.size != size:
                    raise ValueError(
                        f"The dataset passed as `{self.x_name}` yields sample weights of shape "
                        f"{tuple(weights.shape)} for a batch of {size} examples. Received: "
                        "(x, y, sample_weight) with other than one weight per example. Yield "
                        "weights of shape (batch,)."
                    )
                weights_lib.check_weight_values(weights, n, "sample_weight")
            for part, name in zip(batch, (self.x_name, self.y_name), strict=False):
                for leaf in tf.nest.flatten(part):
                    bad = first_nonfinite_index(leaf.numpy())
                    if bad is not None:
                        raise ValueError(
                            f"The dataset passed as `{self.x_name}` holds NaN or inf in its "
                            f"{'inputs' if name == self.x_name else 'targets'} at example "
                            f"{n + bad}. Clean or drop that example first."
                        )
            if first_batch is None:
                first_batch = size
            n += size
        if n == 0:
            raise ValueError(
                f"Argument `{self.x_name}` is an empty dataset. Received: a tf.data.Dataset "
                "yielding 0 examples."
            )
        # Column j must mean example j on every pass: a second pass must see the same
        # examples in the same order (a shuffled dataset would silently mix columns).
        again = hashlib.sha256()
        for batch in dataset:
            _digest_batch(again, batch)
        if again.digest() != digest.digest():
            raise ValueError(
                f"The dataset passed as `{self.x_name}` yields its examples in a different "
                "order (or different examples) on each pass, e.g. `shuffle()` with "
                "reshuffle_each_iteration=True or random augmentation, so column j of the "
                "scores would not mean example j. Received: two passes that differ. Remove the "
                "shuffle (or pass reshuffle_each_iteration=False with a seed) and any random "
                "map before `fit`/`explain`."
            )
        self.num_examples = n
        self.batch_size = int(first_batch)
        self._digest = digest.hexdigest()
        self._tensors = None
        self._batched = dataset
        self._unbatched = dataset.unbatch()

    # -- access -------------------------------------------------------------------------
    @property
    def in_memory(self) -> bool:
        """True for arrays/tensors (sliced directly), False for a ``tf.data.Dataset``."""
        return self._tensors is not None

    @property
    def elements(self) -> tuple | None:
        """The ``(x, y[, ...])`` tensors of in-memory data (None for a dataset)."""
        return self._tensors

    def gather(self, indices: np.ndarray) -> tuple:
        """The examples at ``indices`` as one ``(x, y)`` batch, in that order."""
        if self.in_memory:
            take = tf.constant(indices)
            return tf.nest.map_structure(lambda t: tf.gather(t, take), self._tensors)
        wanted = {int(i) for i in indices}
        found: dict = {}
        start = 0
        for batch in self.batches():
            size = int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
            for i in range(start, start + size):
                if i in wanted:
                    found[i] = tf.nest.map_structure(lambda t, row=i - start: t[row], batch)
            start += size
        rows = [found[int(i)] for i in indices]
        return tf.nest.map_structure(lambda *leaves: tf.stack(leaves), *rows)

    def sample_weights(self) -> np.ndarray | None:
        """The ``(n,)`` weights ``w_j`` of weighted training data (one pass), else None."""
        if not self.weighted:
            return None
        if self.in_memory:
            return np.asarray(self._tensors[1].sample_weight.numpy(), np.float64)
        parts = [np.reshape(b[1].sample_weight.numpy(), [-1]) for b in self.batches()]
        return np.concatenate(parts).astype(np.float64)

    @property
    def has_targets(self) -> bool:
        return len(self._batched.element_spec) >= 2

    def _slice(self, start, size):
        return tf.nest.map_structure(lambda t: t[start : start + size], self._tensors)

    def batches(self, batch_size: int | None = None) -> Iterable[tuple]:
        """The examples in their fixed order, in batches of tuples ``(x, y)`` or ``(x,)``.

        An iterable for eager Python loops (one step per batch, e.g. with a progress bar).
        """
        size = batch_size or self.batch_size
        if self.in_memory:
            return (self._slice(start, size) for start in range(0, self.num_examples, size))
        if batch_size is None or batch_size == self.batch_size:
            return self._batched
        return self._unbatched.batch(batch_size)

    @property
    def content_key(self) -> str:
        """sha256 of the examples in order: equal for equal training sets.

        Arrays are hashed when first asked for; a dataset keeps the digest of the pass
        that checked its order.
        """
        if self._digest is None:
            digest = hashlib.sha256()
            _digest_batch(digest, self._tensors)
            self._digest = digest.hexdigest()
        return self._digest

    @property
    def fold_batch_size(self) -> int:
        """The static batch size of ``fold_inputs``: the batch size, at most ``num_examples``."""
        return min(self.batch_size, self.num_examples)

    def graph_inputs(self) -> tuple | tf.data.Dataset:
        """What ``fold_inputs`` folds: the ``(x, y)`` tensors, or the batched dataset.

        Passed to a compiled function as an argument (rather than captured), so that
        the trace serves any training set of the same structure.
        """
        return self._tensors if self.in_memory else self._batched

    def fold(self, fn: Callable[..., Any], initial: Any) -> Any:
        """``acc = fn(acc, batch)`` over all batches in order; traceable inside ``tf.function``.

        For arrays, the full batches run in a ``tf.while_loop`` with a static batch shape
        and the last, shorter batch (if any) once after it, so XLA sees static shapes;
        that call is ``fn(acc, batch, last=True)`` (see ``folds_last_separately``).
        A dataset is folded by ``Dataset.reduce``. The loops are explicit: callers
        trace this without autograph.
        """
        if not self.in_memory:
            return self._batched.reduce(initial, lambda acc, batch: fn(acc, batch))
        size, n = self.batch_size, self.num_examples
        full = n // size
        acc = initial
        if full:
            _, acc = tf.while_loop(
                lambda index, acc: index < full,
                lambda index, acc: (index + 1, fn(acc, self._fixed_slice(index * size, size))),
                (tf.constant(0), acc),
            )
        if n % size:
            acc = fn(acc, self._fixed_slice(full * size, n % size), last=True)
        return acc

    @property
    def folds_last_separately(self) -> bool:
        """Whether ``fold`` calls ``fn(acc, batch, last=True)`` once, for a shorter last batch.

        ``fn`` must then accept ``last``; it is passed only for in-memory arrays
        whose size is not a multiple of the batch size.
        """
        return self.in_memory and self.num_examples % self.batch_size != 0

    def _fixed_slice(self, start, size):
        def take(t):
            begin = tf.concat([[start], tf.zeros([t.shape.rank - 1], tf.int32)], axis=0)
            return tf.slice(t, begin, [size] + t.shape.as_list()[1:])

        return tf.nest.map_structure(take, self._tensors)

    def subset(self, size: int, seed: int) -> ExampleData:
        """A fixed random subset of ``size`` examples (same batch size), e.g. to subsample H."""
        size = min(int(size), self.num_examples)
        if self.in_memory:
            index = tf.random.experimental.index_shuffle(
                tf.range(self.num_examples, dtype=tf.int64),
                seed=[seed, 0],
                max_index=self.num_examples - 1,
            )[:size]
            picked = tf.nest.map_structure(lambda t: tf.gather(t, index).numpy(), self._tensors)
            y = picked[1] if len(picked) > 1 else None
            return ExampleData(
                picked[0], y, self.batch_size, self.x_name, self.y_name, y is not None
            )
        sample = (
            self._unbatched.shuffle(
                min(self.num_examples, 10_000), seed=seed, reshuffle_each_iteration=False
            )
            .take(size)
            .batch(self.batch_size)
        )
        return ExampleData(sample, None, None, self.x_name, self.y_name, self.has_targets)

    def num_batches(self, batch_size: int | None = None) -> int:
        size = batch_size or self.batch_size
        if not self.in_memory and batch_size is None:
            card = int(self._batched.cardinality())
            if card >= 0:
                return card
        return -(-self.num_examples // size)

    def sampler(self, batch_size: int, seed: int) -> Callable[[Any], tuple]:
        """A function ``step -> batch`` of random training batches, for stochastic solvers.

        Arrays: ``batch_size`` indices drawn uniformly with replacement by a stateless
        generator keyed on ``(seed, step)``. Datasets: the repeated data through a shuffle
        buffer (up to 10,000 examples) seeded with ``seed``, read in order. Either way
        the same seed replays the same batches, so results are reproducible. Call it
        inside the ``tf.function`` that consumes the batches.
        """
        if self.in_memory:
            n = self.num_examples

            def draw(step):
                key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
                index = tf.random.stateless_uniform([batch_size], key, maxval=n, dtype=tf.int32)
                return tf.nest.map_structure(lambda t: tf.gather(t, index), self._tensors)

            return draw
        buffer = min(self.num_examples, 10_000)
        stream = (
            self._unbatched.repeat()
            .shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
            .batch(batch_size, drop_remainder=True)
        )
        iterator = iter(stream)
        return lambda step: next(iterator)

    def indexed_dataset(
        self, batch_size: int | None = None, keep: np.ndarray | None = None
    ) -> tf.data.Dataset:
        """Batches ``(index, x, y)`` in the fixed order, ``index`` the examples' positions (int64).

        For distributing the data: the indices say which column each score belongs to.
        ``batch_size`` examples per batch (default: the batch size of the data);
        ``keep``: only the examples at these increasing positions (default: all).
        """
        if self.in_memory:
            index, tensors = tf.range(self.num_examples, dtype=tf.int64), self._tensors
            if keep is not None:
                index = tf.constant(keep, tf.int64)
                tensors = tf.nest.map_structure(lambda t: tf.gather(t, index), tensors)
            elements = tf.data.Dataset.from_tensor_slices((index, *tensors))
        else:
            elements = self._unbatched.enumerate().map(lambda i, e: (i, *e))
            if keep is not None:
                mask = np.zeros(self.num_examples, bool)
                mask[keep] = True
                mask = tf.constant(mask)
                elements = elements.filter(lambda i, *e: tf.gather(mask, i))
        return elements.batch(batch_size or self.batch_size)

    def first_batch(self) -> tuple:
        return next(iter(self.batches()))


def fold_inputs(inputs, batch_size: int, fn, initial):
    """``acc = fn(acc, batch, mask)`` over every batch of ``inputs``; traceable, no autograph.

    For tensors ``(x, y)`` (``ExampleData.graph_inputs``) every batch has the static
    size ``batch_size`` (at most the number of examples), so one trace serves all of
    them: the last batch is the last ``batch_size`` examples, and ``mask`` (a
    ``(batch_size,)`` boolean) is False on those an earlier batch already took. The
    number of examples is read from the tensors, so it may be unknown while tracing.
    A dataset is folded by ``Dataset.reduce`` with ``mask=None`` (every example counts).

    Args:
        inputs: a tuple of tensors with one leading example axis, or a dataset.
        batch_size: a Python int, the static batch size.
        fn: ``(acc, batch, mask) -> acc``.
        initial: the first ``acc`` (a tuple of tensors, not a list).
    """
    if isinstance(inputs, tf.data.Dataset):
        return inputs.reduce(initial, lambda acc, batch: fn(acc, batch, None))
    first = tf.nest.flatten(inputs)[0]
    n = tf.shape(first)[0]
    count = (n + batch_size - 1) // batch_size
    offsets = tf.range(batch_size)

    def body(index, acc):
        wanted = index * batch_size
        start = tf.minimum(wanted, n - batch_size)
        batch = tf.nest.map_structure(lambda t: _slice_at(t, start, batch_size), inputs)
        mask = start + offsets >= wanted
        return index + 1, fn(acc, batch, mask)

    _, acc = tf.while_loop(lambda index, acc: index < count, body, (tf.constant(0), initial))
    return acc


def _slice_at(tensor, start, size):
    begin = tf.concat([[start], tf.zeros([tensor.shape.rank - 1], tf.int32)], axis=0)
    return tf.slice(tensor, begin, [size] + tensor.shape.as_list()[1:])
