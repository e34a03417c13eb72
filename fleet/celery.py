"""The Celery fleet host: each step is a Celery task on a Redis broker.

:class:`CeleryExecutor` is an :class:`~fleet.AgentExecutor`; combinators never learn
that a step ran on another machine. How it places work:

* **Steps** become one generic named task, ``fleet.run_step``; the spec travels as JSON
  text. A round is sent as Celery groups (a sliding window of at most ``max_in_flight``
  steps); a pipeline whose stages are all registered by name on the workers is sent as
  Celery chains (``fleet.run_stage``), otherwise the combinator drives it from here.
* **Results** come back on a per-round Redis reply list that the workers push to, so
  the host waits on one ``BLPOP`` instead of polling each task. The barrier is this
  host collecting one outcome per step: duplicates are ignored, so it fires exactly once.
* **Exactly-once effect**: every step has a task id derived from (workflow id, step
  task id, step identity) when its round is journaled, else a fresh one. Before running,
  a worker atomically checks the step's done-marker and takes a lease
  (``SET NX PX``, renewed while it runs); a duplicated or redelivered message finds one
  of them and does not run the agent again.
* **Recovery**: on Redis a message a worker took is lost if the worker is SIGKILLed
  (celery#4354). The host re-sends, under the same task id, a step no worker claimed
  within ``claim_timeout_s``, and a claimed step whose lease lapsed (its worker died)
  as soon as it notices; see ``docs/CELERY.md`` for the time bound.
* **Budget guard**: the host reserves a step's tokens before the task is sent; a
  refused step is never sent and fails with ``budget_exhausted``.
* **Backpressure**: at most ``max_in_flight`` steps per executor are queued or
  running, and sending pauses while the broker queue is longer than
  ``queue_high_water`` (``LLEN`` of the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from celery import Celery, chain, group
from pydantic import Field, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .agents.registry import AgentRegistry, load_agents, read_agents_file, resolve_target
from .checkpoint import step_identity
from .combinators import crash_outcome
from .config import FleetSettings, load_settings, mask_url
from .errors import BudgetError, BudgetExhaustedError, ConfigError
from .events import EventSink, StepFinished, StepStarted, emit
from .executor import AgentExecutor, OutcomeCallback, PipelineStage
from .redisclient import OUTAGE_TOLERANCE_S, async_client
from .spec import AgentStepSpec, FleetModel, StepOutcome

if TYPE_CHECKING:
    from .budget import Reservation, WorkflowBudget

__all__ = [
    "PROTOCOL_VERSION",
    "STAGE_TASK",
    "STEP_TASK",
    "BudgetHold",
    "CeleryExecutor",
    "StageMessage",
    "StepMessage",
    "configure_app",
    "load_stages",
    "stage_link_id",
    "step_summary",
    "step_task_id",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
"""Version of the JSON messages host and workers exchange; a worker rejects any other."""
STEP_TASK = "fleet.run_step"
"""The generic step task."""
STAGE_TASK = "fleet.run_stage"
"""The pipeline-stage task (one link of a chain)."""

_REPLY_TTL_S = 3600
_SEND_BATCH = 256


# --------------------------------------------------------------------------- wire format


class BudgetHold(FleetModel):
    """What a worker needs to settle the reservation the host made for a step."""

    workflow_id: str
    """The budget's workflow id (its ledger key)."""
    reservation_id: str
    """The reservation to re-attach (the step's task id)."""
    tokens: int = Field(ge=0)
    """Tokens the host reserved: the step's token hold."""
    limit_tokens: int | None = None
    """The budget's limit when the step was sent."""
    lease_s: float = 30.0
    """The reservation's lease."""


class StepMessage(FleetModel):
    """The one argument of ``fleet.run_step`` (sent as JSON text)."""

    v: int
    """Protocol version; must be :data:`PROTOCOL_VERSION`."""
    spec: AgentStepSpec
    """The step to run."""
    reply: str
    """Redis list the worker pushes start/finish notices to."""
    nonce: str
    """Names this dispatch: a failed outcome is reused only by duplicates of it."""
    workflow_id: str | None = None
    """The journal the step belongs to, when its round is journaled."""
    budget: BudgetHold | None = None
    """The step's token hold, when a Redis budget ledger guards the workflow."""
    journal: bool = False
    """Write the step's journal record into the fleet's Redis journal when it succeeds."""


