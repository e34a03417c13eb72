"""``fleet journal list|show|rm``: inspect and remove resumable workflows' journals.

Works against the configured journal store (``FLEET_STORE``: ``sqlite:PATH`` by default,
or the fleet's Redis), or the one ``--store`` names. Prompts and outputs are never shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import typer
from rich.table import Table

from ..checkpoint import WorkflowCheckpoint
from ..config import mask_url
from ..stores import CheckpointStore, open_store
from .app import app, console, settings

__all__ = ["journal_app"]

T = TypeVar("T")

journal_app = typer.Typer(
    help="Inspect and remove the journals of resumable workflows.", no_args_is_help=True
)
app.add_typer(journal_app, name="journal")

_STORE = typer.Option(
    None,
    "--store",
    help="Journal store: 'memory', 'sqlite:PATH' or a redis:// URL (default: FLEET_STORE).",
)
_WORKFLOW = typer.Argument(..., metavar="WORKFLOW_ID", help="The workflow id the journal is under.")


def _with_store(store_target: str | None, action: Callable[[CheckpointStore], Awaitable[T]]) -> T:
    config = settings(store=store_target)
    store = open_store(config.store, key_prefix=config.key_prefix)

    async def run() -> T:
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _where(store_target: str | None) -> str:
    return mask_url(settings(store=store_target).store)


def _stamp(ms: int) -> str:
    if ms <= 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def _table(checkpoint: WorkflowCheckpoint) -> Table:
    table = Table(
        title=(
            f"journal of workflow {checkpoint.workflow_id} "
            f"(schema {checkpoint.schema_version}, {len(checkpoint.steps)} completed steps)"
        ),
        title_justify="left",
    )
    for column in ("task id", "agent", "success", "tokens", "recorded"):
        table.add_column(column, justify="right" if column == "tokens" else "left")
    for record in sorted(checkpoint.steps, key=lambda r: (r.recorded_ms, r.task_id)):
        outcome = record.outcome
        table.add_row(
            record.task_id,
            outcome.agent,
            "yes" if outcome.success else "no",
            str(outcome.usage.total_tokens),
            _stamp(record.recorded_ms),
        )
    return table


@journal_app.command("list")
def list_journals(store: str | None = _STORE) -> None:
    """List the workflow ids that have a journal."""
    found = _with_store(store, lambda s: s.list_workflows())
    if not found:
        console.print(f"no journals in {_where(store)}", highlight=False)
        return
    for workflow_id in found:
        console.print(workflow_id, highlight=False, markup=False)


@journal_app.command("show")
def show(workflow_id: str = _WORKFLOW, store: str | None = _STORE) -> None:
    """Show a workflow's journaled steps: task id, agent, success, tokens, when recorded."""
    checkpoint = _with_store(store, lambda s: s.load(workflow_id))
    if checkpoint is None:
        console.print(
            f"no journal for workflow {workflow_id!r} in {_where(store)}", highlight=False
        )
        raise typer.Exit(1)
    console.print(_table(checkpoint))


@journal_app.command("rm")
def remove(
    workflow_id: str = _WORKFLOW,
    store: str | None = _STORE,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a workflow's journal (readable or not); its steps will run again next time."""
    if not yes:
        typer.confirm(
            f"Delete the journal of workflow {workflow_id!r} in {_where(store)}? Its completed "
            "steps will run again when the workflow is resumed",
            abort=True,
        )
    removed = _with_store(store, lambda s: s.delete(workflow_id))
    if not removed:
        console.print(
            f"no journal for workflow {workflow_id!r} in {_where(store)}", highlight=False
        )
        raise typer.Exit(1)
    console.print(f"deleted the journal of workflow {workflow_id!r}", highlight=False)
