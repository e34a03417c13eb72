"""``fleet cancel ROOT_ID``: stop a running workflow from any terminal.

The run is found the way ``fleet status`` finds it (:func:`fleet.runstatus.locate_run`), and
cancelled on the board it registered on: the journal's SQLite file for a local run on the
embedded default, the fleet's Redis for a run on Celery or with a Redis journal.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from ..config import FleetSettings
from ..errors import FleetError
from ..runner import RunPlaces, check_reachable, plan_run
from ..runs import CancelNotice, RunRecord, RunRegistry, open_run_registry
from ..runstatus import Located, locate_run
from .app import app, settings
from .progress import say

__all__ = ["ExecutorOption", "RedisUrlOption", "board_at", "cancel", "find_run", "latest_run"]

DEFAULT_REASON = "cancelled with fleet cancel"

RedisUrlOption = Annotated[
    str | None, typer.Option("--redis-url", help="The fleet's Redis (FLEET_REDIS_URL).")
]
"""``--redis-url`` of the commands that find a run (``fleet cancel``, ``fleet answer``)."""
ExecutorOption = Annotated[
    str, typer.Option("--executor", help="The executor the run used, as for `fleet run`.")
]
"""``--executor`` of the commands that find a run (``fleet cancel``, ``fleet answer``)."""


def board_at(config: FleetSettings, places: RunPlaces) -> RunRegistry:
    """The run registry (the cancel board) a run with these places registered on."""
    return open_run_registry(places.store, redis_url=places.ledger, key_prefix=config.key_prefix)


def find_run(
    config: FleetSettings, root_id: str, *, executor: str, explicit: bool, redis_given: bool
) -> Located:
    """:func:`~fleet.runstatus.locate_run`, after proving the Redis it reads answers.

    One quick try per server (2 s), so a wrong ``--redis-url`` or ``--store`` is one line
    at once rather than a long wait. ``redis_given``: ``--redis-url`` was passed, so it is
    checked whatever the run's places.
    """
    named = "--redis-url (FLEET_REDIS_URL)"
    shown = "celery" if redis_given else executor
    check_reachable(
        config, plan_run(config, executor=executor), executor=shown, redis_setting=named
    )
    located = locate_run(config, root_id, executor=executor, explicit=explicit)
    check_reachable(config, located.places, redis_setting=named)
    return located


async def _request(
    board: RunRegistry, root_id: str, reason: str
) -> tuple[CancelNotice | None, RunRecord | None]:
    """Cancel the live run; the record is returned too when the run was not live.

    An abandoned run (its host stopped heartbeating) is marked cancelled all the same, so
    workers drop its queued steps, and its record comes back to say nothing else stops.
    """
    try:
        before = await board.latest(root_id)
        if before is not None and before.abandoned:
            why = f"{reason} (its host was already gone)"
            notice = await board.request(root_id, why, run_id=before.run_id)
            return notice, before
        notice = await board.request(root_id, reason)
        return notice, (None if notice is not None else await board.latest(root_id))
    finally:
        await board.close()


async def latest_run(board: RunRegistry, root_id: str) -> RunRecord | None:
    """The latest run of ``root_id`` on ``board`` (the board is closed after)."""
    try:
        return await board.latest(root_id)
    finally:
        await board.close()


@app.command()
def cancel(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why; shown by `fleet status` and `fleet watch`.")
    ] = DEFAULT_REASON,
    store: Annotated[
        str | None,
        typer.Option("--store", help="The run's journal, as given to `fleet run` (FLEET_STORE)."),
    ] = None,
    redis_url: RedisUrlOption = None,
    executor: ExecutorOption = "local",
) -> None:
    """Cancel a running workflow: nothing new runs, running steps stop, spent tokens settle.

    Exits 0 once the cancel is recorded (steps stop within about 2 s), 1 when no run of
    ROOT_ID is going on (unknown, finished or already cancelled): nothing is changed then.
    A run whose host died (``abandoned``: no heartbeat) exits 1 too; it is marked
    cancelled so workers drop its queued steps.
    """
    config = settings(store=store, redis_url=redis_url)
    explicit = store is not None or redis_url is not None
    try:
        located = find_run(
            config, root_id, executor=executor, explicit=explicit, redis_given=bool(redis_url)
        )
        board = board_at(config, located.places)
        notice, record = asyncio.run(_request(board, root_id, reason or DEFAULT_REASON))
    except FleetError as error:
        say(f"cannot cancel workflow {root_id}: {error}")
        raise typer.Exit(1) from None
    where = located.places.describe()
    if record is not None and record.abandoned:
        say(
            f"workflow {root_id} is not running: {record.describe()}; no host runs its steps, "
            "so nothing is stopped"
            + (
                "; it is marked cancelled, and workers drop any of its queued steps"
                if notice is not None
                else ""
            )
            + f". Re-run with --root-id {root_id} to resume from its journal"
        )
        raise typer.Exit(1)
    if notice is not None:
        say(
            f"cancelled workflow {root_id} (run {notice.run_id}; {where}): {notice.reason}; "
            "running steps stop within about 2 s"
        )
        return
    if record is not None:
        say(f"workflow {root_id} is not running: {record.describe()}; nothing changed")
    elif located.places.store == "memory" and located.places.ledger is None:
        say(
            f"no running workflow {root_id} found: a local run with a memory journal can only "
            "be stopped with Ctrl-C in its own terminal"
        )
    else:
        say(f"no running workflow {root_id} found (looked in: {'; '.join(located.looked)})")
    raise typer.Exit(1)
