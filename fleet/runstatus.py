"""Finding a run again by its root id, and reading its status (``fleet status``, ``watch``).

- :func:`locate_run` finds the newest run of a root id: the places :func:`fleet.runner.
  plan_run` gives for the same settings and options first (so it looks where ``fleet run``
  wrote), then the local run index ``.fleet/runs.db`` that every ``fleet run`` writes
  (:mod:`fleet.runs.index`);
- :func:`read_status` reads its journal, its log and its budget into a :class:`RunStatus`;
- :func:`open_reader` opens its event log for ``fleet watch``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from .budget import BudgetSnapshot
from .config import FleetSettings, mask_url
from .errors import CheckpointError, ConfigError
from .runlog import LogReader, open_log_reader
from .runner import REDIS_SCHEMES, RunPlaces, plan_run
from .runs.index import indexed
from .runsummary import RunSummary, summary_at
from .stores import CheckpointStore, open_store

__all__ = [
    "Located",
    "PhaseRow",
    "RunStatus",
    "locate_run",
    "open_reader",
    "read_status",
]


@dataclass(frozen=True)
class PhaseRow:
    """One phase journal of a run."""

    name: str
    steps: int
    """Steps journaled (completed and kept for a resume)."""
    last_recorded: float | None
    """Epoch seconds of the newest record."""
    error: str | None = None
    """Why the journal could not be read."""


@dataclass
class RunStatus:
    """What ``fleet status`` shows of one root id."""

    root_id: str
    places: RunPlaces
    phases: list[PhaseRow] = field(default_factory=list)
    summary: RunSummary | None = None
    budget: BudgetSnapshot | None = None
    budget_note: str | None = None
    """Why no budget is shown (no budget, or the ledger cannot be read)."""
    limits: list[str] = field(default_factory=list)
    """Each provider limit of the agents file with its current use (a fleet run only)."""

    @property
    def known(self) -> bool:
        """Whether anything of this root id was found."""
        return bool(self.phases) or self.summary is not None


@dataclass(frozen=True)
class Located:
    """Where a root id's run was looked for, and whether its log was found."""

    places: RunPlaces
    """The places to read (the planned ones when nothing was found)."""
    looked: list[str]
    """Every place looked at, masked, for the "not found" message."""
    found: bool
    """Whether a run log of the root id exists at ``places``."""


def locate_run(
    config: FleetSettings, root_id: str, *, executor: str = "local", explicit: bool = False
) -> Located:
    """Find the newest run of ``root_id``.

    The planned places (same settings and options as ``fleet run``) come first. When the
    root id has no log there and the caller named no place (``explicit`` false), the run
    index and, for a local plan, the fleet's Redis are tried too.

    Raises:
        ConfigError: the run index knows the root id, but under a place with a password
            (the index never stores one): pass that place with ``--store``.
    """
    planned = plan_run(config, executor=executor)
    looked = [planned.describe()]
    found = _has_log(config, planned, root_id)
    if explicit:
        return Located(planned, looked, found)
    indexed = _indexed_places(config.run_index, root_id)
    if found:
        if indexed is not None and _same_log_other_journal(planned, indexed):
            _usable(indexed, root_id)  # e.g. `fleet run --store redis://...` on Celery
            return Located(indexed, looked, True)
        return Located(planned, looked, True)
    if indexed is not None and indexed != planned:
        _usable(indexed, root_id)
        looked.append(f"run index {config.run_index}: {indexed.describe()}")
        if _has_log(config, indexed, root_id):
            return Located(indexed, looked, True)
    if planned.ledger is None:
        shared = plan_run(config, executor="celery")
        looked.append(f"events {mask_url(shared.events or config.redis_url)}")
        if _has_log(config, shared, root_id, quick=True):
            return Located(shared, looked, True)
    return Located(planned, looked, False)


def _indexed_places(path: Path, root_id: str) -> RunPlaces | None:
    entry = indexed(path, root_id)
    return None if entry is None else RunPlaces(entry.store, entry.events, entry.ledger)


def _same_log_other_journal(planned: RunPlaces, indexed: RunPlaces) -> bool:
    """Whether the index says the run logged where planned but journaled elsewhere."""
    return indexed.events == mask_url(planned.events or "") and indexed.store != mask_url(
        planned.store
    )


def _usable(indexed: RunPlaces, root_id: str) -> None:
    """Refuse places from the index that lost their password (the index keeps none)."""
    if "***" in indexed.store or "***" in (indexed.events or ""):
        raise ConfigError(
            f"workflow {root_id!r} ran with {indexed.describe()}; pass its --store "
            "(with the password) to read it",
            key="store",
        )


