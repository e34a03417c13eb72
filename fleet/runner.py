"""Running a workflow program from settings, and finding a run again by its root id.

What ``fleet run``, ``fleet status`` and ``fleet watch`` share, as library code:

- :func:`plan_run` decides, from the settings and the options, where a run keeps its
  journal, its event log and its budget ledger. ``status`` and ``watch`` call the same
  function, so they look where ``run`` wrote.
- :func:`open_run` builds the executor, budget, journal and event log of a run and
  closes them afterwards.
- :func:`locate_run` finds the newest run of a root id (the planned places first, then
  the local run index ``.fleet/runs.db`` that every ``fleet run`` writes,
  :mod:`fleet.runs.index`), and
  :func:`read_status` reads its journal, its log and its budget.

On the embedded default (local executor, SQLite journal) the event log and the budget
snapshots go into the journal's SQLite file, so another terminal can follow and inspect a
local run; a run that uses Redis (Celery executor or Redis journal) logs to the Redis
stream ``{key_prefix}:events:{root_id}`` and keeps its budget in the Redis ledger.
"""

# Longer than most modules on purpose: planning a run's places, opening them and finding
# them again must agree exactly, and keeping them side by side is what keeps them agreeing.

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .budget import BudgetSnapshot, WorkflowBudget
from .config import FleetSettings, mask_url
from .errors import CheckpointError, ConfigError
from .executor import AgentExecutor
from .ledgers import BudgetLedger
from .local import LocalExecutor
from .pricing import usd_to_micros
from .runlog import LogReader, RunSummary, open_log_reader, summarize
from .runs import new_run_id, open_run_registry
from .runs.index import index_run, indexed
from .stores import CheckpointStore, open_store, sqlite_path
from .workflow import Workflow, WorkflowBuilder

