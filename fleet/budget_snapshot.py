"""What a workflow budget (or a shared account) looks like at one moment.

:class:`BudgetSnapshot` is what :meth:`fleet.budget.WorkflowBudget.snapshot`, ``fleet budget
show`` and the dashboard report: tokens and dollars consumed, reserved, limited and left.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import Field, model_validator

from .ledgers.base import LedgerState
from .pricing import micros_to_usd
from .spec import FleetModel

__all__ = ["BudgetSnapshot"]


class BudgetSnapshot(FleetModel):
    """A workflow budget (or a shared account) at one moment, in tokens and in dollars.

    Money fields are :class:`~decimal.Decimal` dollars with six decimals (exact: the
    ledger counts integer micro-dollars); in JSON they are strings (``"1.250000"``).
    ``remaining_*`` and ``is_exhausted`` are derived from the other fields when not given.
    """

    consumed_tokens: int = Field(ge=0)
    """Tokens charged by settled steps."""
    reserved_tokens: int = Field(default=0, ge=0)
    """Tokens held by steps in flight (live reservations)."""
    limit_tokens: int | None = Field(default=None, ge=0)
    """The token limit; ``None`` means uncapped."""
    remaining_tokens: int | None = None
    """``limit - consumed - reserved`` (never below 0); ``None`` when uncapped."""
    is_exhausted: bool = False
    """A limit is set and consumed has reached it, in tokens or in dollars (a limit of 0
    is exhausted from the start)."""
    consumed_usd: Decimal = Field(default=Decimal(0), ge=0)
    """Dollars charged by settled model calls."""
    reserved_usd: Decimal = Field(default=Decimal(0), ge=0)
    """Dollars held by model calls in flight (their worst case)."""
    limit_usd: Decimal | None = Field(default=None, ge=0)
    """The dollar limit; ``None`` means uncapped."""
    remaining_usd: Decimal | None = None
    """``limit - consumed - reserved`` in dollars (never below 0); ``None`` when uncapped."""

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        limit = data.get("limit_tokens")
        consumed = data.get("consumed_tokens", 0)
        reserved = data.get("reserved_tokens", 0)
        exhausted = False
        if isinstance(consumed, int) and isinstance(reserved, int):
            if data.get("remaining_tokens") is None and isinstance(limit, int):
                data["remaining_tokens"] = max(limit - consumed - reserved, 0)
            exhausted = isinstance(limit, int) and consumed >= limit
        try:
            limit_usd = None if data.get("limit_usd") is None else Decimal(data["limit_usd"])
            consumed_usd = Decimal(data.get("consumed_usd", 0))
            reserved_usd = Decimal(data.get("reserved_usd", 0))
        except (ArithmeticError, TypeError, ValueError):
            pass  # field validation reports it
        else:
            if limit_usd is not None:
                if data.get("remaining_usd") is None:
                    data["remaining_usd"] = max(limit_usd - consumed_usd - reserved_usd, 0)
                exhausted = exhausted or consumed_usd >= limit_usd
        if "is_exhausted" not in data:
            data["is_exhausted"] = exhausted
        return data

    @classmethod
    def from_state(cls, state: LedgerState, *, limit_tokens: int | None = None) -> BudgetSnapshot:
        """The snapshot of a ledger account (``limit_tokens`` when it stores none yet)."""
        return cls(
            consumed_tokens=state.consumed,
            reserved_tokens=state.reserved,
            limit_tokens=state.limit if state.limit_set else limit_tokens,
            consumed_usd=micros_to_usd(state.consumed_micros),
            reserved_usd=micros_to_usd(state.reserved_micros),
            limit_usd=None if state.limit_micros is None else micros_to_usd(state.limit_micros),
        )

    def __str__(self) -> str:
        limit = "uncapped" if self.limit_tokens is None else f"{self.limit_tokens}"
        text = (
            f"{self.consumed_tokens} consumed + {self.reserved_tokens} reserved of {limit} tokens"
            + ("" if self.remaining_tokens is None else f" ({self.remaining_tokens} left)")
        )
        if self.limit_usd is not None or self.consumed_usd or self.reserved_usd:
            dollars = "uncapped" if self.limit_usd is None else f"${self.limit_usd}"
            text += (
                f"; ${self.consumed_usd} consumed + ${self.reserved_usd} reserved of {dollars}"
                + ("" if self.remaining_usd is None else f" (${self.remaining_usd} left)")
            )
        return text + (" — exhausted" if self.is_exhausted else "")
