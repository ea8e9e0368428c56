"""Influence on a ``tf.distribute`` strategy: sharded passes, all-reduced products, gathered scores.

A model built under ``strategy.scope()`` is analysed with ``model.distribute_strategy``
(or an explicit ``strategy=``), as Keras trains it. What runs where:

* **Hessian-vector products** over the training set: the examples are served by
  ``strategy.experimental_distribute_dataset`` (global batches of ``batch_size``,
  split over the replicas; uneven last batches give some replicas fewer or no
  examples); each replica computes the product on its shard and the sums are
  all-reduced (``strategy.reduce(SUM)``) once per global batch.
* **Stochastic products** (LiSSA): the sampled batch is drawn identically on
  every worker (stateless, seeded) and each replica takes its slice of it.
* **K-FAC / EK-FAC factors**: each replica adds up the factor (and eigenvalue
  correction) sums of its shards of every global batch on its own device; the
  per-replica sums are all-reduced once per pass, before the float64
  eigendecomposition, which runs outside the replicas.
* **Solvers** run in cross-replica context on every worker, on the all-reduced
  products, so every worker holds the same solution.
* **Scoring** of training examples: each replica scores its shard and returns
  the examples' global indices with the scores; ``strategy.gather`` brings them
  together and the scores are put in column ``index``, so column ``j`` is
  training example ``j`` whatever the number of replicas or workers.

Test-point gradients (a few batches) are computed in cross-replica context.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe

if TYPE_CHECKING:
    import keras

    from tf_influence.engine.data import ExampleData
    from tf_influence.engine.gradients import PerExampleGradients

_Method = TypeVar("_Method", bound=Callable[..., Any])

__all__ = ["ReplicaData", "WorkerError", "num_workers", "resolve_strategy", "strategy_name"]

# Collective errors when a worker dies or stops answering (the strategy's health
# check aborts pending collectives with UnavailableError).
_WORKER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


class WorkerError(RuntimeError):
    """A worker (or device) of the distribution strategy failed during a computation."""


def is_default(strategy: tf.distribute.Strategy) -> bool:
    """True for TensorFlow's default (no-op) strategy."""
    with strategy.scope():
        return not tf.distribute.has_strategy()


