"""kNN narrowing (FastIF, Guo et al. 2021): score only the training examples nearest
to each test point in a layer's feature space.

Influence is expensive per training example and concentrated on few of them;
examples close to the test point in the model's own feature space hold most of
the top ones. Distances are exact (squared Euclidean, by matrix products in
TensorFlow, streamed over the training set with a running top-k), so no
approximate index is needed at the sizes one machine scores.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_influence._errors import describe
from tf_influence.outputs import TopK


class Candidates(NamedTuple):
    """Influence restricted to each test point's nearest training examples.

    All arrays have shape ``(n_test, k)``, nearest first: ``indices`` are training
    indices, ``scores`` their ``I_up,loss`` (see ``InfluenceModel.explain``) and
    ``distances`` the Euclidean distances in feature space.
    """

    indices: np.ndarray
    scores: np.ndarray
    distances: np.ndarray


def feature_function(model, feature_layer):
    """``x -> (batch, d)`` features from a layer (name or object) or a callable."""
    if callable(feature_layer) and not isinstance(feature_layer, keras.layers.Layer):
        return lambda x: feature_layer(model, x)
    if isinstance(feature_layer, str):
        try:
            layer = model.get_layer(feature_layer)
        except ValueError as error:
            raise ValueError(
                "Argument `feature_layer` names a layer the model does not have. Received: "
                f"feature_layer={feature_layer!r}. Layers: {[la.name for la in model.layers]}."
            ) from error
    elif isinstance(feature_layer, keras.layers.Layer):
        layer = feature_layer
    else:
        raise ValueError(
            "Argument `feature_layer` must be a layer of the model, its name, or a callable "
            f"fn(model, x) returning features. Received: feature_layer={describe(feature_layer)}"
        )
    try:
        inputs = model.inputs
        extractor = keras.Model(inputs[0] if len(inputs) == 1 else inputs, layer.output)
    except (AttributeError, ValueError, TypeError) as error:
        raise ValueError(
            f"Cannot read the output of layer {layer.name!r}: the model has no graph of "
            "layers (a subclassed model). Pass `feature_layer=lambda model, x: ...` "
            "computing the features instead."
        ) from error
    return lambda x: extractor(x, training=False)


class FeatureIndex:
    """Training features, for exact nearest-neighbour search by matrix products."""

    def __init__(self, features_of, data):
        self._features_of = tf.function(lambda x: _flat(features_of(x)))
        blocks = [self._features_of(batch[0]) for batch in data.batches()]
        self.features = tf.concat(blocks, axis=0)  # (n, d)
        self.squared_norms = tf.reduce_sum(self.features**2, axis=1)
        self._search = tf.function(self._search_impl)

    def _search_impl(self, queries, k):
        # Running top-k over chunks of the training set: memory (b, chunk), not (b, n).
        n = tf.shape(self.features)[0]
        chunk = 8192
        q_norms = tf.reduce_sum(queries**2, axis=1, keepdims=True)
        best_d = tf.fill([tf.shape(queries)[0], k], tf.constant(np.inf, queries.dtype))
        best_i = tf.zeros([tf.shape(queries)[0], k], tf.int32)
        for start in tf.range(0, n, chunk):
            features = self.features[start : start + chunk]
            norms = self.squared_norms[start : start + chunk]
            distances = (
                q_norms + norms[None, :] - 2.0 * tf.matmul(queries, features, transpose_b=True)
            )
            indices = tf.range(start, start + tf.shape(features)[0])
            all_d = tf.concat([best_d, distances], axis=1)
            all_i = tf.concat([best_i, tf.broadcast_to(indices, tf.shape(distances))], axis=1)
            negated, position = tf.math.top_k(-all_d, k=k)
            best_d, best_i = -negated, tf.gather(all_i, position, batch_dims=1)
        return best_i, tf.sqrt(tf.maximum(best_d, 0.0))

    def nearest(self, x, k: int):
        queries = tf.cast(self._features_of(x), self.features.dtype)
        return self._search(queries, tf.constant(k))


def _flat(features):
    features = tf.convert_to_tensor(features)
    return tf.reshape(features, [tf.shape(features)[0], -1])


def score_candidates(state, model, solutions, x_test, batch_size, k, feature_layer, divisors):
    """Scores of each test point's ``k`` nearest training examples (``explain(candidates=)``).

    ``state`` is the ``FittedState``; the feature index of ``feature_layer`` is built
    once per fit and kept there.
    """
    key = feature_layer if isinstance(feature_layer, str) else id(feature_layer)
    index = state.feature_index(
        key,
        lambda: (feature_layer, FeatureIndex(feature_function(model, feature_layer), state.data)),
    )[1]
    k = min(int(k), state.num_train)
    tests = state.test_data(x_test, None, batch_size)
    indices, scores, distances = [], [], []
    start = 0
    for batch in tests.batches():
        nearest, distance = index.nearest(batch[0], k)
        nearest = nearest.numpy()
        b = nearest.shape[0]
        block = solutions[:, start : start + b]
        union = np.unique(nearest)
        x, y = state.data.gather(union)
        step = state.batch_size
        parts = [
            state.gradients.scores(
                *tf.nest.map_structure(lambda t, s=s, e=step: t[s : s + e], (x, y)), block
            )[0]
            for s in range(0, union.size, step)
        ]
        union_scores = tf.concat(parts, axis=1).numpy()  # (b, |union|)
        if divisors is not None:
            union_scores = union_scores / divisors[union][None, :]
        columns = np.searchsorted(union, nearest)
        scores.append(np.take_along_axis(union_scores, columns, axis=1))
        indices.append(nearest)
        distances.append(distance.numpy())
        start += b
    dtype = state.objective.dtype.as_numpy_dtype
    return Candidates(
        np.concatenate(indices),
        np.concatenate(scores).astype(dtype),
        np.concatenate(distances),
    )


def top_k_of(found: Candidates, k: int) -> TopK:
    """``TopK`` among the candidates of each test point."""
    k = min(int(k), found.scores.shape[1])
    harmful = np.argsort(-found.scores, axis=1, kind="stable")[:, :k]
    helpful = np.argsort(found.scores, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return TopK(
        take(found.indices, helpful, axis=1),
        take(found.scores, helpful, axis=1),
        take(found.indices, harmful, axis=1),
        take(found.scores, harmful, axis=1),
    )
