"""Argument checks shared by the callbacks."""

from __future__ import annotations

from tf_influence._validation import check_positive_int


def check_every_n_epochs(value, allow_none=True):
    return check_positive_int(
        "every_n_epochs", value, allow_none, none_means="to analyse only at the end of training"
    )


def check_epochs(value):
    if value is None:
        return None
    try:
        epochs = sorted({int(e) for e in value})
        ok = all(float(e) == int(e) and int(e) >= 1 for e in value) and bool(epochs)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "Argument `epochs` must be a non-empty list of 1-based epoch numbers, e.g. "
            f"[5, 10]. Received: epochs={value!r}"
        )
    return epochs
