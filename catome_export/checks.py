"""One checker for the ints and numbers a user passes in.

Every check raises :class:`~catome_export.errors.CatomeError` with one message
form that names the value and its valid range::

    steps must be an int >= 1, got 0
    opset must be an int in 17..21, got 16
    threshold must be a number in [-1, 1], got nan
    --max-stage-gb must be a number of GB in (0, 1000] (default 2), got 0

An int is an ``int`` that is not a ``bool``; a number is an ``int`` or a
``float`` (not a ``bool``), finite unless the caller says otherwise. NaN is
never a valid number.
"""

from __future__ import annotations

import math
from typing import TypeGuard

from catome_export.errors import CatomeError

__all__ = ["check_float", "check_int", "check_ints", "float_range", "int_range", "is_int", "is_number"]


def is_int(value: object) -> TypeGuard[int]:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object, *, finite: bool = True) -> TypeGuard[int | float]:
    """True for an ``int`` or ``float`` that is not a ``bool`` nor NaN (nor infinite, with ``finite``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return True
    return math.isfinite(value) if finite else not math.isnan(value)


def int_range(lo: int | None, hi: int | None) -> str:
    """The valid range of an int as the messages write it: ``>= 1``, ``<= 9``, ``in 1..9`` (empty: any int)."""
    if lo is not None and hi is not None:
        return f"in {lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else ""


def float_range(lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False) -> str:
    """The valid range of a number: ``in [0, 1]``, ``in (0, 1000]``, ``>= 0``, ``> 1`` (empty: any)."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def _message(name: str, kind: str, bound: str, hint: str, value: object) -> str:
    bound = f" {bound}" if bound else ""
    hint = f" ({hint})" if hint else ""
    return f"{name} must be {kind}{bound}{hint}, got {value!r}"


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None, *, hint: str = "") -> int:
    """``value`` if it is an int in ``[lo, hi]`` (either end may be open-ended), else a CatomeError.

    The message reads ``"{name} must be an int {range} ({hint}), got {value!r}"``.
    """
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CatomeError(_message(name, "an int", int_range(lo, hi), hint, value))
    return value


def check_ints(name: str, values: object, lo: int | None = None, hi: int | None = None, *,
               hint: str = "") -> tuple[int, ...]:
    """Every item of a sequence as an int in ``[lo, hi]``; the message names the whole sequence.

    ``"{name} must be ints {range} ({hint}), got [...]"``; a string or a non-sequence is refused too.
    """
    if not isinstance(values, (list, tuple)):
        raise CatomeError(_message(name, "ints", int_range(lo, hi), hint, values))
    items: list[int] = []
    for v in values:
        if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise CatomeError(_message(name, "ints", int_range(lo, hi), hint, list(values)))
        items.append(v)
    return tuple(items)


def check_float(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, finite: bool = True, unit: str = "",
                hint: str = "") -> float:
    """``value`` as a float if it is a number in the range, else a CatomeError.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``; a bool, NaN and (with ``finite``, the
    default) an infinite value are refused. ``unit`` names what the number counts (``"seconds"``,
    ``"GB"``). The message reads ``"{name} must be a number [of {unit}] {range} ({hint}), got {value!r}"``.
    """
    v = math.nan
    if is_number(value, finite=finite):
        try:
            v = float(value)
        except OverflowError:  # an int too large for a float
            v = math.nan
    ok = not math.isnan(v) and (finite is False or math.isfinite(v))
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        bound = float_range(lo, hi, lo_open=lo_open, hi_open=hi_open)
        kind = ("a finite number" if finite and not bound else "a number") + (f" of {unit}" if unit else "")
        raise CatomeError(_message(name, kind, bound, hint, value))
    return v