__all__ = [
    "Located",
    "PhaseRow",
    "RunPlaces",
    "RunStatus",
    "build_executor",
    "check_reachable",
    "locate_run",
    "open_ledger",
    "open_run",
    "plan_run",
    "read_status",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")


@dataclass(frozen=True)
class RunPlaces:
    """Where one run keeps its journal, event log and budget."""

    store: str
    """The journal (``sqlite:PATH``, ``redis://...`` or ``memory``)."""
    events: str | None
    """The event log (``sqlite:PATH`` or a Redis URL), ``None`` when off."""
    ledger: str | None
    """The Redis URL of the budget ledger; ``None``: the budget lives in the run's process
    (its snapshots are logged with the events)."""

    def describe(self) -> str:
        """One line naming the places, passwords masked."""
        parts = [f"journal {mask_url(self.store)}"]
        if self.events is not None and self.events != self.store:
            parts.append(f"events {mask_url(self.events)}")
        if self.ledger is not None and self.ledger != self.events:
            parts.append(f"budget {mask_url(self.ledger)}")
        return ", ".join(parts)


def plan_run(
    config: FleetSettings, *, executor: str = "local", event_stream: str = "auto"
) -> RunPlaces:
    """The places of a run with these settings and options (see the module docstring).

    Args:
        config: the settings (``store``, ``redis_url``).
        executor: ``local`` or ``celery``.
        event_stream: ``auto`` (the journal's SQLite file on the embedded default, the
            fleet's Redis when the run uses Redis), ``off``, a Redis URL or ``sqlite:PATH``.

    Raises:
        ConfigError: an unknown executor or event-stream value.
    """
    if executor not in ("local", "celery"):
        raise ConfigError(
            f"unknown executor {executor!r}; use 'local' or 'celery'", key="--executor"
        )
    store = config.store.strip()
    store_is_redis = store.startswith(_REDIS_SCHEMES)
    shared = executor == "celery" or store_is_redis
    redis = store if store_is_redis else config.redis_url
    events: str | None
    if event_stream == "off":
        events = None
    elif event_stream == "auto":
        if shared:
            events = redis
        else:
            path = sqlite_path(store)
            events = f"sqlite:{path}" if path else None
    elif event_stream.startswith(_REDIS_SCHEMES) or sqlite_path(event_stream):
        events = event_stream
    else:
        raise ConfigError(
            "--event-stream must be 'auto', 'off', a redis:// URL or sqlite:PATH, got "
            f"{mask_url(event_stream)!r}",
            key="--event-stream",
        )
    return RunPlaces(store=store, events=events, ledger=redis if shared else None)


def check_reachable(
    config: FleetSettings,
    places: RunPlaces,
    *,
    executor: str = "local",
    redis_setting: str = "FLEET_REDIS_URL",
) -> None:
    """Prove that every Redis a run uses answers, before anything runs.

    Without this a wrong URL shows only once the first steps have waited out their retries.
    Each server gets one quick try (no retries, a 2 s timeout).

    Args:
        config: the settings.
        places: the run's places.
        executor: ``celery`` checks the broker (``redis_url``) too.
        redis_setting: how the message names ``redis_url`` (``--redis-url`` where given).

    Raises:
        BrokerError: one line naming the place (password masked) and what to fix.
        ConfigError: a URL is malformed.
    """
    from .redis.sentinel import check_redis

    if executor == "celery" and not config.redis_url.strip().startswith(_REDIS_SCHEMES):
        raise ConfigError(
            f"the fleet's Redis URL {mask_url(config.redis_url)!r} is not a redis://, "
            f"rediss:// or sentinel:// URL: fix {redis_setting}",
            key="redis_url",
        )
    named: dict[str, str] = {}
    candidates = [
        (places.store, "--store (FLEET_STORE)"),
        (config.redis_url if executor == "celery" else None, redis_setting),
        (places.ledger, redis_setting),
        (places.events, redis_setting if places.events == config.redis_url else "--event-stream"),
    ]
    for url, setting in candidates:
        if url is not None and url.startswith(_REDIS_SCHEMES) and url not in named:
            named[url] = setting
    for url, setting in named.items():
        check_redis(url, setting=setting)


def build_executor(
    kind: str,
    agents: Mapping[str, Any],
    budget: WorkflowBudget | None,
    concurrency: int,
    config: FleetSettings,
) -> AgentExecutor:
    """The host a run uses: ``local`` (in-process) or ``celery`` (the fleet)."""
    if kind == "local":
        return LocalExecutor(
            agents=dict(agents),
            budget=budget,
            max_concurrency=concurrency,
            default_reserve_tokens=config.default_reserve_tokens,
        )
    if kind == "celery":
        try:
            from .celery import CeleryExecutor
        except ImportError as error:
            raise ConfigError(f"the Celery host cannot be loaded: {error}") from None
        return CeleryExecutor(settings=config, budget=budget)
    raise ConfigError(f"unknown executor {kind!r}; use 'local' or 'celery'", key="--executor")


async def _close(resource: Any) -> None:
    for name in ("aclose", "close"):
        method = getattr(resource, name, None)
        if method is not None:
            result = method()
            if inspect.isawaitable(result):
                await result
            return


@contextlib.asynccontextmanager
async def open_run(
    config: FleetSettings,
    places: RunPlaces,
    *,
    root_id: str,
    executor: str = "local",
    agents: Mapping[str, Any] | None = None,
    budget_tokens: int | None = None,
    concurrency: int = 8,
    budget_usd: Decimal | None = None,
    account: str | None = None,
) -> AsyncIterator[WorkflowBuilder]:
    """A workflow builder wired to the run's places; its resources close on exit.

    ``budget_usd`` is the run's dollar limit; ``account`` a shared account above the run
    (it must exist in the run's ledger, see :func:`open_ledger`: ``fleet budget set``).

    A local budget without an account lives in the run's process and starts from the
    consumption the log recorded for an unfinished earlier run of the same root id, so a
    resumed local run never spends more than its limit in total.

    Raises:
        ConfigError: ``account`` on a run whose journal is ``memory`` (no ledger outlives it).
    """
    from .ledgers import MemoryLedger

    ledger: BudgetLedger | None = None
    plan: WorkflowBudget | None = None
    if budget_tokens is not None or budget_usd is not None or account is not None:
        lasting = None
        if places.ledger is not None or account is not None:
            lasting = open_ledger(config, places)
        ledger = lasting
        if ledger is None:
            if account is not None:
                raise ConfigError(
                    f"--account {account} needs a ledger that outlives the run: use a "
                    "SQLite journal (--store sqlite:PATH, the default; accounts go beside it) "
                    "or Redis (--store redis://..., or --executor celery)",
                    key="--account",
                )
            ledger = MemoryLedger()
        plan = WorkflowBudget(
            budget_tokens,
            limit_usd=budget_usd,
            parents=[account] if account else [],
            ledger=ledger,
            workflow_id=root_id,
        )
        try:
            await plan.ancestors()  # an unknown account or a cycle fails the run at its start
        except BaseException:
            await _close(ledger)
            raise
        if lasting is None:
            await _carry_local_consumption(config, places, root_id, plan)
    host = build_executor(executor, agents or {}, plan, concurrency, config)
    journal: CheckpointStore = open_store(places.store, key_prefix=config.key_prefix)
    builder = Workflow.builder(host).with_store(journal).with_root_id(root_id)
    if plan is not None:
        builder = builder.with_budget(plan)
    if places.events is not None:
        builder = builder.with_event_stream(
            places.events, key_prefix=config.key_prefix, maxlen=config.event_stream_maxlen
        )
    run_id = new_run_id()  # the run's one id: registry, run log, index
    board = open_run_registry(places.store, redis_url=places.ledger, key_prefix=config.key_prefix)
    builder = builder.with_run_id(run_id).with_cancel_board(board)
    retention = None
    if places.ledger is not None:  # the run keeps records in the fleet's Redis
        from .retention import RedisRetention

        retention = RedisRetention(
            places.ledger, key_prefix=config.key_prefix, retention_s=config.retention_s
        )
        builder = builder.with_retention(retention)
    index_run(
        config.run_index,
        root_id,
        run_id,
        store=mask_url(places.store),
        events=None if places.events is None else mask_url(places.events),
        ledger=None if places.ledger is None else mask_url(places.ledger),
    )
    try:
        yield builder
    finally:
        for resource in (journal, host, ledger, board, retention):
            if resource is not None:
                await _close(resource)


def open_ledger(config: FleetSettings, places: RunPlaces) -> BudgetLedger | None:
    """The ledger that outlives a run at ``places``; ``None`` when the journal is ``memory``.

    Redis when the run uses Redis (its ``ledger``); on the embedded default a SQLite file
    beside the journal (:func:`fleet.ledgers.sqlite.ledger_path_for`), so shared accounts
    (``fleet budget set team:x``) work without Redis.
    """
    if places.ledger is not None:
        from .ledgers import RedisLedger

        return RedisLedger(places.ledger, key_prefix=config.key_prefix)
    journal = sqlite_path(places.store)
    if journal is None:
        return None
    from .ledgers.sqlite import SQLiteLedger, ledger_path_for

    return SQLiteLedger(ledger_path_for(journal))


async def _carry_local_consumption(
    config: FleetSettings, places: RunPlaces, root_id: str, budget: WorkflowBudget
) -> None:
    if places.events is None:
        return
    summary = await asyncio.to_thread(_summary_at, places.events, config.key_prefix, root_id)
    if summary is None or summary.status == "finished" or summary.consumed_tokens is None:
        return
    consumed = summary.consumed_tokens
    if budget.limit_tokens is not None:
        consumed = min(consumed, budget.limit_tokens)
    micros = usd_to_micros(summary.consumed_usd or 0, "the previous run's cost")
    if budget.limit_usd is not None:
        micros = min(micros, usd_to_micros(budget.limit_usd, "limit_usd"))
    if consumed > 0 or micros > 0:
        reservation = await budget.reserve(
            consumed, holder="spent by the previous run", micros=micros
        )
        await reservation.settle(consumed, used_micros=micros)


def _summary_at(url: str, key_prefix: str, root_id: str) -> RunSummary | None:
    reader = open_log_reader(url, key_prefix=key_prefix)
    try:
        return summarize(reader, root_id)
    finally:
        reader.close()


# --- finding and reading a run -----------------------------------------------------------


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
        if quick and places.events.startswith(_REDIS_SCHEMES):
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
                _summary_at, places.events, config.key_prefix, root_id
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
