"""``fleet budget show|set``: inspect and change workflow budgets and shared accounts.

A workflow's budget and a shared account (``team:research``) live in the same ledger:
``fleet budget set team:research --usd 100 --tokens 5000000`` creates or changes an
account, ``--parent org:acme`` nests it, and ``fleet budget show team:research`` lists
what each workflow under it consumed. The ledger is the one ``fleet run`` with the same
``--store`` and ``--executor`` uses: on the embedded default a SQLite file beside the
journal (``.fleet/ledger.db``), on a fleet (``--executor celery`` or a Redis store) Redis;
``--redis-url`` names a Redis ledger outright. ``fleet budget show`` of a workflow, with
no ``--store``, finds its ledger the way ``fleet status`` does (the run index first).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal, InvalidOperation

import typer
from rich.table import Table

from ..accounts import set_account
from ..budget import BudgetSnapshot
from ..errors import BudgetError
from ..ledgers import (
    KEEP,
    BudgetLedger,
    ChildUsage,
    HeldReservation,
    Keep,
    LedgerState,
    RedisLedger,
)
from ..pricing import micros_to_usd
from ..runner import open_ledger, plan_run
from ..runstatus import locate_run
from .app import app, console, settings

__all__ = ["budget_app"]

budget_app = typer.Typer(
    help="Inspect and change budgets (tokens and dollars) of workflows and shared accounts: "
    "beside the SQLite journal on the embedded default, in Redis on a fleet.",
    no_args_is_help=True,
)
app.add_typer(budget_app, name="budget")

_UNCAPPED = {"none", "uncapped", "unlimited"}


def _ledger(
    redis_url: str | None,
    key_prefix: str | None,
    store: str | None,
    executor: str,
    *,
    run: str | None = None,
) -> BudgetLedger:
    """The ledger ``fleet run`` with these options uses (``--redis-url``: that Redis).

    ``run``: a workflow id to find the way ``fleet status`` does when no place is given
    (the run index knows where a ``--executor celery`` run kept its budget).
    """
    config = settings(redis_url=redis_url, key_prefix=key_prefix, store=store)
    if redis_url is not None:
        return RedisLedger(config.redis_url, key_prefix=config.key_prefix)
    places = plan_run(config, executor=executor)
    if run is not None and store is None:
        located = locate_run(config, run, executor=executor)
        places = located.places if located.found else places
    ledger = open_ledger(config, places)
    if ledger is None:
        raise BudgetError(
            f"journal {config.store!r} keeps no ledger; give --store sqlite:PATH (the "
            "default) or a redis:// URL, or --redis-url"
        )
    return ledger


def _print(
    name: str, state: LedgerState, held: list[HeldReservation], children: list[ChildUsage]
) -> None:
    snapshot = BudgetSnapshot.from_state(state)
    table = Table(title=f"budget of {name}", title_justify="left")
    for column in ("", "tokens", "dollars"):
        table.add_column(column)

    def limit(value: object) -> str:
        return "uncapped" if value is None else str(value)

    table.add_row("limit", limit(snapshot.limit_tokens), limit(snapshot.limit_usd))
    table.add_row("consumed", str(snapshot.consumed_tokens), str(snapshot.consumed_usd))
    table.add_row(
        "reserved",
        f"{snapshot.reserved_tokens} ({len(held)} in flight)",
        str(snapshot.reserved_usd),
    )
    table.add_row(
        "remaining",
        "unlimited" if snapshot.remaining_tokens is None else str(snapshot.remaining_tokens),
        "unlimited" if snapshot.remaining_usd is None else str(snapshot.remaining_usd),
    )
    table.add_row("exhausted", "yes" if snapshot.is_exhausted else "no", "")
    console.print(table)
    if state.parents:
        console.print("parents: " + ", ".join(state.parents), highlight=False)
    if children:
        rows = Table(title="consumption by child workflow", title_justify="left")
        for column in ("workflow", "tokens", "dollars"):
            rows.add_column(column)
        for child in children:
            rows.add_row(child.workflow_id, str(child.tokens), str(micros_to_usd(child.micros)))
        console.print(rows)
    if held:
        leases = Table(title="in-flight reservations", title_justify="left")
        for column in ("reservation", "holder", "tokens", "dollars", "lease left (s)"):
            leases.add_column(column)
        for row in held:
            leases.add_row(
                row.id,
                row.holder,
                str(row.tokens),
                str(micros_to_usd(row.micros)),
                f"{row.expires_in_s:.1f}",
            )
        console.print(leases)


async def _read(
    ledger: BudgetLedger, name: str
) -> tuple[LedgerState, list[HeldReservation], list[ChildUsage]]:
    return await ledger.state(name), await ledger.reservations(name), await ledger.children(name)


_REDIS_URL = typer.Option(None, "--redis-url", help="Redis holding the ledger (FLEET_REDIS_URL).")
_KEY_PREFIX = typer.Option(None, "--key-prefix", help="Key prefix (FLEET_KEY_PREFIX).")
_PARENT = typer.Option(None, "--parent", help="An account above this one (repeat for several).")
_STORE = typer.Option(
    None,
    "--store",
    help="The runs' journal (FLEET_STORE): the ledger is beside it or in its Redis.",
)
_EXECUTOR = typer.Option(
    "local", "--executor", help="The runs' executor: 'celery' keeps budgets in FLEET_REDIS_URL."
)


@budget_app.command("show")
def show(
    name: str = typer.Argument(
        ..., metavar="WORKFLOW_OR_ACCOUNT", help="The workflow id or account name to show."
    ),
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
    store: str | None = _STORE,
    executor: str = _EXECUTOR,
) -> None:
    """Show limits, consumption, reservations and (for an account) its child workflows."""
    ledger = _ledger(redis_url, key_prefix, store, executor, run=name)

    async def read() -> tuple[LedgerState, list[HeldReservation], list[ChildUsage]]:
        try:
            return await _read(ledger, name)
        finally:
            await ledger.close()

    state, held, children = asyncio.run(read())
    if not state.exists and state.consumed == 0 and not held and not children:
        console.print(
            f"no budget recorded for {name!r} in {ledger!r}; check the id, --store, "
            "--executor, --key-prefix and --redis-url",
            highlight=False,
        )
        raise typer.Exit(1)
    _print(name, state, held, children)


def _tokens(text: str | None, hint: str) -> int | None | Keep:
    if text is None:
        return KEEP
    if text.strip().lower() in _UNCAPPED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a number of tokens; give an integer >= 0 or 'none'",
            param_hint=hint,
        ) from None
    if value < 0:
        raise typer.BadParameter(
            f"{value} is negative; give an integer >= 0 or 'none'", param_hint=hint
        )
    return value


def _dollars(text: str | None) -> Decimal | None | Keep:
    if text is None:
        return KEEP
    if text.strip().lower() in _UNCAPPED:
        return None
    try:
        return Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise typer.BadParameter(
            f"{text!r} is not a number of dollars; give e.g. 100 or 2.50, or 'none'",
            param_hint="--usd",
        ) from None


@budget_app.command("set")
def set_limit(
    name: str = typer.Argument(
        ..., metavar="WORKFLOW_OR_ACCOUNT", help="The workflow id or account name to change."
    ),
    limit: str | None = typer.Argument(
        None, metavar="[LIMIT]", help="New token limit (same as --tokens), or 'none'."
    ),
    tokens: str | None = typer.Option(
        None, "--tokens", help="Token limit, or 'none' for uncapped."
    ),
    usd: str | None = typer.Option(
        None, "--usd", help="Dollar limit (e.g. 100 or 2.50), or 'none' for uncapped."
    ),
    parent: list[str] | None = _PARENT,
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
    store: str | None = _STORE,
    executor: str = _EXECUTOR,
) -> None:
    """Create or change a budget; running hosts and workers see new limits at once.

    A new shared account without a limit in some unit is uncapped in it (it still
    counts). Parents must exist, and may not form a cycle.
    """
    if limit is not None and tokens is not None:
        raise typer.BadParameter("give the token limit once: LIMIT or --tokens", param_hint="LIMIT")
    new_tokens = _tokens(limit if limit is not None else tokens, "LIMIT/--tokens")
    new_usd = _dollars(usd)
    ledger = _ledger(redis_url, key_prefix, store, executor)

    async def write() -> tuple[LedgerState, list[HeldReservation], list[ChildUsage]]:
        try:
            if parent is None and isinstance(new_usd, Keep) and not isinstance(new_tokens, Keep):
                # A token limit alone: as before accounts existed (any workflow id).
                await ledger.configure(name, limit=new_tokens)
            else:
                await set_account(
                    ledger,
                    name,
                    limit_tokens=new_tokens,
                    limit_usd=new_usd,
                    parents=KEEP if parent is None else parent,
                )
            return await _read(ledger, name)
        finally:
            await ledger.close()

    try:
        state, held, children = asyncio.run(write())
    except BudgetError as error:
        console.print(f"error: {error}", highlight=False)
        raise typer.Exit(2) from None
    _print(name, state, held, children)
