"""Shared accounts above workflows: names, parents and the chain a reservation takes.

A workflow's budget may name parents (``WorkflowBudget(parents=["team:research"])``);
an account may have parents of its own (``fleet budget set team:research --parent
org:acme``). Every reservation is taken from the workflow and from every ancestor at
once (one atomic ledger operation), so no number of workflows on any number of hosts
overspends an account. This module checks names, creates and changes accounts, and
resolves a workflow's ancestors, refusing unknown accounts and cycles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from .errors import BudgetError
from .ledgers.base import KEEP, BudgetLedger, Keep, LedgerState
from .pricing import usd_to_micros

__all__ = ["ACCOUNT_NAME", "check_account_name", "resolve_ancestors", "set_account"]

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
"""What an account name may be: letters, digits and ``_ . : @ -``, at most 128, starting
with a letter or digit (``team:research``, ``org@acme``)."""


def check_account_name(name: Any) -> str:
    """Return ``name`` if it is a valid account name.

    Raises:
        BudgetError: it is not a string of the allowed characters.
    """
    if not isinstance(name, str) or ACCOUNT_NAME.fullmatch(name) is None:
        raise BudgetError(
            f"account name {name!r} is not allowed: use letters, digits and _ . : @ - "
            "(at most 128, starting with a letter or digit), e.g. 'team:research'",
            account=name if isinstance(name, str) else None,
        )
    return name


def check_tokens_limit(value: Any, what: str) -> int | None:
    """``value`` if it is ``None`` or a non-negative integer.

    Raises:
        BudgetError: anything else (negative, a float, a bool, not finite).
    """
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BudgetError(f"{what} must be a non-negative integer or None, got {value!r}")
    return value


def usd_limit_micros(value: Decimal | int | float | str | None, what: str) -> int | None:
    """A dollar limit in micro-dollars (``None`` stays uncapped); see ``usd_to_micros``."""
    return None if value is None else usd_to_micros(value, what)


async def resolve_ancestors(
    ledger: BudgetLedger, account_id: str, parents: Sequence[str]
) -> tuple[str, ...]:
    """Every account above ``account_id`` given its ``parents``, nearest first, once each.

    Raises:
        BudgetError: a parent is not a valid name or does not exist (create it with
            ``fleet budget set``), or the parents form a cycle.
    """
    order: list[str] = []
    done: set[str] = set()

    async def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise BudgetError(
                f"budget parents form a cycle: {cycle}; an account cannot be its own ancestor",
                account=name,
            )
        if name in done:
            return
        check_account_name(name)
        state = await ledger.state(name)
        if not state.exists:
            raise BudgetError(
                f"budget account {name!r} (a parent of {path[-1]!r}) does not exist; create it "
                f"with `fleet budget set {name} --usd LIMIT` (or --tokens), or fix the name",
                account=name,
            )
        order.append(name)
        for parent in state.parents:
            await visit(parent, [*path, name])
        done.add(name)

    for parent in parents:
        await visit(parent, [account_id])
    return tuple(order)


async def set_account(
    ledger: BudgetLedger,
    name: str,
    *,
    limit_tokens: int | None | Keep = KEEP,
    limit_usd: Decimal | int | float | str | None | Keep = KEEP,
    parents: Sequence[str] | Keep = KEEP,
) -> LedgerState:
    """Create or change a shared account (what ``fleet budget set`` does).

    A new account without a limit is uncapped in that unit (it still counts).

    Raises:
        BudgetError: a bad name or limit, an unknown parent, or a parent cycle.
    """
    check_account_name(name)
    tokens = (
        limit_tokens
        if isinstance(limit_tokens, Keep)
        else check_tokens_limit(limit_tokens, "the token limit")
    )
    micros = (
        limit_usd
        if isinstance(limit_usd, Keep)
        else usd_limit_micros(limit_usd, "the dollar limit")
    )
    if not isinstance(parents, Keep):
        for parent in parents:
            check_account_name(parent)
        await resolve_ancestors(ledger, name, parents)  # unknown parents, cycles
    current = await ledger.state(name)
    if not current.limit_set and isinstance(tokens, Keep):
        tokens = None
    if not current.limit_micros_set and isinstance(micros, Keep):
        micros = None
    return await ledger.configure(name, limit=tokens, limit_micros=micros, parents=parents)
