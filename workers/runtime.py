"""What a worker process knows and does around a step: claim, run, record.

:class:`WorkerRuntime` holds the settings, agents and stages, this process's Redis
client and the Lua scripts of :mod:`fleet.celery.protocol`; it claims a step (or a
chain link), runs the shared step body :func:`fleet.step.run_agent` on this thread's
event loop (under the host's token hold, if any), and records the outcome. One background
thread (:class:`~workers.keeper.LeaseKeeper`) keeps the leases and token holds of running
steps alive, and each running attempt is fenced (:mod:`workers.fencing`): one whose lease
lapsed is stopped and records nothing.

Longer than our usual ~400 lines: claim, finish and the step body share this runtime's
scripts, keeper and fences; what could stand alone (the keeper, the fences, the event
loops) is in modules of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, TypeVar, cast

import redis
from redis import Redis

from fleet.admission import resolve_agent
from fleet.agents import AgentContext, AgentRegistry
from fleet.budget import WorkflowBudget
from fleet.cancel.markers import marker_reason, read_markers
from fleet.cancel.signal import Cancellation, cancelled_outcome
from fleet.celery.protocol import (
    REPLY_TTL_S,
    BudgetHold,
    Limited,
    StageMessage,
    StepMessage,
    stage_link_id,
)
from fleet.celery.records import result_grace_s
from fleet.checkpoint import WorkflowStepRecord
from fleet.config import FleetSettings
from fleet.deltawriter import DeltaWriter, ThreadPublisher
from fleet.errors import PoisonMessageError
from fleet.events import EventSink, RateLimited
from fleet.ledgers.redis import REPLICA_WAIT_MS, RedisLedger
from fleet.limiters import RedisRateLimiter
from fleet.redis.clients import sync_client
from fleet.redis.keys import Keys
from fleet.redis.scripts import execute, script
from fleet.spec import AgentStepSpec, StepOutcome
from fleet.step import close_deltas, holding, run_interruptible, step_context
from fleet.stores.base import encode_meta
from fleet.stores.redis import RedisCheckpointStore

from .fencing import Fence, Fences, charge_stopped
from .keeper import LeaseKeeper
from .loop import OnStepLoop, StepLoop, ThreadLoops

__all__ = ["WorkerRuntime"]

T = TypeVar("T")


logger = logging.getLogger("fleet.worker")


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
        self.keys = Keys(settings.key_prefix)
        self._shared: dict[str, tuple[int, Any]] = {}
        """Values kept for the process's lifetime, each with the pid that made it."""
        self._shared_lock = threading.Lock()
        self._loop = StepLoop()
        self._thread_loops = ThreadLoops()
        self._leases = LeaseKeeper(settings.redis_url, settings.step_lease_s, settings.key_prefix)
        self.fences = Fences()
        """The fences of the running attempts (:mod:`workers.fencing`)."""
        """Renews every step lease and budget reservation of this process (one thread)."""
        # Provider limits, shared with every worker and host on this Redis.
        self.limiter = RedisRateLimiter(settings.redis_url, key_prefix=settings.key_prefix)

    def _process_wide(self, name: str, make: Callable[[], T]) -> T:
        """One ``make()`` per process (made again after a fork), kept for its lifetime.

        Published once ``make()`` has returned: a thread never sees a half-built value.
        The Redis client, the budget ledger and the journal store are kept so: the ledger
        and the journal keep a client per event loop, so every step of the process shares
        their connections (a connection made per step would spend more CPU on connect,
        handshake and close than on the step's own calls).
        """
        found = self._shared.get(name)
        if found is None or found[0] != os.getpid():
            with self._shared_lock:
                found = self._shared.get(name)
                if found is None or found[0] != os.getpid():
                    found = self._shared[name] = (os.getpid(), make())
        return cast(T, found[1])

    def ledger(self) -> RedisLedger:
        """The budget ledger every budgeted step of this process settles through."""
        url, prefix = self.settings.redis_url, self.settings.key_prefix
        return self._process_wide("ledger", lambda: RedisLedger(url, key_prefix=prefix))

    def journal(self) -> RedisCheckpointStore:
        """The journal every journaled step of this process records to."""
        url, prefix = self.settings.redis_url, self.settings.key_prefix
        return self._process_wide("journal", lambda: RedisCheckpointStore(url, key_prefix=prefix))

    def deltas(self) -> DeltaWriter:
        """The writer every streaming step of this process publishes its output through."""
        return self._process_wide("deltas", lambda: DeltaWriter(self.redis))

    def delta_publisher(self, route: str | None, task_id: str) -> ThreadPublisher | None:
        """Where a step's output deltas go: its workflow's stream, if its message names one.

        A stream outside this fleet's key prefix is ignored (with a warning): a message
        must not make a worker write anywhere else.
        """
        if not route:
            return None
        if not route.startswith(self.keys.deltas("")):
            logger.warning("ignoring delta stream %r outside this fleet's key prefix", route)
            return None
        return self.deltas().publisher(route, task_id)

    def redis(self) -> Redis:
        """This process's Redis client (re-created after a fork), with its scripts.

        The first steps of a fresh worker arrive on many threads at once: the client is
        published only once :meth:`_connect` has registered its scripts, so no thread
        sees one without the other.
        """
        return self._process_wide("redis", self._connect)

    def _connect(self) -> Redis:
        client = sync_client(self.settings.redis_url)
        self._claim = partial(script("claim_step"), client)
        self._finish = partial(script("finish"), client)
        self._begin_link = partial(script("begin_link"), client)
        return client

    def run_async(self, coro: Coroutine[Any, Any, Any], *, blocking: bool = False) -> Any:
        """Run ``coro`` on the process's shared event loop (this thread's own if ``blocking``)."""
        return (self._thread_loops if blocking else self._loop).run(coro)

    def cancel_reason(self, markers: list[str]) -> str | None:
        """Why the step was cancelled, if one of its cancel markers is in Redis."""
        return read_markers(self.redis(), markers, key_prefix=self.settings.key_prefix)

    # ------------------------------------------------------------------ claim / finish

    def claim(
        self, tid: str, nonce: str, reply: str, notice: str, markers: list[str], steps: str
    ) -> tuple[str, Any]:
        """Claim a step: ``("claimed", owner)``, ``("done", outcome)``, ``("held", owner)``.

        ``("cancelled", reason)`` when one of the step's cancel ``markers`` is present:
        nothing is taken then; ``("over", "")`` when the step record of ``steps`` (its
        owner, see :meth:`~fleet.redis.keys.Keys.steps`) says the host already has this
        dispatch's outcome.
        """
        self.redis()
        owner = f"{uuid.uuid4().hex[:12]}"
        taken_at = time.monotonic()
        status, value = self._claim(
            keys=[
                self.keys.steps(steps),
                self.keys.result(tid, nonce),
                self.keys.lease(tid),
                reply,
                *(self.keys.cancel(marker) for marker in markers),
            ],
            args=[owner, int(self.settings.step_lease_s * 1000), notice, REPLY_TTL_S, tid, nonce],
        )
        status = status.decode()
        if status == "claimed":
            self._take(self.keys.lease(tid), owner, taken_at)
            return status, owner
        if status == "cancelled":
            return status, marker_reason(value)
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
        steps: str | None = None,
        journal: tuple[str, str, str, str] | None = None,
        hold: BudgetHold | None = None,
        used_tokens: int = 0,
    ) -> bool:
        """Record the result of this dispatch, notify the host, drop our lease.

        ``resumable`` also records it as the step's done-marker in the step record of
        ``steps`` (the record's owner, default ``nonce``), which a host that resumes the
        workflow finds instead of sending the step again; ``journal`` (see
        :meth:`journal_write`) writes the step's journal record with it.

        With a token ``hold``, the reservation is settled at ``used_tokens`` in the same
        script (``finish_settle.lua``; on Sentinel pipelined with the ledger's ``WAIT``:
        one round trip), so the ``notices`` may say it is settled. An attempt that
        records nothing has its usage charged on its own id
        (:func:`~workers.fencing.charge_stopped`), in the script or, when its fence
        tripped here, through the ledger.

        Returns:
            ``False`` when nothing was recorded because the attempt's lease lapsed: its
            fence tripped here, or Redis refused the write (the lease no longer holds
            ``owner``, the attempt's token). Another attempt owns the step then.
        """
        fence = self.fences.get(self.keys.lease(tid), owner)
        self.abandon(tid, owner)
        if fence is None or fence.lapsed():
            if hold is not None:
                self.settle(hold, used_tokens, attempt=owner)
            return False
        keys, args = self._finish_call(tid, nonce, owner, record, reply, resumable, steps, journal)
        if hold is None:
            return bool(self._finish(keys=keys, args=[*args, *notices]))
        chain = (hold.workflow_id, *self.run_async(self._budget(hold).ancestors()))
        keys += [part for account in chain for part in self.keys.budget(account)]
        args += [hold.workflow_id, hold.reservation_id, used_tokens, 0, *notices]
        ledger = self.ledger()
        wait = ledger.write_waits()
        pipe = self.redis().pipeline(transaction=False)
        script("finish_settle").queue(pipe, keys, args)
        if wait:
            pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)  # type: ignore[no-untyped-call]
        replies = execute(pipe)
        if wait:
            ledger.acknowledged(replies[1])
        return bool(replies[0])

    def _finish_call(
        self,
        tid: str,
        nonce: str,
        owner: str,
        record: str,
        reply: str,
        resumable: bool,
        steps: str | None,
        journal: tuple[str, str, str, str] | None,
    ) -> tuple[list[str], list[str | int]]:
        """The keys and first arguments of ``finish.lua`` (and ``finish_settle.lua``)."""
        key, field, value, meta = journal or ("", "", "", "")
        steps_key = self.keys.steps(steps or nonce)
        keys = [self.keys.result(tid, nonce), self.keys.lease(tid), reply, steps_key]
        keys.append(key or steps_key)
        args: list[str | int] = [
            record,
            self.settings.result_expires_s,
            owner,
            REPLY_TTL_S,
            "1" if resumable else "0",
            tid,
            nonce,
            result_grace_s(self.settings.retention_s),
            field,
            value,
            meta,
        ]
        return keys, args

    def journal_write(
        self, workflow_id: str, spec: AgentStepSpec, outcome: StepOutcome
    ) -> tuple[str, str, str, str] | None:
        """What :meth:`finish` writes into the journal for a step: key, field, record, meta.

        ``None`` (and a logged reason) when the outcome cannot be journaled.
        """
        try:
            record = WorkflowStepRecord.for_outcome(workflow_id, spec, outcome)
        except Exception:
            # Losing a journal record must not fail the live step; the host journals too.
            logger.exception("could not journal step %r of %r", spec.task_id, workflow_id)
            return None
        key = self.journal().key(workflow_id)
        return key, f"step:{spec.task_id}", record.to_json(), encode_meta(workflow_id)

    def settle(self, hold: BudgetHold, used_tokens: int, *, attempt: str = "") -> bool:
        """Charge what a step used to the reservation the host made for it.

        ``attempt`` (the token of an attempt that recorded nothing) charges the usage on
        its own id instead (:func:`~workers.fencing.charge_stopped`).

        Returns:
            Whether the step's reservation was settled here (the host then does not
            settle it again); ``False`` for an ``attempt``'s charge or a failed settle.
        """
        budget = self._budget(hold)
        rid = hold.reservation_id
        if attempt:
            charge = charge_stopped(budget, rid, attempt, used_tokens)
        else:
            charge = budget.reservation(rid, hold.tokens).settle(used_tokens)
        try:
            self.run_async(charge)
        except Exception:
            # The notice then says unsettled: the host settles it with the outcome.
            logger.exception("could not settle reservation %s (attempt %r)", rid, attempt)
            return False
        return not attempt

    def _budget(self, hold: BudgetHold) -> WorkflowBudget:
        """The budget a step's hold belongs to (its reservation kept by the lease thread)."""
        budget = WorkflowBudget(
            hold.limit_tokens,
            ledger=self.ledger(),
            workflow_id=hold.workflow_id,
            lease_s=hold.lease_s,
            keeper=self._leases,
        )
        if hold.ancestors is not None:
            budget.adopt_ancestors(hold.ancestors)
        return budget

    def begin_link(self, message: StageMessage) -> tuple[str, Any, Any, Any, str]:
        """Read a chain link's context, item and previous outcome, and claim it: one trip.

        Returns ``(status, context, item, previous, owner)``; status is ``claimed``,
        ``done`` or ``held`` (a duplicate), or ``expired`` (the pipeline's context is gone).
        """
        self.redis()
        owner = uuid.uuid4().hex[:12]
        k = message.stage
        link = stage_link_id(message.pipe, message.item, k)
        previous = stage_link_id(message.pipe, message.item, k - 1) if k else link
        taken_at = time.monotonic()
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
        self._take(self.keys.lease(link), owner, taken_at)
        return status, reply[1], reply[2], reply[3], owner

    def _take(self, key: str, owner: str, taken_at: float) -> None:
        """Keep the lease ``key`` just claimed as ``owner``, fenced (:mod:`workers.fencing`)."""
        held = self._leases.hold(key, owner, taken_at=taken_at, on_lapse=self.fences.lapsed)
        self.fences.open(key, owner, held)

    def abandon(self, tid: str, owner: str = "") -> None:
        """Stop renewing our lease on ``tid`` (it lapses; the host re-sends the step).

        With ``owner`` (the attempt's token), only if that attempt still holds it here.
        """
        key = self.keys.lease(tid)
        if self.fences.close(key, owner) is not None or not owner:
            self._leases.release(key)

    def notify(self, reply: str, *notices: str) -> None:
        """Push ``notices`` on a host's reply list and renew its expiry, in one round trip.

        Every push outside the Lua scripts (which do the same) goes through here: the host
        deletes its list as it reads it, so a push after its host has gone creates the list
        again, and it must not come back without an expiry.
        """
        pipe = self.redis().pipeline(transaction=True)
        pipe.rpush(reply, *notices)
        pipe.expire(reply, REPLY_TTL_S)
        pipe.execute()

    def check_reply(self, reply: str) -> None:
        """A message may only name a reply list under this fleet's key prefix."""
        if not reply.startswith(self.keys.reply("")):
            raise PoisonMessageError(
                f"reply list {reply!r} is outside key prefix {self.settings.key_prefix!r}"
            )

    # ------------------------------------------------------------------ the step body

    def execute(
        self,
        spec: AgentStepSpec,
        worker: str,
        message: StepMessage | None,
        *,
        tid: str = "",
        markers: Sequence[str] = (),
        lease: str = "",
        deltas: str | None = None,
    ) -> StepOutcome:
        """Run one step here with the shared step body; never raises.

        With a step ``message``, the ``rate_limited`` events of the step (task ``tid``)
        go to the host on its reply list. While it runs, the lease thread watches
        ``markers``: when one appears, the step's task is cancelled on this thread's loop
        and the step ends ``cancelled``. Its output deltas go to the stream the message
        names, else to ``deltas`` (a chain link's, from its pipeline's context). The same
        happens when the fence of its ``lease`` trips (:mod:`workers.fencing`); the caller
        then records nothing. The step's budget hold is settled by the caller
        (:meth:`settle`), once it knows whether the outcome was recorded.
        """
        started = time.monotonic()
        definition = resolve_agent(self.registry, spec, worker=worker)
        if isinstance(definition, StepOutcome):
            return definition
        ctx = step_context(
            definition,
            spec,
            started=started,
            worker=worker,
            limiter=self.limiter,
            events=None if message is None else self._forward(message.reply, tid),
            workflow_id=None if message is None else message.workflow_id,
            traceparent=None if message is None else message.traceparent,
            deltas=self.delta_publisher(
                message.deltas if message is not None else deltas, spec.task_id
            ),
        )
        fence = self.fences.get(lease) if lease else None
        if fence is not None:
            ctx.attempt, ctx.fence = fence.token, fence.check
        blocking = getattr(definition, "blocking", False)
        cancellation = Cancellation(markers) if markers or fence is not None else None
        body = self._run(definition, spec, ctx, started, message, cancellation, fence)
        if cancellation is not None:
            stop = OnStepLoop(cancellation.cancel)
            self._leases.markers.watch(lease, markers, stop)
            if fence is not None:
                fence.on_trip(stop)
            body = stop.run(body)
        try:
            outcome: StepOutcome = self.run_async(body, blocking=blocking)
        finally:
            if cancellation is not None:
                self._leases.markers.unwatch(lease)
            close_deltas(ctx)  # its last text is in Redis before its outcome
        return outcome

    def _forward(self, reply: str, tid: str) -> EventSink:
        """A sink that hands the host a step's ``rate_limited`` events (others stay here)."""

        def sink(event: object) -> None:
            if isinstance(event, RateLimited):
                try:
                    self.notify(reply, Limited(id=tid, event=event).to_json())
                except redis.RedisError as error:
                    logger.warning("could not tell the host of a rate_limited wait: %s", error)

        return sink

    async def _run(
        self,
        definition: Any,
        spec: AgentStepSpec,
        ctx: AgentContext,
        started: float,
        message: StepMessage | None,
        cancellation: Cancellation | None,
        fence: Fence | None,
    ) -> StepOutcome:
        if fence is not None and fence.lapsed():
            # Paused or cut off between the claim and now: the agent must not start.
            fence.trip()
            return cancelled_outcome(spec, fence.reason, worker=ctx.worker)
        hold = None if message is None else message.budget
        if hold is None:
            return await run_interruptible(
                definition, spec, ctx, started=started, cancellation=cancellation
            )
        return await self._run_held(hold, definition, spec, ctx, started, cancellation)

    async def _run_held(
        self,
        hold: BudgetHold,
        definition: Any,
        spec: AgentStepSpec,
        ctx: AgentContext,
        started: float,
        cancellation: Cancellation | None,
    ) -> StepOutcome:
        """Run under the host's reservation, keeping its lease alive (the caller settles).

        The process's lease thread renews it (and every dollar hold of the step's model
        calls): the step's end hands it back without waiting on Redis.
        """
        budget = self._budget(hold)
        reservation = budget.reservation(hold.reservation_id, hold.tokens)
        try:
            async with holding(reservation, ctx, settle=False):
                return await run_interruptible(
                    definition, spec, ctx, started=started, cancellation=cancellation
                )
        except BaseException:
            # No outcome will be recorded: charge what this attempt used on its own id.
            rid, used = hold.reservation_id, ctx.used.total_tokens
            try:
                await asyncio.shield(charge_stopped(budget, rid, ctx.attempt, used))
            except Exception:
                logger.exception("could not settle reservation %s (attempt %r)", rid, ctx.attempt)
            raise
