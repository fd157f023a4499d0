"""The one int/number checker: what it accepts, what it refuses, and the message form."""

from __future__ import annotations

import math

import pytest

from catome_export.checks import check_float, check_int, check_ints, is_int, is_number
from catome_export.errors import CatomeError


@pytest.mark.parametrize("value, lo, hi, message", [
    (0, 1, None, "steps must be an int >= 1, got 0"),
    (16, 17, 21, "steps must be an int in 17..21, got 16"),
    (22, 17, 21, "steps must be an int in 17..21, got 22"),
    (10, None, 9, "steps must be an int <= 9, got 10"),
    (True, None, None, "steps must be an int, got True"),
    (2.0, 1, None, "steps must be an int >= 1, got 2.0"),
    ("3", 1, None, "steps must be an int >= 1, got '3'"),
])
def test_check_int_refuses_with_the_name_and_the_range(value, lo, hi, message):
    with pytest.raises(CatomeError) as info:
        check_int("steps", value, lo, hi)
    assert str(info.value) == message


def test_check_int_returns_the_value_at_both_ends_and_puts_the_hint_before_the_value():
    assert check_int("opset", 17, 17, 21) == 17 and check_int("opset", 21, 17, 21) == 21
    assert check_int("seed", -5) == -5
    with pytest.raises(CatomeError) as info:
        check_int("r_multiple", 0, 1, hint="1: off")
    assert str(info.value) == "r_multiple must be an int >= 1 (1: off), got 0"


def test_check_ints_names_the_whole_sequence():
    assert check_ints("cache branches", [0, 2], 0) == (0, 2)
    for bad in ([0, -1], [0, True], "01", 3):
        with pytest.raises(CatomeError, match=r"^cache branches must be ints >= 0, got "):
            check_ints("cache branches", bad, 0)


@pytest.mark.parametrize("value", [True, math.nan, math.inf, -math.inf, "0.5", None, 10 ** 400])
def test_check_float_refuses_bool_nan_infinite_and_non_numbers(value):
    with pytest.raises(CatomeError, match=r"^x must be a finite number, got "):
        check_float("x", value)


@pytest.mark.parametrize("kwargs, value, message", [
    ({"lo": -1, "hi": 1}, 1.5, "threshold must be a number in [-1, 1], got 1.5"),
    ({"lo": 0, "hi": 1, "hi_open": True}, 1.0, "threshold must be a number in [0, 1), got 1.0"),
    ({"lo": 0, "hi": 1000, "lo_open": True, "unit": "GB"}, 0, "threshold must be a number of GB in (0, 1000], got 0"),
    ({"lo": 0, "lo_open": True, "unit": "seconds"}, 0, "threshold must be a number of seconds > 0, got 0"),
    ({"lo": 1, "lo_open": True}, 1, "threshold must be a number > 1, got 1"),
    ({"hi": 0}, 0.5, "threshold must be a number <= 0, got 0.5"),
    ({"lo": 0, "hi": 1}, math.nan, "threshold must be a number in [0, 1], got nan"),
])
def test_check_float_names_the_range(kwargs, value, message):
    with pytest.raises(CatomeError) as info:
        check_float("threshold", value, **kwargs)
    assert str(info.value) == message


def test_check_float_returns_a_float_and_takes_infinity_only_when_asked():
    assert check_float("t", 1, 0, 1) == 1.0 and isinstance(check_float("t", 1, 0, 1), float)
    assert check_float("t", math.inf, 0, finite=False) == math.inf
    with pytest.raises(CatomeError, match="got nan"):
        check_float("t", math.nan, 0, finite=False)  # NaN is never a number


def test_predicates():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False) and not is_number(math.nan)
    assert not is_number(math.inf) and is_number(math.inf, finite=False)
