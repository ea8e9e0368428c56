"""Output draws: the Gauss-Newton matrix as a sum of outer products of gradients.

    G = (1/n) sum_j J_j^T H_L,j J_j = (1/n) sum_j E_u[(J_j^T u)(J_j^T u)^T],   E[u u^T] = H_L,j

``J_j`` is the Jacobian of example j's outputs and ``H_L,j`` the Hessian of its
loss on them (the sample weight included; ``engine.gauss_newton``). A draw ``u =
L eps``, with ``L = H_L^(1/2)`` the symmetric root and ``eps`` standard normal,
has ``E[u u^T] = H_L``, and its backward pass gives ``J^T u``: an outer product
of gradients, so that whatever takes the outer products of per-example loss
gradients (the empirical Fisher) can take the Gauss-Newton matrix from the same
machinery. For cross-entropy, ``u`` has the second moments of ``p - onehot(y)``
with ``y`` drawn from the model's predictive distribution: the true Fisher.

``samples="exact"`` takes for ``eps`` every column of the identity (one backward
pass per model output, weight 1 each), which sums the outer products to ``J^T
H_L J`` exactly; an integer ``m`` takes ``m`` normal draws per example (weight
``1/m``), unbiased. Draws are seeded per example by ``seed`` and the example's
position in the training data, never by its batch or replica, so the same seed
gives the same sums whatever the batch size and the number of devices.

Used by ``KFAC`` / ``EKFAC`` (the Kronecker factors) and ``Projected`` (the
Gauss-Newton matrix in the projected space).

References:
    Martens, "New Insights and Perspectives on the Natural Gradient Method", JMLR
    2020. Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_influence._errors import describe

FISHER = ("true", "empirical")


def check_fisher(fisher: Any) -> str:
    """``fisher`` if it is ``"true"`` or ``"empirical"``, else a ValueError naming it."""
    if fisher not in FISHER:
        raise ValueError(
            f'Argument `fisher` must be "true" or "empirical". Received: fisher={fisher!r}. '
            'Use "true" (the Gauss-Newton matrix, from output draws) or "empirical" (the '
            "outer products of the training loss gradients)."
        )
    return fisher


def check_samples(samples: Any) -> int | str:
    """``samples`` as ``"exact"`` or a positive ``int``, else a ValueError naming it."""
    if samples == "exact" and isinstance(samples, str):
        return samples
    if (
        isinstance(samples, (int, np.integer))
        and not isinstance(samples, (bool, np.bool_))
        and samples >= 1
    ):
        return int(samples)
    raise ValueError(
        'Argument `samples` must be a positive integer or "exact". Received: '
        f'samples={describe(samples)}. Pass e.g. samples=1 (one draw per example) or "exact" '
        "(one backward pass per model output, for models with a few outputs)."
    )


def output_draws(
    objective: Any,
    outputs: Any,
    y: Any,
    positions: tf.Tensor,
    samples: int | str,
    seed: int,
    stream: int = 0,
) -> list[tuple[float, tf.Tensor]]:
    """``[(weight, per-example pseudo-loss (b,))]`` whose gradients are the draws ``J^T u``.

    Traceable. The outputs must have been computed under the tape that takes the
    gradients (``objective.predict(x)``); the pseudo-loss of a draw is ``u .
    outputs`` with ``u`` held constant, so its gradient is ``J^T u``, and ``sum_d
    weight_d (J^T u_d)(J^T u_d)^T`` has expectation (``samples="exact"``: equals)
    ``J^T H_L J`` per example.

    Args:
        objective: the ``Objective`` (its loss on the outputs).
        outputs: the model's outputs on the batch (a tensor or a structure of them).
        y: the batch's targets (``WeightedTargets`` with sample weights).
        positions: ``(b,)`` int64, the examples' positions in the training data.
        samples: ``"exact"`` (every column of ``L``) or the number of normal draws.
        seed: the integer the draws are seeded by (with the positions).
        stream: tells apart passes (or uses) that need independent draws from one
            seed: example ``j``'s noise is seeded by ``(seed, 2 * j + stream)``.

    Returns:
        The draws, an empty list when the loss does not depend on the outputs.
    """
    from tf_influence.engine.gauss_newton import output_hessians

    flat = tf.nest.flatten(outputs)
    hessians = output_hessians(objective, outputs, y)  # (b, K, K)
    if hessians is None:
        return []
    size = tf.shape(flat[0])[0]
    values, vectors = tf.linalg.eigh(tf.cast(hessians, tf.float64))
    # L = H_L^(1/2), the symmetric root: unique, so a draw L eps does not depend on
    # the signs eigh gives the eigenvectors (which rounding may flip between batches).
    root = tf.matmul(
        vectors * tf.sqrt(tf.maximum(values, 0.0))[:, None, :], vectors, transpose_b=True
    )
    width = sum(int(np.prod(t.shape[1:], dtype=np.int64)) for t in flat)
    if samples == "exact":
        columns, weight = [root[:, :, i] for i in range(width)], 1.0
    else:
        noise = example_noise(seed, positions, stream, [width, samples])
        drawn = tf.matmul(root, noise)
        columns, weight = [drawn[:, :, i] for i in range(samples)], 1.0 / samples
    joined = tf.concat([tf.reshape(tf.cast(t, tf.float64), [size, -1]) for t in flat], axis=1)
    # A pseudo-loss whose gradient is J^T u (u held constant).
    return [(weight, tf.reduce_sum(tf.stop_gradient(c) * joined, axis=1)) for c in columns]


def example_noise(seed: int, positions: tf.Tensor, stream: int, shape: list[int]) -> tf.Tensor:
    """``(b, *shape)`` standard normal float64 draws, one stateless draw per example.

    Example ``j``'s draw is seeded by ``(seed, 2 * j + stream)``: a function of its
    position ``j`` in the data alone, not of its batch or replica.
    """
    positions = tf.cast(positions, tf.int64)
    seeds = tf.fill(tf.shape(positions), tf.constant(seed, tf.int64))
    keys = tf.stack([seeds, 2 * positions + stream], axis=1)
    return tf.map_fn(
        lambda key: tf.random.stateless_normal(shape, key, dtype=tf.float64),
        keys,
        fn_output_signature=tf.TensorSpec(shape, tf.float64),
    )


def training_sums(
    operator: Any,
    step: Callable[..., Any],
    like: Any,
    batch_size: int,
    args: tuple = (),
    on_batch: Callable[[], None] = lambda: None,
    keep: np.ndarray | None = None,
) -> Any:
    """``step(x, y, positions, *args)`` summed over the training data (``like``'s structure).

    Under a strategy every replica sums its shards and the sums are all-reduced once
    (``ReplicaData.replica_sums``); else one device loops over the batches.

    Args:
        operator: the curvature operator (its ``data`` and ``replicas``).
        step: ``(x, y, positions (b,) int64, *args) -> `` sums over the batch.
        like: the structure of the sums (tensors of their shapes and dtypes).
        batch_size: examples per step.
        args: tensors every step gets as they are.
        on_batch: called after each batch (a progress bar's update).
        keep: only the examples at these increasing positions (default: all); each
            keeps its position in the data, so its draws are the same as in a full pass.
    """
    if operator.replicas is not None:
        return operator.replicas.replica_sums(step, like, batch_size, args, on_batch, keep)
    flat = tf.nest.flatten(like)
    for positions, x, y in _indexed_batches(operator.data, batch_size, keep):
        found = tf.nest.flatten(step(x, y, positions, *args))
        flat = [t + u for t, u in zip(flat, found, strict=True)]
        on_batch()
    return tf.nest.pack_sequence_as(like, flat)


def _indexed_batches(data: Any, batch_size: int, keep: np.ndarray | None):
    """``(positions (b,) int64, x, y)`` per batch: every example, or those at ``keep``."""
    if keep is not None:
        yield from data.indexed_dataset(batch_size, keep)
        return
    offset = 0
    for batch in data.batches(batch_size):
        size = int(tf.nest.flatten(batch[0])[0].shape[0])
        yield tf.range(offset, offset + size, dtype=tf.int64), batch[0], batch[1]
        offset += size


def subset_positions(num_examples: int, max_examples: int | None, seed: int) -> np.ndarray | None:
    """``max_examples`` increasing positions drawn without replacement (seeded), or None.

    None (every example) when ``max_examples`` is None or at least ``num_examples``.
    """
    if max_examples is None or max_examples >= num_examples:
        return None
    rng = np.random.default_rng([seed, num_examples, max_examples])
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False)).astype(np.int64)