def resolve_strategy(
    model: keras.Model, strategy: tf.distribute.Strategy | None
) -> tf.distribute.Strategy | None:
    """The strategy to analyse ``model`` with, or None for the default strategy.

    ``strategy=None`` takes ``model.distribute_strategy`` (the scope the model was built
    in), as ``model.fit`` does.
    """
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "Argument `strategy` must be a tf.distribute.Strategy (e.g. "
            "tf.distribute.MirroredStrategy()) or None to use the model's. Received: "
            f"strategy={describe(strategy)}"
        )
    own = getattr(model, "distribute_strategy", None)
    if own is not None and is_default(own):
        own = None
    if strategy is None:
        return own
    if own is not None and own is not strategy:
        raise ValueError(
            f"Argument `strategy` differs from the strategy the model was built under. "
            f"Received: strategy={strategy_name(strategy)} for a model built under "
            f"{strategy_name(own)}. Pass strategy=None (the model's own), or build the "
            "model inside `strategy.scope()`."
        )
    return None if is_default(strategy) else strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public name of ``strategy``'s class (MultiWorkerMirroredStrategy, not its alias)."""
    name = type(strategy).__name__
    return "MultiWorkerMirroredStrategy" if name == "CollectiveAllReduceStrategy" else name


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes taking part in ``strategy`` (1 on one machine)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def translate_worker_errors(method: _Method) -> _Method:
    """Turns a collective failure in a distributed ``InfluenceModel`` call into ``WorkerError``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "strategy", None) is None:
            return method(self, *args, **kwargs)
        # Only the outermost public call translates, so the message names what the
        # user called (``explain``, not the ``inverse_hvp_tests`` inside it).
        outermost = not getattr(self, "_in_distributed_call", False)
        self._in_distributed_call = True
        try:
            return method(self, *args, **kwargs)
        except _WORKER_ERRORS as error:
            if not outermost:
                raise
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            at = next((i for i, line in enumerate(lines) if "abort" in line.lower()), 0)
            said = " ".join(lines[at : at + 2])[:400]
            raise WorkerError(
                f"`{method.__name__}` stopped: a worker or device of "
                f"{strategy_name(self.strategy)} failed or stopped answering "
                f"({type(error).__name__}: {said}). Nothing was returned. Restart every "
                "worker (with the same TF_CONFIG and data) and run the call again. To fail "
                "faster than the strategy's health check, create it with "
                "communication_options=tf.distribute.experimental.CommunicationOptions("
                "timeout_seconds=...)."
            ) from error
        finally:
            if outermost:
                self._in_distributed_call = False

    return wrapper


def check_replicas_in_sync(
    variables: Sequence[tf.Variable], name_of: Callable[[tf.Variable], str]
) -> None:
    """Refuses mirrored variables whose copies on this worker's replicas differ.

    Each replica computes its products with its own copy; copies that drifted apart
    (Keras 3.4's ``model.fit`` under MirroredStrategy leaves them so) would mix
    several models in one Hessian, silently.
    """
    for variable in variables:
        inner = getattr(variable, "value", variable)
        copies = getattr(inner, "values", None)
        if not isinstance(copies, (list, tuple)) or len(copies) < 2:
            continue
        first = np.asarray(copies[0].numpy())
        for copy in copies[1:]:
            gap = float(np.max(np.abs(np.asarray(copy.numpy()) - first), initial=0.0))
            if gap > 0:
                raise ValueError(
                    f"The replicas hold different values of weight {name_of(variable)!r}: "
                    f"its mirrored copies differ by up to {gap:.3g}, so each replica would "
                    "analyse another model. (Keras 3.4's model.fit under MirroredStrategy "
                    "leaves them so; Keras 3.15 keeps them equal.) Re-synchronise them with "
                    "`model.set_weights(model.get_weights())`, or upgrade Keras."
                )


def check_workers_agree(strategy: tf.distribute.Strategy, fingerprints: dict[str, str]) -> None:
    """Refuses to go on if workers hold different weights or data.

    Every worker must give ``fit`` the same training data in the same order and hold
    the same weights; otherwise the all-reduced curvature would silently mix models.
    Gathers 52-bit prefixes of the sha256 fingerprints (exact in float64) from
    every replica and compares them.
    """
    if num_workers(strategy) < 2:
        return
    values = tf.constant([float(int(f[:13], 16)) for f in fingerprints.values()], tf.float64)

    @tf.function
    def gather(values):
        return strategy.gather(strategy.run(lambda v: v[None], args=(values,)), axis=0)

    every = gather(values).numpy()  # (replicas, len(fingerprints))
    low, high = every.min(axis=0), every.max(axis=0)
    differ = [name for name, a, b in zip(fingerprints, low, high, strict=True) if a != b]
    if differ:
        # Every worker raises; give the others a moment to finish receiving the
        # gather, or a worker that exits at once turns their error into a WorkerError.
        time.sleep(2.0)
        raise ValueError(
            f"The workers of {strategy_name(strategy)} do not agree on the "
            f"{' and the '.join(differ)}: every worker must call `fit` with the same "
            "training data, in the same order, on a model with the same weights (load "
            "the same checkpoint on each worker)."
        )


def _unless_empty(fn, x, y, like):
    """``fn(x, y)``, or zeros like ``like`` for a replica left without examples.

    An uneven last batch leaves some replicas an empty shard, on which pfor's
    vectorised Jacobian fails; its contribution is zero anyway.
    """
    size = tf.shape(tf.nest.flatten(y)[0])[0]
    return tf.cond(size > 0, lambda: fn(x, y), lambda: tf.zeros_like(like))


class ReplicaData:
    """The distributed view of an ``ExampleData``: ``(index, x, y)`` global batches.

    Args:
        data: the training examples, in their fixed order.
        strategy: the ``tf.distribute.Strategy`` to spread them over.
    """

    def __init__(self, data: ExampleData, strategy: tf.distribute.Strategy):
        self.data = data
        self.strategy = strategy
        self.num_replicas = int(strategy.num_replicas_in_sync)
        self._datasets: dict = {}
        self.dataset = self.distributed()
        self._score_steps: dict = {}

    def distributed(
        self, batch_size: int | None = None, keep: np.ndarray | None = None
    ) -> tf.distribute.DistributedDataset:
        """The ``(index, x, y)`` global batches of ``batch_size``, split over the replicas.

        ``batch_size`` defaults to the data's; ``keep``: only the examples at these
        increasing positions (``ExampleData.indexed_dataset``). One distributed dataset
        is kept per size (and subset).
        """
        size = batch_size or self.data.batch_size
        key = (size, None if keep is None else keep.tobytes())
        if key not in self._datasets:
            options = tf.data.Options()
            options.deterministic = True
            # Shard by element: examples may come from one file or from memory.
            policy = tf.data.experimental.AutoShardPolicy.DATA
            options.experimental_distribute.auto_shard_policy = policy
            indexed = self.data.indexed_dataset(size, keep).with_options(options)
            self._datasets[key] = self.strategy.experimental_distribute_dataset(indexed)
        return self._datasets[key]

    # -- products (called while tracing, in cross-replica context) ----------------------
    def fold_sum(
        self, replica_fn: Callable[[Any, Any], tf.Tensor], initial: tf.Tensor
    ) -> tf.Tensor:
        """``initial + sum over global batches of all-reduced replica_fn(x, y)``."""
        total = initial
        for batch in self.dataset:
            partial = self.strategy.run(
                lambda b: _unless_empty(replica_fn, b[1], b[2], initial), args=(batch,)
            )
            reduced = self.strategy.reduce(tf.distribute.ReduceOp.SUM, partial, axis=None)
            total += tf.ensure_shape(reduced, initial.shape)
        return total

    def split_sum(
        self, replica_fn: Callable[[Any, Any], tf.Tensor], x: Any, y: Any, like: tf.Tensor
    ) -> tf.Tensor:
        """All-reduced sum of ``replica_fn`` over the replicas' slices of one batch.

        The batch is the same on every replica (and worker); replica ``r`` of ``R`` takes
        examples ``[r*b//R, (r+1)*b//R)``. ``like``: a tensor of the result's shape.
        """

        size = tf.shape(tf.nest.flatten(y)[0])[0]

        def piece(context):
            # Python ints: a replica-id tensor inside the loop is not fed on every strategy.
            rank, count = context.replica_id_in_sync_group, context.num_replicas_in_sync
            start, stop = rank * size // count, (rank + 1) * size // count
            return tf.nest.map_structure(lambda t: t[start:stop], (x, y))

        pieces = self.strategy.experimental_distribute_values_from_function(piece)
        partial = self.strategy.run(lambda xy: _unless_empty(replica_fn, *xy, like), args=(pieces,))
        reduced = self.strategy.reduce(tf.distribute.ReduceOp.SUM, partial, axis=None)
        return tf.ensure_shape(reduced, like.shape)

    # -- sums over the examples (eager loop over global batches) -------------------------
    def replica_sums(
        self,
        replica_fn: Callable[..., Any],
        like: Any,
        batch_size: int | None = None,
        args: tuple = (),
        on_batch: Callable[[], None] | None = None,
        keep: np.ndarray | None = None,
    ) -> Any:
        """The sum of ``replica_fn`` over every training example, all-reduced over the replicas.

        Each replica adds up ``replica_fn(x, y, index, *args)`` over its shards of the
        global batches of ``batch_size``, on its own device (``index``: the ``(b,)``
        positions of the shard's examples in the data, int64). The per-replica sums are
        all-reduced (``strategy.reduce(SUM)``) once, after the last batch, so one pass
        costs one all-reduce whatever its number of batches.

        Args:
            replica_fn: ``(x, y, index, *args) -> ``a structure of tensors shaped as
                ``like``, the sums over the shard's examples. Called in replica context.
            like: the structure of the sums (tensors of their shapes and dtypes).
            batch_size: examples per global batch (default: the data's batch size).
            args: tensors every replica gets as they are.
            on_batch: called after each global batch (e.g. a progress bar's update).
            keep: only the examples at these increasing positions (default: all).

        Returns:
            The all-reduced sums, shaped as ``like``, in cross-replica context.
        """
        strategy = self.strategy
        dataset = self.distributed(batch_size, keep)
        args = tuple(args)
        specs = [(t.shape, t.dtype) for t in tf.nest.flatten(like)]

        def zeros():
            return [tf.zeros(shape, dtype) for shape, dtype in specs]

        def replica(sums, batch, args):
            index, x, y = batch
            # A replica left without examples by an uneven last batch adds nothing
            # (pfor's per-example gradients fail on an empty shard).
            found = tf.cond(
                tf.size(index) > 0,
                lambda: tf.nest.flatten(replica_fn(x, y, index, *args)),
                zeros,
            )
            return [a + b for a, b in zip(sums, found, strict=True)]

        def step(sums, batch, args):
            return strategy.run(replica, args=(sums, batch, args))

        def reduce(sums):
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in sums]

        sums = tf.function(lambda: strategy.run(zeros), autograph=False)()
        # The dataset's spec leaves the shards' sizes free: one trace for every batch.
        spec = [
            tf.nest.map_structure(tf.type_spec_from_value, sums),
            dataset.element_spec,
            tf.nest.map_structure(tf.type_spec_from_value, args),
        ]
        step = tf.function(step, input_signature=spec, autograph=False)
        for batch in dataset:
            sums = step(sums, batch, args)
            if on_batch is not None:
                on_batch()
        return tf.nest.pack_sequence_as(like, tf.function(reduce, autograph=False)(sums))

    # -- scoring (eager loop over global batches) ----------------------------------------
    def _score_step(self, impl):
        key = id(impl)
        if key not in self._score_steps:
            strategy = self.strategy
            batch_spec = self.dataset.element_spec
            traced: dict = {}

            def replica(batch, solutions, extra):
                index, x, y = batch
                k = tf.shape(solutions)[1]
                empty = (tf.zeros([k, 0], solutions.dtype), tf.zeros([0], tf.bool))
                scores, finite = tf.cond(
                    tf.size(index) > 0, lambda: impl(x, y, solutions, *extra), lambda: empty
                )
                return index, scores, tf.cast(finite, tf.int32)

            def step(batch, solutions, extra):
                index, scores, finite = strategy.run(replica, args=(batch, solutions, extra))
                return (
                    strategy.gather(index, axis=0),
                    strategy.gather(scores, axis=1),
                    strategy.gather(finite, axis=0),
                )

            def call(batch, solutions, extra):
                # The dataset's spec leaves the shards' sizes free: the last, shorter
                # batch runs the same trace (one per shape of the solutions).
                specs = tf.nest.map_structure(tf.type_spec_from_value, (solutions, extra))
                name = repr(specs)
                if name not in traced:
                    traced[name] = tf.function(step, input_signature=[batch_spec, *specs])
                return traced[name](batch, solutions, extra)

            self._score_steps[key] = (impl, call, traced)
        return self._score_steps[key][1]

    def score_tracing_count(self) -> int:
        """How many times the scoring steps of ``score_blocks`` were traced."""
        return sum(
            function.experimental_get_tracing_count()
            for _, _, traced in self._score_steps.values()
            for function in traced.values()
        )

    def score_blocks(
        self,
        gradients: PerExampleGradients,
        solutions: tf.Tensor | np.ndarray,
        start: int = 0,
        queries: Sequence[Any] = (),
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yields ``(start, scores (k, m), finite (m,))`` for consecutive training examples.

        Each replica scores its shard; the gathered columns are put back in global
        order by their indices (a worker's shard need not be contiguous). Global
        batches before ``start`` (a multiple of the batch size) are skipped unscored.
        ``queries``: the ``LowRankQueries`` of compressed layers of ``solutions``
        (see ``PerExampleGradients.scores``).
        """
        solutions = tf.convert_to_tensor(solutions, gradients.objective.dtype)
        pending_index, pending_scores, pending_finite = [], [], []
        skip = start // self.data.batch_size
        start = skip * self.data.batch_size
        for step, batch in enumerate(self.dataset):
            if step < skip:
                continue
            index, scores, finite = gradients.run_scoring(
                lambda impl, extra, batch=batch: self._score_step(impl)(batch, solutions, extra),
                int(solutions.shape[1]),
                queries,
            )
            pending_index.append(index.numpy())
            pending_scores.append(scores.numpy())
            pending_finite.append(finite.numpy().astype(bool))
            order = np.argsort(np.concatenate(pending_index), kind="stable")
            index = np.concatenate(pending_index)[order]
            scores = np.concatenate(pending_scores, axis=1)[:, order]
            finite = np.concatenate(pending_finite)[order]
            # The longest run start, start+1, ... is ready; the rest waits.
            ready = int(np.sum(np.cumprod(index == np.arange(start, start + index.size))))
            if ready:
                yield start, scores[:, :ready], finite[:ready]
                start += ready
            pending_index = [index[ready:]]
            pending_scores = [scores[:, ready:]]
            pending_finite = [finite[ready:]]
        if start != self.data.num_examples:
            raise RuntimeError(
                f"Distributed scoring covered {start} of {self.data.num_examples} training "
                "examples: the distributed dataset lost or repeated examples."
            )
