"""``fleet budget show|set``: inspect and change a workflow's token budget in Redis."""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table

from ..budget import BudgetSnapshot
from ..ledgers import HeldReservation, LedgerState, RedisLedger
from .app import app, console, settings

__all__ = ["budget_app"]

budget_app = typer.Typer(
    help="Inspect and change workflow token budgets (kept in Redis, shared by the fleet).",
    no_args_is_help=True,
)
app.add_typer(budget_app, name="budget")

_UNCAPPED = {"none", "uncapped", "unlimited"}


def _ledger(redis_url: str | None, key_prefix: str | None) -> RedisLedger:
    config = settings(redis_url=redis_url, key_prefix=key_prefix)
    return RedisLedger(config.redis_url, key_prefix=config.key_prefix)


def _snapshot(state: LedgerState) -> BudgetSnapshot:
    return BudgetSnapshot(
        consumed_tokens=state.consumed, reserved_tokens=state.reserved, limit_tokens=state.limit
    )


def _print(workflow_id: str, state: LedgerState, held: list[HeldReservation]) -> None:
    snapshot = _snapshot(state)
    table = Table(
        title=f"budget of workflow {workflow_id}", title_justify="left", show_header=False
    )
    table.add_row(
        "limit", "uncapped" if snapshot.limit_tokens is None else f"{snapshot.limit_tokens}"
    )
    table.add_row("consumed", str(snapshot.consumed_tokens))
    table.add_row("reserved", f"{snapshot.reserved_tokens} ({len(held)} in flight)")
    remaining = snapshot.remaining_tokens
    table.add_row("remaining", "unlimited" if remaining is None else str(remaining))
    table.add_row("exhausted", "yes" if snapshot.is_exhausted else "no")
    console.print(table)
    if held:
        leases = Table(title="in-flight reservations", title_justify="left")
        for column in ("reservation", "holder", "tokens", "lease left (s)"):
            leases.add_column(column)
        for row in held:
            leases.add_row(row.id, row.holder, str(row.tokens), f"{row.expires_in_s:.1f}")
        console.print(leases)


_REDIS_URL = typer.Option(None, "--redis-url", help="Redis holding the ledger (FLEET_REDIS_URL).")
_KEY_PREFIX = typer.Option(None, "--key-prefix", help="Key prefix (FLEET_KEY_PREFIX).")


@budget_app.command("show")
def show(
    workflow_id: str = typer.Argument(
        ..., metavar="WORKFLOW_ID", help="The workflow whose budget to show."
    ),
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
) -> None:
    """Show a workflow's limit, consumed and reserved tokens, and live reservations."""
    ledger = _ledger(redis_url, key_prefix)

    async def read() -> tuple[LedgerState, list[HeldReservation]]:
        try:
            return await ledger.state(workflow_id), await ledger.reservations(workflow_id)
        finally:
            await ledger.close()

    state, held = asyncio.run(read())
    if not state.limit_set and state.consumed == 0 and not held:
        console.print(
            f"no budget recorded for workflow {workflow_id!r} under key prefix "
            f"{ledger.key_prefix!r}; check the id, --key-prefix and --redis-url",
            highlight=False,
        )
        raise typer.Exit(1)
    _print(workflow_id, state, held)


@budget_app.command("set")
def set_limit(
    workflow_id: str = typer.Argument(
        ..., metavar="WORKFLOW_ID", help="The workflow whose limit to change."
    ),
    limit: str = typer.Argument(
        ..., metavar="LIMIT", help="New limit in tokens, or 'none' for uncapped."
    ),
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
) -> None:
    """Set a workflow's token limit; running hosts and workers see it at once."""
    new_limit: int | None
    if limit.strip().lower() in _UNCAPPED:
        new_limit = None
    else:
        try:
            new_limit = int(limit)
        except ValueError:
            raise typer.BadParameter(
                f"{limit!r} is not a number of tokens; give an integer >= 0 or 'none'",
                param_hint="LIMIT",
            ) from None
        if new_limit < 0:
            raise typer.BadParameter(
                f"{new_limit} is negative; give an integer >= 0 or 'none'", param_hint="LIMIT"
            )
    ledger = _ledger(redis_url, key_prefix)

    async def write() -> tuple[LedgerState, list[HeldReservation]]:
        try:
            return await ledger.set_limit(workflow_id, new_limit), await ledger.reservations(
                workflow_id
            )
        finally:
            await ledger.close()

    state, held = asyncio.run(write())
    _print(workflow_id, state, held)
