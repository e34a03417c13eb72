"""One barrier round on the Celery host: its steps, sent, watched and resolved once each.

The round sends its steps as Celery groups through the executor's shared
:class:`~fleet.celery.dispatch.Dispatcher`, each once it holds a concurrency slot (and
its token reservation), and resolves each step exactly once from the notices the
dispatcher routes to it: the barrier is this host holding one outcome per step.

Longer than our usual ~400 lines: sending, receiving, cancelling and resolving all act
on the round's entries and its step record, and a cancel reaches into each of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import MaxConnectionsError, RedisError

from .. import telemetry
from ..admission import reservation_tokens, reserve_or_refuse
from ..cancel.markers import leave_markers
from ..cancel.signal import CANCELLED, cancelled_outcome
from ..combinators import crash_outcome
from ..config import mask_url
from ..errors import BrokerError
from ..events import EventSink, StepFinished, StepStarted, emit
from ..executor import OutcomeCallback
from ..limiters import ProviderLimit
from ..spec import AgentStepSpec, StepOutcome
from .dispatch import HOST_CONNECTIONS
from .protocol import (
    PROTOCOL_VERSION,
    STEP_TASK,
    BudgetHold,
    Finished,
    Limited,
    Started,
    StepMessage,
    step_summary,
    step_task_id,
)
from .records import StepRecord, record_owner, result_grace_s
from .track import Flight, Notice, Track

if TYPE_CHECKING:
    from ..agents.base import AgentDefinition
    from ..budget import Reservation, WorkflowBudget
    from ..keeper import Held
    from .executor import CeleryExecutor

__all__ = ["SEND_BATCH", "Round", "broker_failure"]

logger = logging.getLogger("fleet.celery")

SEND_BATCH = 256
"""At most this many steps go out in one Celery group."""


def broker_failure(url: str, error: BaseException) -> str:
    """The output of a step the host could not place because Redis failed it."""
    if isinstance(error, BrokerError):  # the start check's one line, already masked
        return str(error)
    if isinstance(error, MaxConnectionsError) or "No connection available" in str(error):
        return (
            f"the fleet host ran out of its {HOST_CONNECTIONS} Redis connections to "
            f"{mask_url(url)} ({type(error).__name__}); Redis itself answered"
        )
    return f"the fleet broker at {mask_url(url)} failed: {type(error).__name__}; is Redis running?"


@dataclass(eq=False, kw_only=True)
class _Entry(Flight):
    """One step of a round as the host tracks it."""

    index: int
    spec: AgentStepSpec
    payload: str = ""
    reservation: Reservation | None = None
    kept: Held | None = None
    """The reservation's lease as the budget's keeper renews it, until the step resolves."""
    outcome: StepOutcome | None = None


class Round(Track):
    """One barrier round: sends its steps, resolves each from the dispatcher's notices."""

    def __init__(
        self,
        executor: CeleryExecutor,
        specs: list[AgentStepSpec],
        events: EventSink | None,
        on_outcome: OutcomeCallback | None,
        workflow_id: str | None,
    ) -> None:
        super().__init__(executor, events)
        self.on_outcome = on_outcome
        self.workflow_id = workflow_id
        self.nonce = uuid.uuid4().hex
        owner, bare = record_owner(self.cancellation, workflow_id, self.nonce)
        settings = executor.settings
        self.record = StepRecord(
            self.keys,
            owner,
            self.nonce,
            bare=bare,
            keep_s=settings.result_expires_s,
            grace_s=result_grace_s(settings.retention_s),
        )
        """The round's fields in its owner's step record (see :mod:`fleet.celery.records`)."""
        self.traceparent: str | None = None
        self.entries: list[_Entry] = []
        seen: set[str] = set()
        for index, spec in enumerate(specs):
            tid = (
                step_task_id(workflow_id, spec)
                if workflow_id is not None
                else "fs-" + uuid.uuid4().hex
            )
            if tid in seen:  # the same step twice in one journaled round
                tid = f"{tid}-{index}"
            seen.add(tid)
            self.entries.append(
                _Entry(
                    tid=tid,
                    nonce=self.nonce,
                    journaled=workflow_id is not None,
                    record=self.record.key,
                    owner=self,
                    index=index,
                    spec=spec,
                    limit=self._limit_of(spec),
                )
            )
        self.open = len(self.entries)
        self._flush_at = 0.0
        """When :meth:`tick` next notes the results read (:meth:`StepRecord.flush`)."""
        self._reserving: list[tuple[_Entry, asyncio.Future[Reservation | StepOutcome]]] = []
        run_markers = self.cancellation.markers if self.cancellation is not None else ()
        self.markers = [*run_markers, self.nonce]
        """What a worker checks before and while running a step of this round."""

    def _limit_of(self, spec: AgentStepSpec) -> ProviderLimit | None:
        definition = self._definition(spec)
        return None if definition is None else definition.limit

    def _definition(self, spec: AgentStepSpec) -> AgentDefinition | None:
        """The step's agent, if this host knows it (if not, the worker answers unknown_agent)."""
        try:
            return self.x.registry().resolve(spec.agent)
        except LookupError:
            return None

    async def run(self) -> list[StepOutcome]:
        """Send, collect and recover every step; one outcome per spec, in order.

        With tracing on, the round is a span its steps' spans (on the workers) descend from.
        """
        if not self.entries:
            return []
        if telemetry.active() is None:
            return await self._run()
        attributes: dict[str, Any] = {"fleet.round.steps": len(self.entries)}
        if self.workflow_id is not None:
            attributes["fleet.workflow.id"] = self.workflow_id
        with telemetry.span("round", attributes):
            self.traceparent = telemetry.current_traceparent()
            return await self._run()

    async def _run(self) -> list[StepOutcome]:
        try:
            return await self._run_kept()
        finally:
            for entry in self.entries:  # none is renewed once the round is over
                self._unkeep(entry)

    async def _run_kept(self) -> list[StepOutcome]:
        try:
            self.client = client = await self.dispatcher.ready()
            try:
                await self.drive(self.entries)
            except asyncio.CancelledError:
                await asyncio.shield(self._abandon())
                raise
            # The round is over and its caller has the outcomes: a later run of the
            # same workflow must not be served this round's results, and a late
            # duplicate of its steps is refused by one field.
            await self.record.close(client, [e.tid for e in self.entries])
        except* (RedisError, OSError) as group_error:
            await self._fail_rest(group_error.exceptions[0], "unavailable")
        except* Exception as group_error:
            await self._fail_rest(group_error.exceptions[0], "crashed")
        return [entry.outcome for entry in self.entries]  # type: ignore[misc]

    async def _fail_rest(self, error: BaseException, kind: str) -> None:
        cancellation = self.cancellation
        reason = self.cancel.reason or (cancellation.reason if cancellation is not None else None)
        if reason is not None:
            # The workflow was cancelled while these steps were being placed (e.g. a
            # reservation interrupted mid-command): they are cancelled, not failed.
            for entry in self.entries:
                if entry.outcome is None:
                    await self._resolve(entry, cancelled_outcome(entry.spec, reason))
            return
        if kind == "unavailable":
            message = broker_failure(self.x.settings.redis_url, error)
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
            ancestors = budget.known_ancestors  # resolved by the reservation
            hold = BudgetHold(
                workflow_id=budget.workflow_id,
                reservation_id=reservation.id,
                tokens=reservation.tokens,
                limit_tokens=budget.limit_tokens,
                lease_s=budget.lease_s,
                ancestors=None if ancestors is None else list(ancestors),
            )
        message = StepMessage(
            v=PROTOCOL_VERSION,
            spec=entry.spec,
            reply=self.dispatcher.reply,
            nonce=self.nonce,
            workflow_id=self.workflow_id,
            record=self.record.owner,
            budget=hold,
            journal=self.x.worker_journal and self.workflow_id is not None,
            traceparent=self.traceparent,
            # Nobody listens for step_started: the dispatcher watches leases instead.
            announce=self.events is not None,
            cancel=self.markers,
            deltas=self.deltas_route,
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
        """Admit the step to the budget; resolves it (and returns False) when refused."""
        budget = self.x.budget
        if budget is None:
            return True
        spec = entry.spec
        tokens = reservation_tokens(
            self._definition(spec), spec, self.x.settings.default_reserve_tokens
        )
        holding = asyncio.ensure_future(
            reserve_or_refuse(budget, spec, tokens, holder=entry.tid, reservation_id=entry.tid)
        )
        try:
            taken = await asyncio.shield(holding)
        except asyncio.CancelledError:
            # Cancelled mid-reservation: the ledger may still grant it; the cancel
            # waits for the answer and settles the hold (see _release_reserving).
            self._reserving.append((entry, holding))
            raise
        if isinstance(taken, StepOutcome):  # refused: it is never sent
            await self._resolve(entry, taken)
            return False
        entry.reservation = taken
        # The budget's keeper renews it (queued, then running) until it resolves.
        entry.kept = taken.budget.keeper().keep(taken)
        return True

    async def dispatch(self) -> None:
        """Reserve and send each step once it holds a slot (a waiting step holds nothing)."""
        # With a budget, a reservation may wait for in-flight steps to settle: send each
        # step as soon as it holds its tokens so nothing waits on an unsent sibling.
        limit = 1 if self.x.budget is not None else SEND_BATCH
        running: set[str] = set()
        if self.workflow_id is not None:
            running = await self._reattach()
        pending = [entry for entry in self.entries if entry.outcome is None]
        async for batch in self.dispatcher.batches(pending, limit):
            if self.cancel.reason is not None:
                return  # cancelled: the task's cancel may have been swallowed by a Redis call
            batch = [entry for entry in batch if await self._reserve(entry)]
            for entry in batch:
                if entry.tid in running:  # its worker's notices (or record) answer for it
                    self.dispatcher.watch(entry, started=True)
            await self._send([entry for entry in batch if entry.tid not in running])

    async def _reattach(self) -> set[str]:
        """A journaled step already done or running (e.g. before a host restart) is not resent.

        One pipeline for the whole round, before anything is reserved: a done step is
        resolved from its done-marker now; the task ids of the running ones are returned
        (each is followed, not sent, once it holds its slot; if it ends meanwhile, the
        dispatcher's check finds its record).
        """
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in self.entries:
                pipe.hget(self.record.key, f"done:{entry.tid}")
                pipe.exists(self.keys.lease(entry.tid))
            replies = await pipe.execute()
        running = set()
        for i, entry in enumerate(self.entries):
            done, leased = replies[2 * i], replies[2 * i + 1]
            if done is not None:
                await self._resolve(entry, StepOutcome.from_json(done))
            elif leased:
                running.add(entry.tid)
        return running

    async def _send(self, batch: list[_Entry]) -> None:
        if not batch:
            return
        for entry in batch:
            if not entry.payload:
                entry.payload = self._payload(entry)
        await self.dispatcher.send(batch, [self._signature(e) for e in batch])

    async def resend(self, flights: list[Flight]) -> None:
        """Send lost steps again, under the same task id and payload.

        Not after a cancel: a lost step of a cancelled round never runs, it ends cancelled.
        """
        lost = [f for f in flights if isinstance(f, _Entry) and f.outcome is None]
        if self.cancel.started:
            for entry in lost:
                reason = self.cancel.reason or CANCELLED
                await self._resolve(entry, cancelled_outcome(entry.spec, reason))
            return
        await self._send(lost)

    # ------------------------------------------------------------------ receive

    async def handle(self, flight: Flight, notice: Notice) -> None:
        """A step started, or finished (its outcome resolves it)."""
        entry = flight
        if not isinstance(entry, _Entry) or entry.outcome is not None:
            return
        if isinstance(notice, Started):
            if not entry.started:
                entry.started = True
                started = StepStarted(
                    task_id=entry.spec.task_id,
                    agent=entry.spec.agent,
                    host_task_id=entry.tid,
                    worker=notice.worker,
                )
                emit(self.events, started)
        elif isinstance(notice, Finished):
            # A step that reached a worker is settled there; the host settles the rest.
            await self._resolve(
                entry, notice.outcome, settle=not notice.settled, journaled=notice.journaled
            )
        elif isinstance(notice, Limited):
            emit(self.events, notice.event)

    async def tick(self) -> None:
        """Act on a cancel (the budget's keeper renews the reservations).

        Also lets the results read since the last tick go (:meth:`StepRecord.flush`),
        unless every step is resolved: the round's end notes them all then.
        """
        now = time.monotonic()
        if self.open and now >= self._flush_at:
            # At most once a check interval: a result read meanwhile stays a little
            # longer, and a duplicate still finds it (claim_step reads the result first).
            self._flush_at = now + self.dispatcher.check_interval_s
            try:
                await self.record.flush(self.client)
            except (RedisError, OSError) as error:  # the results then live result_expires_s
                logger.warning("could not note the round's read results: %s", error)
        if self.cancel.due():
            await self._cancel_now()
        elif self.cancel.expired():
            for entry in self.entries:  # running when cancelled, and its worker never said
                if entry.outcome is None:
                    reason = self.cancel.reason or CANCELLED
                    await self._resolve(entry, cancelled_outcome(entry.spec, reason), settle=False)

    # ------------------------------------------------------------------ cancel

    async def _cancel_now(self) -> None:
        """The workflow was cancelled: mark it for the workers, settle what never ran."""
        reason = self.cancel.begin()
        await leave_markers(self.client, self.markers, reason, key_prefix=self.keys.prefix)
        await self._release_reserving()
        for entry in self.entries:
            if entry.outcome is None and not entry.sent_at:
                await self._resolve(entry, cancelled_outcome(entry.spec, reason))
        await self._sweep_unclaimed(reason)

    async def _release_reserving(self) -> None:
        """Settle at 0 the holds a cancelled dispatch was still asking the ledger for."""
        for entry, holding in self._reserving:
            try:
                taken = await asyncio.wait_for(asyncio.shield(holding), 5.0)
            except (TimeoutError, RedisError, OSError) as error:
                logger.warning(
                    "step %r: its reservation stays held until its lease lapses (%s)",
                    entry.spec.task_id,
                    error,
                )
                continue
            if isinstance(taken, StepOutcome):
                continue  # refused: nothing is held
            entry.reservation = taken
            await asyncio.shield(taken.settle(0))
        self._reserving.clear()

    async def _sweep_unclaimed(self, reason: str) -> None:
        """Once the markers are set no worker can claim a step: an unclaimed one never runs."""
        entries = [e for e in self.entries if e.outcome is None and e.sent_at]
        if not entries:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.exists(self.keys.lease(entry.tid))
                pipe.get(self.keys.result(entry.tid, self.nonce))
            replies = await pipe.execute()
        for i, entry in enumerate(entries):
            leased, record = replies[2 * i], replies[2 * i + 1]
            if record is not None:
                await self._resolve(entry, StepOutcome.from_json(record))
            elif not leased:
                await self._resolve(entry, cancelled_outcome(entry.spec, reason))

    async def _abandon(self) -> None:
        """The caller was cancelled: stop this round's steps on the workers, release holds."""
        reason = "the caller was cancelled"
        # The workflow's own marker only when the workflow was cancelled, not just this round.
        markers = self.markers if self.cancel.reason is not None else [self.nonce]
        try:
            await leave_markers(self.client, markers, reason, key_prefix=self.keys.prefix)
            await self._release_reserving()
            await self._sweep_unclaimed(reason)
            for entry in self.entries:  # reserved, never sent
                if entry.outcome is None and not entry.sent_at:
                    await self._resolve(entry, cancelled_outcome(entry.spec, reason))
        except (RedisError, OSError) as error:
            logger.warning("could not cancel the round's steps on the fleet: %s", error)

    async def _resolve(
        self, entry: _Entry, outcome: StepOutcome, *, settle: bool = True, journaled: bool = False
    ) -> None:
        """``journaled``: the worker wrote the journal record (``on_outcome`` is not told)."""
        if entry.outcome is not None:
            return
        entry.outcome = outcome
        self.open -= 1
        self._unkeep(entry)
        if entry.sent_at:
            self.record.read(entry.tid)
        self.dispatcher.release(entry)
        if self.open == 0:
            self.closed()
        if entry.reservation is not None and settle:
            # No worker said it settled this step. Settling is idempotent: a worker that
            # died after settling, or whose notice was lost, charged the same usage.
            await asyncio.shield(entry.reservation.settle(outcome.usage.total_tokens))
        emit(self.events, StepFinished.of(outcome, host_task_id=entry.tid))
        if self.on_outcome is not None and not journaled:
            try:
                await self.on_outcome(entry.index, outcome)
            except Exception as error:
                entry.outcome = crash_outcome(entry.spec, error)

    def _unkeep(self, entry: _Entry) -> None:
        if entry.kept is not None and entry.reservation is not None:
            entry.reservation.budget.keeper().drop(entry.kept)
            entry.kept = None


def _redis_ledger(budget: WorkflowBudget) -> bool:
    try:
        from ..ledgers.redis import RedisLedger
    except ImportError:  # pragma: no cover - the budget module ships with its ledgers
        return False
    return isinstance(budget.ledger, RedisLedger)
