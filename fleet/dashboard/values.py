"""Lenient readers of the values a run log holds (strings, or absent): never raising."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["float_or_none", "int_or_zero", "money_or_none", "str_or_none"]


def float_or_none(value: Any) -> float | None:
    """``value`` as a float, or ``None``."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def int_or_zero(value: Any) -> int:
    """``value`` as an int, or 0."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def str_or_none(value: Any) -> str | None:
    """``value`` as a string, or ``None``."""
    return None if value is None else str(value)


def money_or_none(value: Any) -> str | None:
    """``value`` as an exact decimal string (dollars), or ``None``."""
    if value is None:
        return None
    try:
        return str(Decimal(str(value)))
    except InvalidOperation:
        return None
