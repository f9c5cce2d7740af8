"""Argument checks shared by fastrp's modules: each raises ``ValueError`` naming the argument and
what was expected."""

from __future__ import annotations

from typing import Optional

__all__ = ["int_at_least", "optional_int", "float_in"]


def int_at_least(name: str, value, minimum: int) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def optional_int(name: str, value, minimum: int) -> Optional[int]:
    """None, or :func:`int_at_least`."""
    return None if value is None else int_at_least(name, value, minimum)


def float_in(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    """``float(value)`` when it is a number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        (lo < value if lo_open else lo <= value) and value <= hi
    ):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be a float in {bracket}{lo}, {hi}], got {value!r}")
    return float(value)
