"""The worker's tasks: ``fleet.run_step`` (one step) and ``fleet.run_stage`` (one chain link).

Both are sync shims at the edge: each decodes its JSON message (a poison message is
rejected with a logged reason and never executed), claims the step (a done-marker or
a live lease elsewhere means this delivery is a duplicate: the agent does not run
twice), runs the shared step body :func:`fleet.local.run_agent` on this thread's event
loop, records the outcome and tells the host on its reply list.

``bench.noop`` is a plain no-op task the benchmark compares fleet against.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject

from fleet.agents import AgentContext, AgentRegistry
from fleet.budget import WorkflowBudget
from fleet.celery import (
    CLAIM_SCRIPT,
    FINISH_SCRIPT,
    PROTOCOL_VERSION,
    RENEW_SCRIPT,
    STAGE_TASK,
    STEP_TASK,
    BudgetHold,
    StageMessage,
    StepMessage,
    _Keys,
)
from fleet.checkpoint import WorkflowStepRecord
from fleet.config import FleetSettings
from fleet.errors import SpecError, UnknownAgentError
from fleet.ledgers.redis import RedisLedger
from fleet.local import run_agent
from fleet.redisclient import sync_client
from fleet.spec import AgentStepSpec, StepOutcome
from fleet.stores.redis import RedisCheckpointStore

__all__ = ["BENCH_NOOP_TASK", "WorkerRuntime", "register_tasks"]

logger = logging.getLogger("fleet.worker")

BENCH_NOOP_TASK = "bench.noop"
"""A raw Celery no-op task: the baseline ``bench/celery_host.py`` measures fleet against."""

_REPLY_TTL_S = 3600


BEGIN_LINK_SCRIPT = """
-- KEYS: pipeline hash, previous link's result, this link's result, this link's lease
-- ARGV: item field, owner, lease ms, stage
local ctx = redis.call('HGET', KEYS[1], 'ctx')
local item = redis.call('HGET', KEYS[1], ARGV[1])
local prev = ''
if tonumber(ARGV[4]) > 0 then prev = redis.call('GET', KEYS[2]) end
if not ctx or not item or not prev then return {'expired'} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'done'} end
if redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'claimed', ctx, item, prev}
end
return {'held'}
"""
"""Read what a chain link needs and claim it, in one round trip."""


class PoisonMessage(ValueError):
    """A message this worker cannot trust: never executed."""


def _parse(model: type[Any], payload: object) -> Any:
    if not isinstance(payload, str):
        raise PoisonMessage(f"expected JSON text, got {type(payload).__name__}")
    try:
        head = json.loads(payload)
    except ValueError as error:
        raise PoisonMessage(f"not valid JSON ({error})") from None
    except RecursionError:
        raise PoisonMessage("JSON nested too deeply to decode") from None
    version = head.get("v") if isinstance(head, dict) else None
    # type() rather than ==: JSON `true` must not pass for version 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise PoisonMessage(
            f"unknown message schema version {version!r} (this worker speaks "
            f"{PROTOCOL_VERSION}); upgrade the worker or the host so they match"
        )
    try:
        return model.from_dict(head)
    except SpecError as error:
        raise PoisonMessage(str(error)) from None


class _LeaseKeeper:
    """Renews this process's step leases from one background thread.

    A thread rather than the step's event loop, so a lease stays alive while an agent
    hogs its loop; it stops with the process, so a killed worker's leases lapse.
    """

    def __init__(self, client: Callable[[], redis.Redis], lease_ms: int) -> None:
        self._client = client
        self._lease_ms = lease_ms
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pid = 0

    def hold(self, key: str, owner: str) -> None:
        with self._lock:
            self._held[key] = owner
            if self._pid != os.getpid():  # first use in this (possibly forked) process
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="fleet-leases", daemon=True).start()

    def release(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def _run(self) -> None:
        renew = self._client().register_script(RENEW_SCRIPT)
        while True:
            time.sleep(self._lease_ms / 3000)
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                pipe = self._client().pipeline(transaction=False)
                for key, owner in held:
                    renew(keys=[key], args=[owner, self._lease_ms], client=pipe)
                pipe.execute()
            except redis.RedisError as error:
                logger.warning("could not renew %d step leases: %s", len(held), error)


class WorkerRuntime:
    """What a worker process knows: settings, agents, stages, its Redis connections."""

    def __init__(
        self,
        settings: FleetSettings,
        registry: AgentRegistry,
        stages: dict[str, Callable[..., Any]],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.stages = stages
        self.keys = _Keys(settings.key_prefix)
        self._redis: redis.Redis | None = None
        self._pid = 0
        self._local = threading.local()
        self._leases = _LeaseKeeper(self.redis, int(settings.step_lease_s * 1000))

    def redis(self) -> redis.Redis:
        """This process's Redis client (re-created after a fork)."""
        if self._redis is None or self._pid != os.getpid():
            self._redis = sync_client(self.settings.redis_url)
            self._pid = os.getpid()
            self._claim = self._redis.register_script(CLAIM_SCRIPT)
            self._finish = self._redis.register_script(FINISH_SCRIPT)
            self._begin_link = self._redis.register_script(BEGIN_LINK_SCRIPT)
        return self._redis

    def run_async(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on this thread's own event loop (kept for the thread's lifetime)."""
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop.run_until_complete(coro)

    # ------------------------------------------------------------------ claim / finish

    def claim(self, tid: str, nonce: str, reply: str, notice: str) -> tuple[str, Any]:
        """``("claimed", owner)``, ``("done", outcome json)`` or ``("held", owner)``."""
        self.redis()
        owner = f"{uuid.uuid4().hex[:12]}"
        status, value = self._claim(
            keys=[self.keys.done(tid), self.keys.result(tid, nonce), self.keys.lease(tid), reply],
            args=[owner, int(self.settings.step_lease_s * 1000), notice, _REPLY_TTL_S],
        )
        status = status.decode()
        if status == "claimed":
            self._leases.hold(self.keys.lease(tid), owner)
            return status, owner
        return status, value

    def finish(
        self,
        tid: str,
        nonce: str,
        owner: str,
        record: str,
        reply: str,
        *notices: str,
        resumable: bool = False,
    ) -> None:
        """Record the result of this dispatch, notify the host, drop our lease.

        ``resumable`` also records it as the step's done-marker, which a host that
        resumes the workflow finds instead of sending the step again.
        """
        self.abandon(tid)
        self._finish(
            keys=[self.keys.result(tid, nonce), self.keys.lease(tid), reply, self.keys.done(tid)],
            args=[
                record,
                self.settings.result_expires_s,
                owner,
                _REPLY_TTL_S,
                "1" if resumable else "0",
                *notices,
            ],
        )

    def begin_link(self, message: StageMessage, link: str) -> tuple[str, Any, Any, Any, str]:
        """Read a chain link's context, item and previous outcome, and claim it: one trip.

        Returns ``(status, context, item, previous, owner)``; status is ``claimed``,
        ``done`` or ``held`` (a duplicate), or ``expired`` (the pipeline's context is gone).
        """
        self.redis()
        owner = uuid.uuid4().hex[:12]
        k = message.stage
        previous = f"fp-{message.pipe}-{message.item}-{k - 1}" if k else link
        reply = self._begin_link(
            keys=[
                self.keys.pipe(message.pipe),
                self.keys.result(previous, message.pipe),
                self.keys.result(link, message.pipe),
                self.keys.lease(link),
            ],
            args=[f"item:{message.item}", owner, int(self.settings.step_lease_s * 1000), k],
        )
        status = reply[0].decode()
        if status != "claimed":
            return status, None, None, None, owner
        self._leases.hold(self.keys.lease(link), owner)
        return status, reply[1], reply[2], reply[3], owner

    def abandon(self, tid: str) -> None:
        """Stop renewing our lease on ``tid`` (it lapses; the host re-sends the step)."""
        self._leases.release(self.keys.lease(tid))

    def check_reply(self, reply: str) -> None:
        """A message may only name a reply list under this fleet's key prefix."""
        if not reply.startswith(self.keys.reply("")):
            raise PoisonMessage(
                f"reply list {reply!r} is outside key prefix {self.settings.key_prefix!r}"
            )

    # ------------------------------------------------------------------ the step body

    def execute(self, spec: AgentStepSpec, worker: str, message: StepMessage | None) -> StepOutcome:
        """Run one step here with the shared step body; never raises."""
        started = time.monotonic()
        try:
            definition = self.registry.resolve(spec.agent)
        except UnknownAgentError as error:
            return StepOutcome.failed(
                spec.task_id, spec.agent, str(error), error="unknown_agent", worker=worker
            )
        ctx = AgentContext(
            spec=spec,
            deadline=None if spec.timeout_s is None else started + spec.timeout_s,
            worker=worker,
            workflow_id=None if message is None else message.workflow_id,
        )
        hold = None if message is None else message.budget
        if hold is not None:
            ctx.held_tokens = hold.tokens
        outcome: StepOutcome = self.run_async(self._run(definition, spec, ctx, started, message))
        return outcome

    async def _run(
        self,
        definition: Any,
        spec: AgentStepSpec,
        ctx: AgentContext,
        started: float,
        message: StepMessage | None,
    ) -> StepOutcome:
        hold = None if message is None else message.budget
        if hold is None:
            outcome = await run_agent(definition, spec, ctx, started=started)
        else:
            outcome = await self._run_held(hold, definition, spec, ctx, started)
        if message is not None and message.journal and message.workflow_id and outcome.success:
            await self._journal(message.workflow_id, spec, outcome)
        return outcome

    async def _run_held(
        self,
        hold: BudgetHold,
        definition: Any,
        spec: AgentStepSpec,
        ctx: AgentContext,
        started: float,
    ) -> StepOutcome:
        """Run under the host's reservation: keep its lease alive, settle what was used."""
        ledger = RedisLedger(self.settings.redis_url, key_prefix=self.settings.key_prefix)
        budget = WorkflowBudget(
            hold.limit_tokens, ledger=ledger, workflow_id=hold.workflow_id, lease_s=hold.lease_s
        )
        reservation = budget.reservation(hold.reservation_id, hold.tokens)
        ctx.budget = budget  # model calls reserve their dollars in the same accounts
        try:
            async with reservation.kept_alive():
                outcome = await run_agent(definition, spec, ctx, started=started)
        finally:
            try:
                await asyncio.shield(reservation.settle(ctx.used.total_tokens))
            except Exception:
                # The host settles the same reservation (idempotently) with the outcome.
                logger.exception("could not settle reservation %s", hold.reservation_id)
            await ledger.close()
        return outcome

    async def _journal(self, workflow_id: str, spec: AgentStepSpec, outcome: StepOutcome) -> None:
        store = RedisCheckpointStore(self.settings.redis_url, key_prefix=self.settings.key_prefix)
        try:
            record = WorkflowStepRecord.for_outcome(workflow_id, spec, outcome)
            await store.record_step(workflow_id, record)
        except Exception:
            # Losing a journal record must not fail the live step; the host journals too.
            logger.exception("could not journal step %r of %r", spec.task_id, workflow_id)
        finally:
            await store.close()


# --------------------------------------------------------------------------- tasks


def _start_notice(tid: str, worker: str) -> str:
    return json.dumps({"t": "start", "id": tid, "w": worker})


def _done_notice(tid: str, outcome_json: str) -> str:
    return f'{{"t":"done","id":{json.dumps(tid)},"o":{outcome_json}}}'


def _summary(outcome: StepOutcome, **extra: Any) -> dict[str, Any]:
    """What a task returns (and Flower shows): never the output or the prompt."""
    return {
        "task_id": outcome.task_id,
        "agent": outcome.agent,
        "success": outcome.success,
        "error": outcome.error,
        **extra,
    }


def run_step(runtime: WorkerRuntime, request: Any, payload: object) -> dict[str, Any]:
    """The body of ``fleet.run_step``."""
    tid, worker = request.id, request.hostname or "worker"
    try:
        message: StepMessage = _parse(StepMessage, payload)
        runtime.check_reply(message.reply)
    except PoisonMessage as error:
        logger.error("rejected %s message %s: %s; it will not run", STEP_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    spec = message.spec
    status, value = runtime.claim(tid, message.nonce, message.reply, _start_notice(tid, worker))
    if status == "done":
        # A duplicate of a step that already finished: hand back the recorded outcome.
        runtime.redis().rpush(message.reply, _done_notice(tid, value.decode()))
        logger.info("step %s (task %s) already ran; not running it again", spec.task_id, tid)
        return {"task_id": spec.task_id, "agent": spec.agent, "duplicate": True}
    if status == "held":
        logger.info("step %s (task %s) is running elsewhere; duplicate dropped", spec.task_id, tid)
        return {"task_id": spec.task_id, "agent": spec.agent, "duplicate": True}
    try:
        outcome = runtime.execute(spec, worker, message)
    except BaseException:
        runtime.abandon(tid)  # let the lease lapse: the host will send the step again
        raise
    # Any outcome answers duplicates of this dispatch; a journaled success also answers a
    # host that resumes the workflow (a failure runs again on resume).
    record = outcome.to_json()
    runtime.finish(
        tid,
        message.nonce,
        value,
        record,
        message.reply,
        _done_notice(tid, record),
        resumable=outcome.success and message.workflow_id is not None,
    )
    return _summary(outcome)


def _stop_chain(request: Any) -> None:
    """Send no further link of this chain (Celery reads ``request.chain`` after we return)."""
    request.chain = None
    request.callbacks = None


def run_stage(runtime: WorkerRuntime, request: Any, pointer: object) -> str | dict[str, Any]:
    """The body of ``fleet.run_stage``: one stage of one item's chain.

    Returns the pointer the next link receives, or stops the chain (the stage returned
    ``None``, crashed, or its step failed, or this delivery is a duplicate).
    """
    tid, worker = request.id, request.hostname or "worker"
    try:
        message: StageMessage = _parse(StageMessage, pointer)
    except PoisonMessage as error:
        logger.error("rejected %s message %s: %s; it will not run", STAGE_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    client = runtime.redis()
    i, k = message.item, message.stage
    link = f"fp-{message.pipe}-{i}-{k}"
    status, context_raw, item_raw, prev_raw, owner = runtime.begin_link(message, link)
    if status == "expired":
        logger.warning("pipeline %s item #%d: its context expired; chain dropped", message.pipe, i)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "expired": True}
    if status != "claimed":
        logger.info("link %s already ran or is running; duplicate dropped", link)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "duplicate": True}
    context = json.loads(context_raw)
    reply, names = context["reply"], context["stages"]
    try:
        runtime.check_reply(reply)
        stage = runtime.stages[names[k]]
    except (PoisonMessage, IndexError, KeyError) as error:
        runtime.abandon(link)
        logger.error("rejected %s message %s: %s; it will not run", STAGE_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    prev = StepOutcome.from_json(prev_raw) if k else None
    try:
        spec = stage(prev, json.loads(item_raw))
        crashed = False
    except Exception as error:
        logger.warning(
            "pipeline %s item #%d stage %r crashed: %s: %s",
            message.pipe,
            i,
            names[k],
            type(error).__name__,
            error,
        )
        spec, crashed = None, True
    if spec is not None and context.get("announce", True):
        start = {"t": "start", "i": i, "k": k, "task": spec.task_id, "agent": spec.agent}
        client.rpush(reply, json.dumps(start))
    if spec is None:
        final = None if crashed or prev is None else prev.to_dict()
        stop = json.dumps({"t": "stop", "i": i, "k": k, "o": final})
        runtime.finish(link, context["nonce"], owner, json.dumps({"stop": final}), reply, stop)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "stopped": True}
    try:
        outcome = runtime.execute(spec, worker, None)
    except BaseException:
        runtime.abandon(link)
        raise
    record = outcome.to_json()
    notice = f'{{"t":"step","i":{i},"k":{k},"o":{record}}}'
    runtime.finish(link, context["nonce"], owner, record, reply, notice)
    if not outcome.success or k + 1 >= len(names):
        _stop_chain(request)
        return _summary(outcome)
    pipe = json.dumps(message.pipe)
    return f'{{"v":{PROTOCOL_VERSION},"pipe":{pipe},"item":{i},"stage":{k + 1}}}'


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register fleet's tasks on ``app``, bound to ``runtime``."""

    # shared=False: a shared task would be added to every Celery app created later in this
    # process, bound to this runtime (and clash with that app's own registration).
    @app.task(
        name=STEP_TASK,
        bind=True,
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def fleet_run_step(self: Any, payload: object) -> dict[str, Any]:
        return run_step(runtime, self.request, payload)

    @app.task(
        name=STAGE_TASK,
        bind=True,
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def fleet_run_stage(self: Any, pointer: object) -> str | dict[str, Any]:
        return run_stage(runtime, self.request, pointer)

    @app.task(name=BENCH_NOOP_TASK, shared=False)
    def bench_noop(*args: Any) -> Any:
        return args[0] if args else None

    _ = (fleet_run_step, fleet_run_stage, bench_noop)
