"""Evaluating influence rankings: how fast they find mislabelled training examples.

Koh & Liang (2017, section 5.4) flip a fraction of the training labels, rank the
training examples by self-influence, and inspect them in that order: a good
ranking finds most flips after inspecting a small fraction of the data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tf_influence._errors import describe

__all__ = ["MislabelCurve", "mislabel_curve"]


class MislabelCurve(NamedTuple):
    """Fraction of flipped labels found against the fraction of data inspected.

    Attributes:
        inspected: ``(m,)`` fractions of the training set inspected, in ``[0, 1]``.
        found: ``(m,)`` fractions of all flipped examples among the inspected ones.
    """

    inspected: np.ndarray
    found: np.ndarray

    def at(self, fraction: float) -> float:
        """Fraction found after inspecting ``fraction`` of the data (interpolated)."""
        return float(np.interp(fraction, self.inspected, self.found))

    def mean_found(self, start: float = 0.05, stop: float = 0.30) -> float:
        """Average fraction found over inspection budgets in ``[start, stop]``."""
        grid = np.linspace(start, stop, 26)
        return float(np.mean(np.interp(grid, self.inspected, self.found)))


def mislabel_curve(scores_or_ranking, flipped_mask, fractions=None, kind="scores"):
    """How many flipped labels an inspection order finds, per fraction inspected.

    Args:
        scores_or_ranking: ``(n,)``. With ``kind="scores"``, a score per training
            example, inspected from the highest down (self-influence, training
            loss, ...). With ``kind="ranking"``, the training indices in the order
            they are inspected (a permutation of ``0..n-1``).
        flipped_mask: ``(n,)`` booleans, True where the label was flipped.
        fractions: fractions of the training set to report, in ``[0, 1]``;
            default ``0, 0.01, ..., 1``.
        kind: ``"scores"`` or ``"ranking"``.

    Returns:
        ``MislabelCurve(inspected, found)``.

    Example:
        >>> curve = tfi.evaluation.mislabel_curve(im.self_influence(), flipped)
        >>> curve.at(0.1)   # fraction of flips found in the top 10%
    """
    flipped = np.asarray(flipped_mask)
    if flipped.ndim != 1 or flipped.dtype != bool:
        raise ValueError(
            "Argument `flipped_mask` must be a 1-D boolean array. Received: "
            f"{describe(flipped_mask)}. Build it as e.g. `y_noisy != y_clean`."
        )
    n = flipped.shape[0]
    if not flipped.any():
        raise ValueError(
            "Argument `flipped_mask` has no True entry, so there is nothing to find. "
            f"Received: {n} examples, none flipped."
        )
    values = np.asarray(scores_or_ranking)
    if values.shape != (n,):
        raise ValueError(
            f"Argument `scores_or_ranking` must have shape ({n},) like `flipped_mask`. "
            f"Received: shape {values.shape}."
        )
    if kind == "scores":
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise ValueError(
                "Argument `scores_or_ranking` must hold finite numbers when kind='scores'. "
                f"Received: {describe(scores_or_ranking)}."
            )
        order = np.argsort(-values, kind="stable")
    elif kind == "ranking":
        if not np.issubdtype(values.dtype, np.integer) or not np.array_equal(
            np.sort(values), np.arange(n)
        ):
            raise ValueError(
                "Argument `scores_or_ranking` must be a permutation of 0..n-1 when "
                f"kind='ranking'. Received: {describe(scores_or_ranking)}."
            )
        order = values
    else:
        raise ValueError(f'Argument `kind` must be "scores" or "ranking". Received: kind={kind!r}')
    if fractions is None:
        fractions = np.linspace(0.0, 1.0, 101)
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or np.any((fractions < 0) | (fractions > 1)):
        raise ValueError(
            f"Argument `fractions` must be a 1-D array of values in [0, 1]. Received: {fractions}."
        )
    found_so_far = np.concatenate([[0], np.cumsum(flipped[order])])
    counts = np.floor(fractions * n + 1e-9).astype(int)
    return MislabelCurve(fractions, found_so_far[counts] / flipped.sum())