class StageMessage(FleetModel):
    """The argument of one ``fleet.run_stage`` link: a pointer, never the item itself."""

    v: int
    """Protocol version; must be :data:`PROTOCOL_VERSION`."""
    pipe: str
    """The pipeline run (its context lives at ``{prefix}:pipe:{pipe}``)."""
    item: int = Field(ge=0)
    """The item's index."""
    stage: int = Field(ge=0)
    """The stage this link runs."""


def step_summary(workflow_id: str | None, spec: AgentStepSpec) -> str:
    """The argument summary monitoring shows for a step (never the prompt)."""
    return f"{workflow_id or '-'} {spec.task_id} {spec.agent}"


class _Keys:
    """Redis key layout shared by the host and the workers."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def lease(self, tid: str) -> str:
        """A worker's claim on a running step (``SET NX PX``, renewed while it runs)."""
        return f"{self.prefix}:lease:{tid}"

    def result(self, tid: str, nonce: str) -> str:
        """The outcome of one dispatch: every duplicate of that dispatch is served it."""
        return f"{self.prefix}:result:{tid}:{nonce}"

    def done(self, tid: str) -> str:
        """A journaled step's success, for a resumed host (dropped when its round ends)."""
        return f"{self.prefix}:done:{tid}"

    def reply(self, name: str) -> str:
        return f"{self.prefix}:reply:{name}"

    def pipe(self, pipe: str) -> str:
        return f"{self.prefix}:pipe:{pipe}"


CLAIM_SCRIPT = """
-- KEYS: done, result of this dispatch, lease, reply
-- ARGV: owner, lease_ms, start notice ('' for none), reply ttl
local d = redis.call('GET', KEYS[1])
if d then return {'done', d} end
d = redis.call('GET', KEYS[2])
if d then return {'done', d} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[4], ARGV[3])
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
  return {'claimed', ''}
end
return {'held', redis.call('GET', KEYS[3]) or ''}
"""
"""Atomically: a recorded outcome wins, else take the lease and announce the start."""