def _has_log(
    config: FleetSettings, places: RunPlaces, root_id: str, *, quick: bool = False
) -> bool:
    if places.events is None:
        return False
    try:
        if quick and places.events.startswith(REDIS_SCHEMES):
            from .redis.clients import sync_client

            with sync_client(
                places.events, retry=False, socket_connect_timeout=1.0, socket_timeout=1.0
            ) as r:
                r.ping()
        reader = open_log_reader(places.events, key_prefix=config.key_prefix)
        try:
            return reader.last_start(root_id) is not None
        finally:
            reader.close()
    except Exception:  # an unreachable or unusable place simply does not have it
        return False


async def read_status(config: FleetSettings, places: RunPlaces, root_id: str) -> RunStatus:
    """The journal, log and budget of ``root_id`` at ``places``."""
    status = RunStatus(root_id=root_id, places=places)
    async with open_store(places.store, key_prefix=config.key_prefix) as journal:
        status.phases = await _phase_rows(journal, root_id)
    if places.events is not None:
        try:
            status.summary = await asyncio.to_thread(
                summary_at, places.events, config.key_prefix, root_id
            )
        except Exception as error:
            status.budget_note = f"event log unreadable ({type(error).__name__}: {error})"
    await _read_budget(config, places, root_id, status)
    if places.ledger is not None:
        status.limits = await _limit_lines(config, places.ledger)
    return status


async def _limit_lines(config: FleetSettings, redis_url: str) -> list[str]:
    """``NAME: use`` of every ``[limits.NAME]`` in the agents file (shared by the fleet)."""
    from .agents.registry import load_limits
    from .limiters import ProviderLimit, RedisRateLimiter
    from .limiters.admission import describe

    def read() -> dict[str, ProviderLimit]:
        return load_limits(config.agents_file) if Path(config.agents_file).is_file() else {}

    try:
        limits = await asyncio.to_thread(read)
    except ConfigError as error:
        return [f"(agents file unreadable: {error})"]
    limiter = RedisRateLimiter(redis_url, key_prefix=config.key_prefix)
    lines = []
    try:
        for name, limit in limits.items():
            try:
                state = await asyncio.wait_for(limiter.state(limit), 5.0)
            except Exception as error:
                lines.append(f"{name}: unreadable ({type(error).__name__}: {error})")
            else:
                lines.append(f"{name}: {describe(limit, state)}")
    finally:
        await limiter.close()
    return lines


async def _read_budget(
    config: FleetSettings, places: RunPlaces, root_id: str, status: RunStatus
) -> None:
    if places.ledger is not None:
        from .ledgers import RedisLedger

        ledger = RedisLedger(places.ledger, key_prefix=config.key_prefix)
        try:
            state = await asyncio.wait_for(ledger.state(root_id), 5.0)
        except Exception as error:
            status.budget_note = f"no shared ledger readable ({type(error).__name__}: {error})"
            return
        finally:
            await ledger.close()
        if state.exists or state.consumed or state.reserved or state.consumed_micros:
            status.budget = BudgetSnapshot.from_state(state)
        else:
            status.budget_note = "none recorded"
        return
    summary = status.summary
    if summary is None or summary.budget is None:
        status.budget_note = status.budget_note or "none recorded"
        return
    fields = {
        **summary.budget,
        "consumed_tokens": summary.consumed_tokens,
        "consumed_usd": summary.consumed_usd,
    }
    for derived in ("remaining_tokens", "remaining_usd", "is_exhausted"):
        fields.pop(derived, None)  # derived again from the fields above
    status.budget = BudgetSnapshot.model_validate(fields)


async def _phase_rows(journal: CheckpointStore, root_id: str) -> list[PhaseRow]:
    rows: list[tuple[float, PhaseRow]] = []
    prefix = f"{root_id}/"
    for workflow_id in await journal.list_workflows():
        if not workflow_id.startswith(prefix):
            continue
        name = workflow_id[len(prefix) :]
        try:
            checkpoint = await journal.load(workflow_id)
        except CheckpointError as error:
            rows.append((0.0, PhaseRow(name, 0, None, error=str(error))))
            continue
        steps = checkpoint.steps if checkpoint is not None else ()
        first = min((record.recorded_ms for record in steps), default=0) / 1000
        last = max((record.recorded_ms for record in steps), default=0) / 1000
        rows.append((first, PhaseRow(name, len(steps), last or None)))
    return [row for _first, row in sorted(rows, key=lambda pair: pair[0])]


def open_reader(config: FleetSettings, places: RunPlaces) -> LogReader:
    """A reader of the run's event log.

    Raises:
        ConfigError: the run keeps no event log (``--event-stream off`` or a memory journal).
    """
    if places.events is None:
        raise ConfigError(
            f"a run with {places.describe()} keeps no event log to follow; run it with a "
            "sqlite: or redis:// journal, or --event-stream URL",
            key="--event-stream",
        )
    return open_log_reader(places.events, key_prefix=config.key_prefix)
