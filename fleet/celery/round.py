"""One barrier round on the Celery host: its steps, sent, watched and resolved once each.

The round sends its steps as Celery groups through the executor's shared
:class:`~fleet.celery.dispatch.Dispatcher`, each once it holds a concurrency slot (and
its token reservation), and resolves each step exactly once from the notices the
dispatcher routes to it: the barrier is this host holding one outcome per step.
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
from ..combinators import crash_outcome
from ..config import mask_url
from ..errors import BudgetExhaustedError
from ..events import EventSink, StepFinished, StepStarted, emit
from ..executor import OutcomeCallback
from ..limiters import ProviderLimit
from ..spec import AgentStepSpec, StepOutcome
from .dispatch import HOST_CONNECTIONS, Flight, Notice, Track
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

if TYPE_CHECKING:
    from ..budget import Reservation, WorkflowBudget
    from .executor import CeleryExecutor

__all__ = ["SEND_BATCH", "Round", "broker_failure"]

logger = logging.getLogger("fleet.celery")

SEND_BATCH = 256
"""At most this many steps go out in one Celery group."""


def broker_failure(url: str, error: BaseException) -> str:
    """The output of a step the host could not place because Redis failed it."""
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
        super().__init__(executor._dispatcher())
        self.x = executor
        self.keys = executor.keys
        self.events = events
        self.on_outcome = on_outcome
        self.workflow_id = workflow_id
        self.nonce = uuid.uuid4().hex
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
                    owner=self,
                    index=index,
                    spec=spec,
                    limit=self._limit_of(spec),
                )
            )
        self.open = len(self.entries)
        budget = executor.budget
        self._renew_every = budget.lease_s / 3 if budget is not None else float("inf")
        self._next_renewal = time.monotonic() + self._renew_every

    def _limit_of(self, spec: AgentStepSpec) -> ProviderLimit | None:
        try:
            return self.x.registry().resolve(spec.agent).limit
        except LookupError:  # the worker answers unknown_agent
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
            self.client = client = await self.dispatcher.ready()
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._dispatch())
                    tasks.create_task(self.receive())
                if self.workflow_id is not None:
                    # The round is over and its caller has the outcomes: a later run of
                    # the same workflow must not be served this round's results.
                    await client.delete(*(self.keys.done(e.tid) for e in self.entries))
            finally:
                for entry in self.entries:
                    self.dispatcher.release(entry)
        except* (RedisError, OSError) as group_error:
            await self._fail_rest(group_error.exceptions[0], "unavailable")
        except* Exception as group_error:
            await self._fail_rest(group_error.exceptions[0], "crashed")
        return [entry.outcome for entry in self.entries]  # type: ignore[misc]

    async def _fail_rest(self, error: BaseException, kind: str) -> None:
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
            reply=self.dispatcher.reply,
            nonce=self.nonce,
            workflow_id=self.workflow_id,
            budget=hold,
            journal=self.x.worker_journal and self.workflow_id is not None,
            traceparent=self.traceparent,
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
        except BudgetExhaustedError as error:
            await self._resolve(
                entry,
                StepOutcome.failed(spec.task_id, spec.agent, str(error), error="budget_exhausted"),
            )
            return False
        return True

    async def _dispatch(self) -> None:
        slots = self.dispatcher.slots
        pending = iter(self.entries)
        entry = next(pending, None)
        # With a budget, a reservation may wait for in-flight steps to settle: send each
        # step as soon as it holds its tokens so nothing waits on an unsent sibling.
        batch_limit = 1 if self.x.budget is not None else SEND_BATCH
        while entry is not None:
            # Wait for a slot before anything touches Redis: a waiting step holds nothing.
            await self.dispatcher.acquire(entry)
            room = min(await self.dispatcher.room(), batch_limit)
            batch: list[_Entry] = []
            while True:
                if await self._reserve(entry):
                    batch.append(entry)
                entry = next(pending, None)
                if entry is None or len(batch) >= room or slots.locked():
                    break
                if batch and not self.dispatcher.may_send(entry):
                    break  # send what may go before waiting for this step's limit
                await self.dispatcher.acquire(entry)
            if self.workflow_id is not None and batch:
                batch = await self._reattach(batch)
            if batch:
                await self._send(batch)

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
                self.dispatcher.watch(entry, started=True)
            else:
                to_send.append(entry)
        return to_send

    async def _send(self, batch: list[_Entry]) -> None:
        if not batch:
            return
        for entry in batch:
            if not entry.payload:
                entry.payload = self._payload(entry)
        await self.dispatcher.send(batch, [self._signature(e) for e in batch])

    async def resend(self, flights: list[Flight]) -> None:
        """Send lost steps again, under the same task id and payload."""
        await self._send([f for f in flights if isinstance(f, _Entry) and f.outcome is None])

    # ------------------------------------------------------------------ receive

    async def handle(self, flight: Flight, notice: Notice) -> None:
        """A step started, or finished (its outcome resolves it)."""
        entry = flight
        if not isinstance(entry, _Entry) or entry.outcome is not None:
            return
        if isinstance(notice, Started):
            if not entry.started:
                entry.started = True
                emit(self.events, StepStarted(task_id=entry.spec.task_id, agent=entry.spec.agent))
        elif isinstance(notice, Finished):
            await self._resolve(entry, notice.outcome)
        elif isinstance(notice, Limited):
            emit(self.events, notice.event)

    async def tick(self) -> None:
        """Keep queued steps' reservations alive (the worker renews while a step runs)."""
        if time.monotonic() >= self._next_renewal:
            held = [
                e.reservation
                for e in self.entries
                if e.reservation is not None and e.outcome is None and e.holds_slot
            ]
            await asyncio.gather(*(r.renew() for r in held))
            self._next_renewal = time.monotonic() + self._renew_every

    async def _resolve(self, entry: _Entry, outcome: StepOutcome) -> None:
        if entry.outcome is not None:
            return
        entry.outcome = outcome
        self.open -= 1
        self.dispatcher.release(entry)
        if self.open == 0:
            self.closed()
        if entry.reservation is not None:
            # Settling is idempotent: the worker may already have charged the same usage.
            await asyncio.shield(entry.reservation.settle(outcome.usage.total_tokens))
        emit(self.events, StepFinished.of(outcome))
        if self.on_outcome is not None:
            try:
                await self.on_outcome(entry.index, outcome)
            except Exception as error:
                entry.outcome = crash_outcome(entry.spec, error)


def _redis_ledger(budget: WorkflowBudget) -> bool:
    try:
        from ..ledgers.redis import RedisLedger
    except ImportError:  # pragma: no cover - the budget module ships with its ledgers
        return False
    return isinstance(budget.ledger, RedisLedger)
