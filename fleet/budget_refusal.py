"""Why a budget says no: the refusal of a reservation, its text, and the amount check.

:func:`refusal` turns a ledger's refused :class:`~fleet.ledgers.base.ReserveResult` into
the :class:`~fleet.errors.BudgetExhaustedError` a step fails with (which account, which
unit, how much was asked and how much is left); :func:`check_amount` rejects an amount
that is not a non-negative integer.
"""

from __future__ import annotations

from . import metrics
from .errors import BudgetError, BudgetExhaustedError
from .ledgers.base import ReserveResult
from .pricing import micros_to_usd

__all__ = ["check_amount", "exhausted_message", "refusal"]


def exhausted_message(consumed: int, limit: int | None, requested: int | None = None) -> str:
    """The refusal text: ``workflow token budget exhausted (<consumed> / <limit> tokens)``.

    When the account is not spent yet but the request is larger than what is left,
    the request size is added, so the user sees why a step was refused.
    """
    message = f"workflow token budget exhausted ({consumed} / {limit or 0} tokens)"
    if requested is not None and limit is not None and consumed < limit:
        message += (
            f"; the step asks for {requested} tokens and only {limit - consumed} are left "
            "(lower its max_tokens or raise the budget)"
        )
    return message


def refusal(
    result: ReserveResult, workflow_id: str, tokens: int, micros: int
) -> BudgetExhaustedError:
    """The error for a refused reservation: which account, which unit, and why."""
    metrics.budget_refused()
    state = result.blocked_state or result.state
    account = result.blocked_by or workflow_id
    whose = "workflow" if account == workflow_id else "account"
    if result.blocked_unit == "usd":
        consumed, limit, requested = state.consumed_micros, state.limit_micros, micros
        message = (
            f"{whose} {account!r} dollar budget exhausted (${micros_to_usd(consumed)} / "
            f"${micros_to_usd(limit or 0)})"
        )
        if limit is not None and consumed < limit:
            message += (
                f"; the call's worst case is ${micros_to_usd(requested)} and only "
                f"${micros_to_usd(limit - consumed)} is left (lower max_tokens or raise the "
                "budget)"
            )
        unit = "usd"
    else:
        consumed, limit, requested = state.consumed, state.limit, tokens
        message = exhausted_message(consumed, limit, requested)
        if account != workflow_id:
            message = message.replace("workflow token budget", f"account {account!r} token budget")
        unit = "tokens"
    return BudgetExhaustedError(
        message, consumed=consumed, limit=limit, requested=requested, unit=unit, account=account
    )


def check_amount(value: int, what: str) -> None:
    """``value`` must be a non-negative integer (tokens or micro-dollars)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BudgetError(f"{what} must be a non-negative integer, got {value!r}")
