"""Running a workflow program from settings: where a run keeps its records, and opening them.

What ``fleet run``, ``fleet status`` and ``fleet watch`` share, as library code:

- :func:`plan_run` decides, from the settings and the options, where a run keeps its
  journal, its event log and its budget ledger. ``status`` and ``watch`` call the same
  function (through :mod:`fleet.runstatus`, which finds a run again by its root id and
  reads it), so they look where ``run`` wrote.
- :func:`open_run` builds the executor, budget, journal and event log of a run and
  closes them afterwards.

On the embedded default (local executor, SQLite journal) the event log and the budget
snapshots go into the journal's SQLite file, so another terminal can follow and inspect a
local run; a run that uses Redis (Celery executor or Redis journal) logs to the Redis
stream ``{key_prefix}:events:{root_id}`` and keeps its budget in the Redis ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .budget import WorkflowBudget
from .config import FleetSettings, mask_url
from .errors import ConfigError
from .executor import AgentExecutor
from .ledgers import BudgetLedger
from .local import LocalExecutor
from .pricing import usd_to_micros
from .runs import new_run_id, open_run_registry
from .runs.index import index_run
from .runsummary import summary_at
from .stores import CheckpointStore, open_store, sqlite_path
from .urls import REDIS_SCHEMES
from .workflow import Workflow, WorkflowBuilder

__all__ = [
    "REDIS_SCHEMES",
    "RunPlaces",
    "build_executor",
    "check_reachable",
    "open_ledger",
    "open_run",
    "plan_run",
]


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
    store_is_redis = store.startswith(REDIS_SCHEMES)
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
    elif event_stream.startswith(REDIS_SCHEMES) or sqlite_path(event_stream):
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

    if executor == "celery" and not config.redis_url.strip().startswith(REDIS_SCHEMES):
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
        if url is not None and url.startswith(REDIS_SCHEMES) and url not in named:
            named[url] = setting
    for url, setting in named.items():
        check_redis(url, setting=setting)


def build_executor(
    kind: str,
    agents: Mapping[str, Any],
    budget: WorkflowBudget | None,
    concurrency: int,
    config: FleetSettings,
    *,
    store: str | None = None,
) -> AgentExecutor:
    """The host a run uses: ``local`` (in-process) or ``celery`` (the fleet).

    ``store`` is the run's journal: when it is the fleet's own Redis, the workers journal
    each step with its outcome, in the same script, and the host does not write it again.
    """
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
        shared = store is not None and store.strip() == config.redis_url.strip()
        return CeleryExecutor(settings=config, budget=budget, worker_journal=shared)
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
    host = build_executor(executor, agents or {}, plan, concurrency, config, store=places.store)
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
    summary = await asyncio.to_thread(summary_at, places.events, config.key_prefix, root_id)
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