FINISH_SCRIPT = """
-- KEYS: result of this dispatch, lease, reply, done
-- ARGV: outcome json, ttl_s, owner, reply ttl, also set done ('1' or '0'), notices...
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 6 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
"""Atomically: record the outcome, notify the host, drop our lease."""

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
"""Extend a lease only if we still hold it."""


def configure_app(settings: FleetSettings) -> Celery:
    """A Celery app configured for fleet (JSON only, late acks, events on), no tasks.

    The host sends by task name with it; ``workers.app.create_app`` adds the tasks.
    """
    app = Celery(
        "fleet", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=settings.result_expires_s,
        task_default_queue=settings.queue,
        # Recovery from a lost worker is the host's job (claim timeout); the broker's own
        # restore is a slower backstop, so it only has to outlast a long step.
        broker_transport_options={"visibility_timeout": 900},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Publishing rides out a Redis restart as long as the host's own client does
        # (Celery's default gives up after about 0.6 s).
        task_publish_retry_policy={
            "max_retries": int(OUTAGE_TOLERANCE_S),
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 1.0,
        },
    )
    if settings.redis_url.startswith("rediss://"):
        # A plain rediss:// URL must verify the server, as redis-py does: kombu would
        # otherwise fall back to no verification, and the result backend refuses the URL.
        app.conf.update(
            broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
            redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
        )
    return app


def load_stages(path: str | Path) -> dict[str, Callable[..., Any]]:
    """Read the ``[stages.NAME] target = "pkg.mod:func"`` tables of an agents file.

    Raises:
        ConfigError: the file is unreadable or a stage table is invalid.
    """
    source, tables = read_agents_file(path, "stages")
    stages: dict[str, Callable[..., Any]] = {}
    for name, table in tables.items():
        target = table.get("target") if isinstance(table, dict) else None
        if not isinstance(target, str):
            raise ConfigError(
                f"{source}: [stages.{name}] needs target = 'package.module:function'",
                key=f"stages.{name}.target",
            )
        stages[name] = resolve_target(target, what="stage")
    return stages


def step_task_id(workflow_id: str, spec: AgentStepSpec) -> str:
    """The task id of a journaled step: the same workflow, step and identity give the same id.

    Derived from :func:`fleet.checkpoint.step_identity` (which covers the workflow id,
    the task id and every identity field), so a resumed host finds the step's lease or
    done-marker instead of sending it again.
    """
    identity = step_identity(workflow_id, spec)
    return "fs-" + hashlib.sha256(identity.encode()).hexdigest()[:40]


# --------------------------------------------------------------------------- the host


@dataclass(eq=False)
class _Entry:
    """One step of a round as the host tracks it."""

    index: int
    spec: AgentStepSpec
    tid: str
    payload: str = ""
    sent_at: float = 0.0
    started: bool = False
    holds_slot: bool = False
    reservation: Reservation | None = None
    outcome: StepOutcome | None = None


def _json_roundtrips(value: Any) -> bool:
    try:
        return bool(json.loads(json.dumps(value)) == value)
    except (TypeError, ValueError):
        return False


class CeleryExecutor(AgentExecutor):
    """Runs every step as a Celery task on a Redis-backed worker fleet.

    Args:
        redis_url: broker, result backend, journal and budget store; default from settings
            (``FLEET_REDIS_URL``).
        max_in_flight: steps (or pipeline chains) of this executor queued or running at
            once; also its concurrency hint.
        budget: a :class:`~fleet.WorkflowBudget`; each step's tokens are reserved before
            its task is sent. With a Redis ledger the worker settles what it used.
        settings: the settings to start from (default: :func:`fleet.config.load_settings`).
        queue: the Celery queue steps go to.
        claim_timeout_s: a sent step nobody has claimed within this is re-sent.
        step_lease_s: a worker's claim on a step; a lapsed lease marks its worker dead.
        queue_high_water: sending pauses while the queue holds more messages than this.
        key_prefix: prefix of the Redis keys fleet writes (must match the workers').
        default_reserve_tokens: reservation for a step with no ``max_tokens`` whose agent
            names no default.
        worker_journal: workers write each successful step of a journaled round into the
            fleet's Redis journal (``{key_prefix}:journal:{workflow_id}``) at the step
            boundary, before the host hears of it. Use it when the workflow's store is a
            :class:`~fleet.stores.RedisCheckpointStore` on the same Redis and prefix.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        max_in_flight: int | None = None,
        budget: WorkflowBudget | None = None,
        settings: FleetSettings | None = None,
        queue: str | None = None,
        claim_timeout_s: float | None = None,
        step_lease_s: float | None = None,
        queue_high_water: int | None = None,
        key_prefix: str | None = None,
        default_reserve_tokens: int | None = None,
        worker_journal: bool = False,
    ) -> None:
        overrides = {
            name: value
            for name, value in {
                "redis_url": redis_url,
                "max_in_flight": max_in_flight,
                "queue": queue,
                "claim_timeout_s": claim_timeout_s,
                "step_lease_s": step_lease_s,
                "queue_high_water": queue_high_water,
                "key_prefix": key_prefix,
                "default_reserve_tokens": default_reserve_tokens,
            }.items()
            if value is not None
        }
        if settings is None:
            self.settings = load_settings(**overrides)
        else:
            try:
                self.settings = FleetSettings(**{**settings.model_dump(), **overrides})
            except ValidationError as error:
                raise ConfigError(f"invalid CeleryExecutor options: {error}") from None
        self.budget = budget
        self.worker_journal = worker_journal
        self._keys = _Keys(self.settings.key_prefix)
        self._app: Celery | None = None
        self._sender: ThreadPoolExecutor | None = None
        self._slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
        self._registry: AgentRegistry | None = None
        self._stage_names: dict[int, str] | None = None
        lease, claim = self.settings.step_lease_s, self.settings.claim_timeout_s
        self.check_interval_s = min(max(min(lease, claim) / 4, 0.05), 1.0)
        """How often in-flight steps are checked for a lost message or a dead worker."""

    def __repr__(self) -> str:
        return (
            f"CeleryExecutor(redis_url={self.settings.masked_redis_url()!r}, "
            f"queue={self.settings.queue!r}, max_in_flight={self.settings.max_in_flight})"
        )

    def concurrency_hint(self) -> int:
        """The configured per-workflow ``max_in_flight``."""
        return self.settings.max_in_flight

    # ------------------------------------------------------------------ lifecycle

    @property
    def app(self) -> Celery:
        """The Celery app used to send tasks (created on first use)."""
        if self._app is None:
            self._app = configure_app(self.settings)
        return self._app

    def close(self) -> None:
        """Release the broker connections and the sender thread (the executor stays usable)."""
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        if self._app is not None:
            self._app.close()
            self._app = None

    async def aclose(self) -> None:
        """Like :meth:`close`, and close this event loop's Redis connections too."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> CeleryExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None:
            self._slots = {lp: s for lp, s in self._slots.items() if not lp.is_closed()}
            slot = self._slots[loop] = asyncio.Semaphore(self.settings.max_in_flight)
        return slot

    def _client(self) -> aioredis.Redis:
        """This event loop's Redis client (a pool; one per loop, closed by :meth:`aclose`).

        It retries through a Redis restart (see :mod:`fleet.redisclient`) instead of
        failing the steps in flight.
        """
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            self._clients = {lp: c for lp, c in self._clients.items() if not lp.is_closed()}
            client = self._clients[loop] = async_client(self.settings.redis_url)
        return client

    async def _redis(self) -> aioredis.Redis:
        """This loop's client, after a one-time check (no retries) that Redis answers.

        So an unreachable broker fails the round at once, not after the client's outage
        tolerance.
        """
        if asyncio.get_running_loop() not in self._clients:
            probe = aioredis.Redis.from_url(self.settings.redis_url, retry=Retry(NoBackoff(), 0))
            try:
                await probe.ping()
            finally:
                await probe.aclose()
        return self._client()

    def registry(self) -> AgentRegistry:
        """The agents this host knows (to size reservations); built-ins if no agents file."""
        if self._registry is None:
            path = self.settings.agents_file
            self._registry = AgentRegistry(load_agents(path) if Path(path).is_file() else None)
        return self._registry

    def _stages(self) -> dict[int, str]:
        if self._stage_names is None:
            path = self.settings.agents_file
            found = load_stages(path) if Path(path).is_file() else {}
            self._stage_names = {id(func): name for name, func in found.items()}
        return self._stage_names

    async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="fleet-celery-send")

        def send() -> None:
            with self.app.producer_or_acquire() as producer:
                if as_group:
                    group(signatures).apply_async(producer=producer)
                else:
                    for signature in signatures:
                        signature.apply_async(producer=producer)

        await asyncio.get_running_loop().run_in_executor(self._sender, send)

    async def _queue_room(self, client: aioredis.Redis) -> int:
        """How many more messages the step queue takes; waits while it is at high water."""
        while True:
            depth = await client.llen(self.settings.queue)
            if depth < self.settings.queue_high_water:
                return int(self.settings.queue_high_water - depth)
            await asyncio.sleep(self.check_interval_s / 2)

    # ------------------------------------------------------------------ the seam

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        """Send ``spec`` as one task and wait for its outcome; never raises."""
        return (await _Round(self, [spec], events, None, None).run())[0]

    async def native_round(
        self,
        specs: Sequence[AgentStepSpec],
        *,
        events: EventSink | None = None,
        on_outcome: OutcomeCallback | None = None,
        workflow_id: str | None = None,
    ) -> list[StepOutcome] | None:
        """Send the round as Celery groups (a window of ``max_in_flight``), barrier here."""
        return await _Round(self, list(specs), events, on_outcome, workflow_id).run()

    async def native_pipeline(
        self,
        items: Sequence[Any],
        stages: Sequence[PipelineStage],
        *,
        events: EventSink | None = None,
    ) -> list[StepOutcome | None] | None:
        """Send one Celery chain per item when every stage is registered on the workers.

        Declines (``None``: the combinator drives the chains from here, with identical
        results) when a stage is not registered by name, an item does not survive a
        JSON round trip unchanged, or a budget guards the workflow (each step must be
        reserved before it is sent, and only the worker knows a chain's next step).
        """
        if self.budget is not None or not stages:
            return None
        try:
            known = self._stages()
        except ConfigError:
            logger.warning(
                "cannot read the stages of %s; pipelines run host-driven", self.settings.agents_file
            )
            return None
        names = [known.get(id(stage)) for stage in stages]
        if None in names or not all(_json_roundtrips(item) for item in items):
            return None
        return await _Pipeline(self, list(items), [str(n) for n in names], events).run()


# --------------------------------------------------------------------------- one round


class _Round:
    """One barrier round: a dispatcher and a collector sharing a reply list."""

    def __init__(
        self,
        executor: CeleryExecutor,
        specs: list[AgentStepSpec],
        events: EventSink | None,
        on_outcome: OutcomeCallback | None,
        workflow_id: str | None,
    ) -> None:
        self.x = executor
        self.keys = executor._keys
        self.events = events
        self.on_outcome = on_outcome
        self.workflow_id = workflow_id
        self.nonce = uuid.uuid4().hex
        self.reply = self.keys.reply(self.nonce)
        self.entries: list[_Entry] = []
        self.by_tid: dict[str, _Entry] = {}
        for index, spec in enumerate(specs):
            tid = (
                step_task_id(workflow_id, spec)
                if workflow_id is not None
                else "fs-" + uuid.uuid4().hex
            )
            if tid in self.by_tid:  # the same step twice in one journaled round
                tid = f"{tid}-{index}"
            entry = _Entry(index, spec, tid)
            self.entries.append(entry)
            self.by_tid[tid] = entry
        self.unresolved = len(self.entries)
        self.inflight: dict[str, _Entry] = {}
        self.slot = executor._slot()

    async def run(self) -> list[StepOutcome]:
        if not self.entries:
            return []
        try:
            self.client = client = await self.x._redis()
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._dispatch())
                    tasks.create_task(self._collect())
                if self.workflow_id is not None:
                    # The round is over and its caller has the outcomes: a later run of
                    # the same workflow must not be served this round's results.
                    await client.delete(*(self.keys.done(e.tid) for e in self.entries))
            finally:
                # (The reply list is empty by now, or expires on its own.)
                for entry in self.entries:
                    self._release(entry)
        except* (RedisError, OSError) as group_error:
            await self._fail_rest(group_error.exceptions[0], "unavailable")
        except* Exception as group_error:
            await self._fail_rest(group_error.exceptions[0], "crashed")
        return [entry.outcome for entry in self.entries]  # type: ignore[misc]

    async def _fail_rest(self, error: BaseException, kind: str) -> None:
        if kind == "unavailable":
            message = (
                f"the fleet broker at {mask_url(self.x.settings.redis_url)} failed: "
                f"{type(error).__name__}; is Redis running?"
            )
        else:
            message = f"the Celery host crashed: {type(error).__name__}: {error}"
            logger.error("fleet round failed", exc_info=error)
        for entry in self.entries:
            if entry.outcome is None:
                spec = entry.spec
                await self._resolve(
                    entry, StepOutcome.failed(spec.task_id, spec.agent, message, error=kind)
                )

    # ------------------------------------------------------------------ dispatch

    def _payload(self, entry: _Entry) -> str:
        hold = None
        budget, reservation = self.x.budget, entry.reservation
        if budget is not None and reservation is not None and _redis_ledger(budget):
            hold = BudgetHold(
                workflow_id=budget.workflow_id,
                reservation_id=reservation.id,
                tokens=reservation.tokens,
                limit_tokens=budget.limit_tokens,
                lease_s=budget.lease_s,
            )
        message = StepMessage(
            v=PROTOCOL_VERSION,
            spec=entry.spec,
            reply=self.reply,
            nonce=self.nonce,
            workflow_id=self.workflow_id,
            budget=hold,
            journal=self.x.worker_journal and self.workflow_id is not None,
        )
        return message.to_json()

    def _signature(self, entry: _Entry) -> Any:
        return self.x.app.signature(
            STEP_TASK,
            args=(entry.payload,),
            task_id=entry.tid,
            queue=self.x.settings.queue,
            argsrepr=step_summary(self.workflow_id, entry.spec),
            kwargsrepr="{}",
        )

    async def _reserve(self, entry: _Entry) -> bool:
        """Reserve the step's tokens; resolves it (and returns False) when refused."""
        budget = self.x.budget
        if budget is None:
            return True
        spec = entry.spec
        try:
            definition = self.x.registry().resolve(spec.agent)
            tokens = definition.reservation_for(spec, self.x.settings.default_reserve_tokens)
        except LookupError:
            tokens = (
                spec.max_tokens
                if spec.max_tokens is not None
                else self.x.settings.default_reserve_tokens
            )
        try:
            entry.reservation = await budget.reserve(
                tokens, holder=entry.tid, reservation_id=entry.tid
            )
        except (BudgetExhaustedError, BudgetError) as error:
            kind = "budget_exhausted" if isinstance(error, BudgetExhaustedError) else "budget"
            await self._resolve(
                entry, StepOutcome.failed(spec.task_id, spec.agent, str(error), error=kind)
            )
            return False
        return True

    async def _dispatch(self) -> None:
        pending = iter(self.entries)
        entry = next(pending, None)
        # With a budget, a reservation may wait for in-flight steps to settle: send each
        # step as soon as it holds its tokens so nothing waits on an unsent sibling.
        batch_limit = 1 if self.x.budget is not None else _SEND_BATCH
        while entry is not None:
            room = min(await self.x._queue_room(self.client), batch_limit)
            batch: list[_Entry] = []
            while entry is not None and len(batch) < room:
                if batch and self.slot.locked():
                    break
                await self.slot.acquire()
                entry.holds_slot = True
                if await self._reserve(entry):
                    batch.append(entry)
                entry = next(pending, None)
            if self.workflow_id is not None and batch:
                batch = await self._reattach(batch)
            if batch:
                await self._send(batch)
        if self.unresolved == 0:
            await self.client.rpush(self.reply, b'{"t":"wake"}')

    async def _reattach(self, batch: list[_Entry]) -> list[_Entry]:
        """A journaled step already running or done (e.g. before a host restart) is not resent."""
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in batch:
                pipe.get(self.keys.done(entry.tid))
                pipe.exists(self.keys.lease(entry.tid))
            replies = await pipe.execute()
        to_send = []
        for i, entry in enumerate(batch):
            done, leased = replies[2 * i], replies[2 * i + 1]
            if done is not None:
                await self._resolve(entry, StepOutcome.from_json(done))
            elif leased:
                entry.started, entry.sent_at = True, time.monotonic()
                self.inflight[entry.tid] = entry
            else:
                to_send.append(entry)
        return to_send

    async def _send(self, batch: list[_Entry]) -> None:
        now = time.monotonic()
        for entry in batch:
            if not entry.payload:
                entry.payload = self._payload(entry)
            entry.sent_at, entry.started = now, False
            self.inflight[entry.tid] = entry
        await self.x._send([self._signature(e) for e in batch], as_group=True)

    # ------------------------------------------------------------------ collect

    async def _collect(self) -> None:
        interval = self.x.check_interval_s
        next_check = time.monotonic() + interval
        budget = self.x.budget
        renew_every = budget.lease_s / 3 if budget is not None else float("inf")
        next_renewal = time.monotonic() + renew_every
        while self.unresolved:
            popped = await self.client.blpop([self.reply], timeout=interval)
            if popped is not None:
                await self._notice(popped[1])
                more: Any = await self.client.lpop(self.reply, 512)
                for raw in more or ():
                    await self._notice(raw)
            if time.monotonic() >= next_check:
                await self._check_stale()
                next_check = time.monotonic() + interval
            if time.monotonic() >= next_renewal:
                # Keep queued steps' reservations alive; the worker renews while it runs.
                held = [e.reservation for e in self.inflight.values() if e.reservation]
                await asyncio.gather(*(r.renew() for r in held))
                next_renewal = time.monotonic() + renew_every

    async def _notice(self, raw: Any) -> None:
        notice = json.loads(raw)
        entry = self.by_tid.get(notice.get("id", ""))
        if entry is None or entry.outcome is not None:
            return
        if notice["t"] == "start":
            if not entry.started:
                entry.started = True
                emit(self.events, StepStarted(task_id=entry.spec.task_id, agent=entry.spec.agent))
        elif notice["t"] == "done":
            await self._resolve(entry, StepOutcome.from_dict(notice["o"]))

    async def _check_stale(self) -> None:
        """Re-send steps whose message was lost or whose worker died."""
        now = time.monotonic()
        claim_timeout = self.x.settings.claim_timeout_s
        suspects = [
            e for e in self.inflight.values() if e.started or now - e.sent_at >= claim_timeout
        ]
        if not suspects:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in suspects:
                pipe.exists(self.keys.lease(entry.tid))
                pipe.get(self.keys.done(entry.tid))
                pipe.get(self.keys.result(entry.tid, self.nonce))
            replies = await pipe.execute()
        resend = []
        for i, entry in enumerate(suspects):
            leased, done, failed = replies[3 * i : 3 * i + 3]
            if done is not None or failed is not None:
                await self._resolve(entry, StepOutcome.from_json(done or failed))
            elif leased:
                entry.started = True
            else:
                logger.warning(
                    "step %r (task %s) was %s; re-sending it under the same task id",
                    entry.spec.task_id,
                    entry.tid,
                    "orphaned by a dead worker"
                    if entry.started
                    else f"not claimed within {claim_timeout} s",
                )
                resend.append(entry)
        if resend:
            await self._send(resend)

    def _release(self, entry: _Entry) -> None:
        self.inflight.pop(entry.tid, None)
        if entry.holds_slot:
            entry.holds_slot = False
            self.slot.release()

    async def _resolve(self, entry: _Entry, outcome: StepOutcome) -> None:
        if entry.outcome is not None:
            return
        entry.outcome = outcome
        self.unresolved -= 1
        self._release(entry)
        if entry.reservation is not None:
            # Settling is idempotent: the worker may already have charged the same usage.
            await asyncio.shield(entry.reservation.settle(outcome.usage.total_tokens))
        emit(self.events, StepFinished.of(outcome))
        if self.on_outcome is not None:
            try:
                await self.on_outcome(entry.index, outcome)
            except Exception as error:
                entry.outcome = crash_outcome(entry.spec, error)


# --------------------------------------------------------------------------- one pipeline


@dataclass(eq=False)
class _Chain:
    """One item's chain as the host tracks it: which link is due, and what came of it."""

    index: int
    stage: int = 0
    prev: StepOutcome | None = None
    sent_at: float = 0.0
    started: bool = False
    holds_slot: bool = False
    finished: bool = False
    final: StepOutcome | None = None


def stage_link_id(pipe: str, item: int, stage: int) -> str:
    """The task id of one link of a pipeline chain."""
    return f"fp-{pipe}-{item}-{stage}"


class _Pipeline:
    """Per-item Celery chains of registered stages; the host only watches and recovers."""

    def __init__(
        self,
        executor: CeleryExecutor,
        items: list[Any],
        stages: list[str],
        events: EventSink | None,
    ) -> None:
        self.x = executor
        self.keys = executor._keys
        self.items = items
        self.stages = stages
        self.events = events
        self.pipe = uuid.uuid4().hex[:20]
        self.reply = self.keys.reply(self.pipe)
        self.chains = [_Chain(i) for i in range(len(items))]
        self.unfinished = len(items)
        self.active: dict[int, _Chain] = {}
        self.slot = executor._slot()

    async def run(self) -> list[StepOutcome | None]:
        self.client = client = await self.x._redis()
        context = json.dumps(
            {
                "stages": self.stages,
                "reply": self.reply,
                "nonce": self.pipe,
                # Nobody listens for step_started: the host watches leases instead.
                "announce": self.events is not None,
            }
        )
        key = self.keys.pipe(self.pipe)
        try:
            for start in range(0, len(self.items), 500):
                fields: dict[str | bytes, str | bytes] = {"ctx": context}
                for i in range(start, min(start + 500, len(self.items))):
                    fields[f"item:{i}"] = json.dumps(self.items[i])
                await client.hset(key, mapping=fields)  # type: ignore[arg-type]
            await client.expire(key, self.x.settings.result_expires_s)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._dispatch())
                tasks.create_task(self._collect())
        finally:
            for chain_ in self.chains:
                self._release(chain_)
            with contextlib.suppress(RedisError):
                await client.delete(key, self.reply)
        return [chain_.final for chain_ in self.chains]

    def _signatures(self, chain_: _Chain) -> Any:
        links = []
        for stage in range(chain_.stage, len(self.stages)):
            pointer = StageMessage(
                v=PROTOCOL_VERSION, pipe=self.pipe, item=chain_.index, stage=stage
            )
            links.append(
                self.x.app.signature(
                    STAGE_TASK,
                    args=(pointer.to_json(),) if stage == chain_.stage else (),
                    task_id=stage_link_id(self.pipe, chain_.index, stage),
                    queue=self.x.settings.queue,
                    argsrepr=f"{self.pipe} item {chain_.index} stage {stage}",
                    kwargsrepr="{}",
                )
            )
        return chain(*links)

    async def _send(self, batch: list[_Chain]) -> None:
        now = time.monotonic()
        for chain_ in batch:
            chain_.sent_at, chain_.started = now, False
            self.active[chain_.index] = chain_
        await self.x._send([self._signatures(c) for c in batch], as_group=True)

    async def _dispatch(self) -> None:
        pending = iter(self.chains)
        chain_ = next(pending, None)
        while chain_ is not None:
            room = min(await self.x._queue_room(self.client), _SEND_BATCH)
            batch: list[_Chain] = []
            while chain_ is not None and len(batch) < room:
                if batch and self.slot.locked():
                    break
                await self.slot.acquire()
                chain_.holds_slot = True
                batch.append(chain_)
                chain_ = next(pending, None)
            await self._send(batch)

    async def _collect(self) -> None:
        interval = self.x.check_interval_s
        next_check = time.monotonic() + interval
        while self.unfinished:
            popped = await self.client.blpop([self.reply], timeout=interval)
            if popped is not None:
                self._notice(json.loads(popped[1]))
                more: Any = await self.client.lpop(self.reply, 512)
                for raw in more or ():
                    self._notice(json.loads(raw))
            if time.monotonic() >= next_check:
                await self._check_stale()
                next_check = time.monotonic() + interval

    def _notice(self, notice: dict[str, Any]) -> None:
        chain_ = self.active.get(notice.get("i", -1))
        if chain_ is None or notice.get("k") != chain_.stage:
            return  # a finished chain, or a duplicate's late word about an earlier link
        kind = notice["t"]
        if kind == "start":
            chain_.started = True
            emit(self.events, StepStarted(task_id=notice["task"], agent=notice["agent"]))
        elif kind == "step":
            outcome = StepOutcome.from_dict(notice["o"])
            emit(self.events, StepFinished.of(outcome))
            chain_.prev, chain_.stage, chain_.started = outcome, chain_.stage + 1, False
            chain_.sent_at = time.monotonic()
            if not outcome.success or chain_.stage == len(self.stages):
                self._finish(chain_, outcome)
        elif kind == "stop":
            final = notice.get("o")
            self._finish(chain_, None if final is None else StepOutcome.from_dict(final))

    def _finish(self, chain_: _Chain, final: StepOutcome | None) -> None:
        chain_.final, chain_.finished = final, True
        self.unfinished -= 1
        self._release(chain_)

    def _release(self, chain_: _Chain) -> None:
        self.active.pop(chain_.index, None)
        if chain_.holds_slot:
            chain_.holds_slot = False
            self.slot.release()

    async def _check_stale(self) -> None:
        """Re-send a chain from its due link when that link's message or worker was lost."""
        now = time.monotonic()
        claim_timeout = self.x.settings.claim_timeout_s
        suspects = [
            c for c in self.active.values() if c.started or now - c.sent_at >= claim_timeout
        ]
        if not suspects:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for chain_ in suspects:
                link = stage_link_id(self.pipe, chain_.index, chain_.stage)
                pipe.exists(self.keys.lease(link))
                pipe.get(self.keys.result(link, self.pipe))
            replies = await pipe.execute()
        resend = []
        for i, chain_ in enumerate(suspects):
            leased, done = replies[2 * i], replies[2 * i + 1]
            if done is not None:
                # The link finished but its word was lost: replay what it recorded.
                recorded = json.loads(str(done, "utf-8") if isinstance(done, bytes) else done)
                if "stop" in recorded:
                    self._notice(
                        {"t": "stop", "i": chain_.index, "k": chain_.stage, "o": recorded["stop"]}
                    )
                else:
                    self._notice({"t": "step", "i": chain_.index, "k": chain_.stage, "o": recorded})
            elif leased:
                chain_.started = True
            else:
                logger.warning(
                    "pipeline %s item #%d stage %d was lost; re-sending its chain from there",
                    self.pipe,
                    chain_.index,
                    chain_.stage,
                )
                resend.append(chain_)
        if resend:
            await self._send(resend)


def _redis_ledger(budget: WorkflowBudget) -> bool:
    try:
        from .ledgers.redis import RedisLedger
    except ImportError:  # pragma: no cover - the budget module ships with its ledgers
        return False
    return isinstance(budget.ledger, RedisLedger)
