"""The shared argument checks: what each accepts, what it returns, and its error text."""

import math
import re

import numpy as np
import pytest

from tf_influence._validation import (
    check_bool,
    check_int,
    check_positive_float,
    check_positive_int,
)
from tf_influence.callbacks._checks import check_every_n_epochs
from tf_influence.outputs import check_k
from tf_influence.solvers import CG, LiSSA


@pytest.mark.parametrize("value", [1, 7, np.int32(3), np.int64(2**40), np.uint8(5)])
def test_positive_int_accepts_python_and_numpy_integers(value):
    result = check_positive_int("k", value)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize(
    "value, received",
    [
        (0, "k=0"),
        (-3, "k=-3"),
        (True, "k=True"),
        (False, "k=False"),
        (np.bool_(True), "k=True"),
        (2.0, "k=2.0"),
        (np.float64(2.0), "k=2.0"),
        ("3", "k='3'"),
        (np.int64(0), "k=0"),
        (np.ones(3, dtype=int), "k=ndarray of shape (3,) and dtype int64"),
    ],
)
def test_positive_int_error_names_the_argument_and_the_value(value, received):
    message = f"Argument `k` must be a positive integer. Received: {received}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_positive_int("k", value)


def test_positive_int_none():
    assert check_positive_int("max_iter", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^Argument `max_iter` must be a positive integer. "):
        check_positive_int("max_iter", None)
    # Offered in the message only when the caller says what None means.
    with pytest.raises(ValueError, match=r"must be a positive integer. Received: max_iter=0$"):
        check_positive_int("max_iter", 0, allow_none=True)
    with pytest.raises(
        ValueError,
        match=r"^Argument `every` must be a positive integer or None \(to stop\). "
        r"Received: every=0$",
    ):
        check_positive_int("every", 0, allow_none=True, none_means="to stop")
    with pytest.raises(ValueError, match=r"must be a positive integer. Received: every=0$"):
        check_positive_int("every", 0, none_means="to stop")  # None not allowed here


@pytest.mark.parametrize(
    "value, expected", [(1e-6, 1e-6), (3, 3.0), (np.float32(0.5), 0.5), (np.int64(2), 2.0)]
)
def test_positive_float_accepts_numbers(value, expected):
    result = check_positive_float("tol", value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize(
    "value, received",
    [
        (0, "tol=0"),
        (0.0, "tol=0.0"),
        (-1e-3, "tol=-0.001"),
        (math.nan, "tol=nan"),
        (math.inf, "tol=inf"),
        (True, "tol=True"),
        (np.bool_(True), "tol=True"),
        ("1e-3", "tol='1e-3'"),
        ([1.0], "tol=[1.0]"),
        (None, "tol=None"),
    ],
)
def test_positive_float_error_names_the_argument_and_the_value(value, received):
    message = f"Argument `tol` must be a positive finite number. Received: {received}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_positive_float("tol", value)


def test_positive_float_none():
    assert check_positive_float("scale", None, allow_none=True) is None


@pytest.mark.parametrize("value", [0, -5, 12, np.int64(-1), np.uint16(9)])
def test_int_accepts_any_integer(value):
    result = check_int("seed", value)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize(
    "value, received",
    [(True, "seed=True"), (1.0, "seed=1.0"), (None, "seed=None"), ("a", "seed='a'")],
)
def test_int_error(value, received):
    message = f"Argument `seed` must be an integer. Received: {received}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_int("seed", value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_bool_accepts_bools(value):
    result = check_bool("block", value)
    assert result == bool(value) and type(result) is bool


@pytest.mark.parametrize(
    "value, received",
    [(1, "block=1"), (0, "block=0"), ("yes", "block='yes'"), (None, "block=None")],
)
def test_bool_error(value, received):
    message = f"Argument `block` must be True or False. Received: {received}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_bool("block", value)


def test_call_sites_use_the_shared_checks():
    # Seeds: NumPy integers are accepted (and stored as int); bools are not.
    assert CG(seed=np.int64(3)).get_config()["seed"] == 3
    assert type(LiSSA(seed=np.int32(4)).seed) is int
    with pytest.raises(ValueError, match=r"`seed` must be an integer. Received: seed=True"):
        CG(seed=True)
    with pytest.raises(
        ValueError, match=r"`tol` must be a positive finite number. Received: tol=True"
    ):
        CG(tol=True)
    with pytest.raises(ValueError, match=r"`block` must be True or False. Received: block=1"):
        CG(block=1)
    assert CG(block=np.bool_(False)).block is False
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer. Received"):
        LiSSA(batch_size=0)
    check_k(np.int64(5), "k")
    with pytest.raises(ValueError, match=r"^Argument `top_k` must be a positive integer. "):
        check_k(2.5, "top_k")
    with pytest.raises(
        ValueError,
        match=r"`every_n_epochs` must be a positive integer or None \(to analyse only at the end "
        r"of training\). Received: every_n_epochs=0",
    ):
        check_every_n_epochs(0)
    with pytest.raises(
        ValueError, match=r"`every_n_epochs` must be a positive integer. Received: every_n_epochs=0"
    ):
        check_every_n_epochs(0, allow_none=False)
    assert check_every_n_epochs(None) is None and check_every_n_epochs(np.int8(2)) == 2
