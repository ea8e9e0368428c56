"""Argument checks shared by the whole package.

Each check returns the value in its normal form (a Python ``int``, ``float`` or
``bool``) or raises a ``ValueError`` that names the argument and what it
received, the Keras way: ``Argument `max_iter` must be a positive integer.
Received: max_iter=0``. NumPy scalars are accepted where the Python type is;
``True`` and ``False`` are not numbers here.
"""

from __future__ import annotations

import math

import numpy as np

from tf_influence._errors import describe


def _received(name: str, value) -> str:
    if isinstance(value, np.generic):  # np.int64(0) reads as 0, not as a 0-d array
        value = value.item()
    return f"Received: {name}={describe(value)}"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(
    name: str, value, allow_none: bool = False, *, none_means: str | None = None
) -> int | None:
    """``value`` as an ``int >= 1`` (or None, if allowed), else a ValueError.

    Args:
        name: the argument's name, as the user wrote it.
        value: what was received.
        allow_none: whether None is accepted (and returned as is).
        none_means: what None stands for; if given, the message offers None too,
            e.g. ``"to analyse only at the end of training"``.

    Returns:
        ``int(value)``, or None.

    Raises:
        ValueError: ``value`` is not an integer (bools and floats are not), or is
            below 1.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        accepted = "a positive integer"
        if allow_none and none_means:
            accepted += f" or None ({none_means})"
        raise ValueError(f"Argument `{name}` must be {accepted}. {_received(name, value)}")
    return int(value)


def check_positive_float(name: str, value, allow_none: bool = False) -> float | None:
    """``value`` as a finite ``float > 0`` (or None, if allowed), else a ValueError.

    Integers and NumPy numbers are accepted; bools and strings are not.

    Returns:
        ``float(value)``, or None.

    Raises:
        ValueError: ``value`` is not a number, or is not finite, or is not positive.
    """
    if value is None and allow_none:
        return None
    number = float("nan")
    if not isinstance(value, (bool, np.bool_, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(number) or number <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive finite number. {_received(name, value)}"
        )
    return number


def check_int(name: str, value) -> int:
    """``value`` as an ``int`` (any sign; a seed, say), else a ValueError.

    Raises:
        ValueError: ``value`` is not an integer (bools and floats are not).
    """
    if not _is_int(value):
        raise ValueError(f"Argument `{name}` must be an integer. {_received(name, value)}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` as a ``bool``, else a ValueError (``0``, ``1`` and strings are not bools).

    Raises:
        ValueError: ``value`` is neither True nor False.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Argument `{name}` must be True or False. {_received(name, value)}")
    return bool(value)
