"""The state every handle on one workflow run shares: bus, stream, budget, journals, cancel.

:class:`WorkflowRun` is what :meth:`fleet.Workflow.copy` hands on: the event bus and the
run's log (:meth:`WorkflowRun.publish`), budget readings for that log, phase journal ids,
the run's cancellation and its output deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..cancel.signal import Cancellation
from ..deltas import DeltaChannel, MemoryDeltaChannel
from ..eventbus import BufferedLog, EventBus
from ..events import (
    BudgetExhausted,
    EventSink,
    LogEvent,
    PhaseEnd,
    PhaseStart,
    RateLimited,
    StepFinished,
    StepStarted,
    emit,
)
from ..executor import AgentExecutor
from ..runs import RunRegistry, new_run_id

if TYPE_CHECKING:
    from ..asks import AskBook
    from ..budget import BudgetSnapshot, WorkflowBudget
    from ..retention import RedisRetention
    from ..stores import CheckpointStore

__all__ = ["WorkflowRun"]

logger = logging.getLogger(__name__)

_BUS_EVENTS = (
    PhaseStart,
    PhaseEnd,
    LogEvent,
    BudgetExhausted,
    StepStarted,
    StepFinished,
    RateLimited,  # a host's word that a step's model call waited for a provider limit
)


@dataclass
class WorkflowRun:
    """What every copy of a workflow shares."""

    executor: AgentExecutor
    store: CheckpointStore | None
    budget: WorkflowBudget | None
    root_id: str
    step_events: EventSink | None
    stream: BufferedLog | None
    bus: EventBus = field(default_factory=EventBus)
    phase_count: int = 0
    phase_journals: list[str] = field(default_factory=list)
    name_counts: dict[str, int] = field(default_factory=dict)
    exhausted_reported: bool = False
    running_verbs: int = 0
    """Verbs (phases, pipelines, ...) running now: the budget moves only while one does."""
    live_budget: str | None = None
    """The last budget reading logged while a verb ran (JSON), to log only changes."""
    closed: bool = False
    span: Any = None
    """The workflow's trace span, when tracing is on (:mod:`fleet.telemetry`)."""
    board: RunRegistry | None = None
    run_id: str = field(default_factory=new_run_id)
    """The run's one id: its registry record, cancel marker and run log entries."""
    cancellation: Cancellation = field(init=False)
    begun: bool = False
    watcher: asyncio.Task[None] | None = None
    deltas: DeltaChannel = field(default_factory=MemoryDeltaChannel)
    """Where the run's output deltas travel (its executor's channel)."""
    deltas_reader: asyncio.Task[None] | None = None
    """Starts handing deltas to the bus (once someone subscribed with ``deltas=True``)."""
    asked: set[str] = field(default_factory=set)
    """The names this run asked (an ask name is unique within the workflow)."""
    ask_book: AskBook | None = None
    retention: RedisRetention | None = None
    """Sets the expiry of the run's Redis records when it ends (:mod:`fleet.retention`)."""
    owns_retention: bool = False
    """The builder made :attr:`retention` (the run closes it when it ends)."""

    def __post_init__(self) -> None:
        self.cancellation = Cancellation((self.run_id,), root_id=self.root_id)

    def read_deltas(self) -> asyncio.Task[None] | None:
        """Start delivering deltas to the bus, if someone wants them and a loop runs."""
        if self.deltas_reader is None and not self.closed and self.bus.wants_deltas:
            with contextlib.suppress(RuntimeError):  # no running loop: the first verb starts it
                asyncio.get_running_loop()
                self.deltas_reader = asyncio.ensure_future(
                    self.deltas.start(self.bus.publish_delta)
                )
        return self.deltas_reader

    async def stop_deltas(self) -> None:
        """Deliver the deltas still on their way, then stop reading them."""
        reader = self.deltas_reader
        if reader is None:
            return
        try:
            await reader
            await self.deltas.stop()
        except Exception as error:  # live text is lost, the run is not
            logger.warning("workflow %r: output deltas: %s", self.root_id, error)

    def publish(self, event: Any) -> None:
        """Hand ``event`` to every subscriber and queue it for the run's log."""
        self.bus.publish(event)
        if self.stream is not None:
            try:
                self.stream.push({"event": event.to_json()})
            except Exception:
                logger.exception("cannot queue a %s event for the Redis stream", event.type)

    async def record_budget(self, *, flush: bool = False) -> BudgetSnapshot | None:
        """Read the budget and append it to the event log (for ``fleet status``).

        With ``flush``, wait until the log holds it (and every event before it): a verb's
        end is then durable before the next verb spends anything.
        """
        if self.budget is None:
            return None
        try:
            snapshot = await self.budget.snapshot()
        except Exception:
            logger.exception("cannot read the budget of workflow %r", self.root_id)
            return None
        if self.stream is not None:
            self.stream.push({"control": "budget", "snapshot": snapshot.to_json()})
            if flush:
                await self.stream.flush()
        return snapshot

    async def record_live_budget(self) -> None:
        """While a verb runs, log the budget when it moved since the last reading.

        The dashboard's gauge then follows a long phase rather than jumping at its end.
        """
        if self.budget is None or self.stream is None or not self.running_verbs:
            return
        snapshot = (await self.budget.snapshot()).to_json()
        if self.closed or not self.running_verbs:
            return  # the verb's own reading, taken after every step settled, is the last word
        if snapshot != self.live_budget:
            self.live_budget = snapshot
            self.stream.push({"control": "budget", "snapshot": snapshot, "live": "1"})

    def on_step_event(self, event: Any) -> None:
        """Publish a step event the workflow shows, and pass it to the step-event sink."""
        if isinstance(event, _BUS_EVENTS):
            self.publish(event)
        emit(self.step_events, event)

    def journal_id(self, name: str) -> str:
        """``{root_id}/{name}``, then ``#2``, ``#3``… for repeats, in call order."""
        taken = set(self.phase_journals)
        count = self.name_counts.get(name, 0)
        while True:
            count += 1
            candidate = f"{self.root_id}/{name}" + (f"#{count}" if count > 1 else "")
            if candidate not in taken:
                break
        self.name_counts[name] = count
        self.phase_journals.append(candidate)
        return candidate
