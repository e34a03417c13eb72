"""The workflow facade: the verbs a program is written in, durable phases and live events.

A :class:`Workflow` wraps one executor with the grammar (``agent``, ``parallel``,
``phase``, ``pipeline``, ``loop``, ``log``) and an event bus::

    store = open_store("sqlite:.fleet/journal.db")
    workflow = Workflow.builder(executor).with_store(store).with_root_id("nightly").build()
    async with workflow:                      # finish() on success
        drafts = await workflow.phase("draft", specs)
        reviews = await workflow.phase("review", review_specs(drafts))

With a store, each phase is journaled under ``"{root_id}/{name}"`` and stays journaled
until the workflow finishes, so running the same program again with the same root id
after a crash serves every completed step from the journal instead of re-running it.

Events (:data:`fleet.events.WorkflowEvent`) go to every in-process subscriber and,
when configured, to a capped Redis stream ``{key_prefix}:events:{root_id}`` that another
process can follow (``fleet watch ROOT_ID``). Delivery never blocks the workflow: a
subscriber that falls behind loses its oldest events and is told how many
(:class:`Lagged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import telemetry
from .cancel.signal import Cancellation, use_cancellation
from .combinators import LoopPredicate, execute_loop, execute_pipeline, execute_steps_parallel
from .deltas import DeltaChannel, MemoryDeltaChannel, use_deltas
from .errors import AskError, WorkflowCancelledError, WorkflowClosedError
from .eventbus import (
    DEFAULT_SUBSCRIBER_CAPACITY,
    BufferedLog,
    EventBus,
    EventStream,
    Lagged,
    Subscription,
    event_stream_key,
)
from .events import (
    BudgetExhausted,
    EventSink,
    LogEvent,
    PhaseEnd,
    PhaseStart,
    RateLimited,
    StepFinished,
    StepStarted,
    WorkflowCancelled,
    emit,
)
from .executor import AgentExecutor, PipelineStage
from .keeper import stop_task
from .resumable import execute_steps_parallel_resumable
from .runs import HEARTBEAT_S, RunRegistry, RunState, new_run_id
from .spec import AgentStepSpec, StepOutcome

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .asks import AskBook
    from .budget import BudgetSnapshot, WorkflowBudget
    from .retention import RedisRetention
    from .stores import CheckpointStore

__all__ = [
    "DEFAULT_SUBSCRIBER_CAPACITY",
    "Lagged",
    "Subscription",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowClosedError",
    "event_stream_key",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")
D = TypeVar("D")
_NO_DEFAULT: Any = object()
"""``Workflow.ask`` without a ``default``: a timeout raises ``AskTimeout``."""

_BUS_EVENTS = (
    PhaseStart,
    PhaseEnd,
    LogEvent,
    BudgetExhausted,
    StepStarted,
    StepFinished,
    RateLimited,  # a host's word that a step's model call waited for a provider limit
)

CANCEL_POLL_S = 0.25
"""How often a running workflow looks at its cancel board for a ``fleet cancel``."""


def _json_safe(fields: dict[str, Any]) -> dict[str, Any]:
    try:
        safe = json.loads(json.dumps(fields, default=str))
    except (TypeError, ValueError):
        safe = {str(key): repr(value) for key, value in fields.items()}
    return safe if isinstance(safe, dict) else {}


@dataclass
class _Run:
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


@dataclass(frozen=True)
class WorkflowBuilder:
    """Configures a :class:`Workflow`; each ``with_*`` returns a new builder.

    Args:
        executor: the host every step runs on.
    """

    executor: AgentExecutor
    store: CheckpointStore | None = None
    budget: WorkflowBudget | None = None
    root_id: str | None = None
    step_events: EventSink | None = None
    event_stream_url: str | None = None
    event_stream_prefix: str = "fleet"
    event_stream_maxlen: int = 10_000
    cancel_board: RunRegistry | None = None
    retention: RedisRetention | None = None
    run_id: str | None = None

    def with_store(self, store: CheckpointStore) -> WorkflowBuilder:
        """Journal every phase in ``store``, making phases resume boundaries."""
        return replace(self, store=store)

    def with_budget(self, budget: WorkflowBudget) -> WorkflowBuilder:
        """Report on ``budget`` (snapshots, the ``budget_exhausted`` event).

        The workflow only reads it: enforcement is the executor's, so give the
        executor the same budget (``LocalExecutor(budget=...)``).
        """
        return replace(self, budget=budget)

    def with_root_id(self, root_id: str) -> WorkflowBuilder:
        """Name the workflow; the same root id on a later run resumes its journals."""
        if not isinstance(root_id, str) or not root_id.strip():
            raise ValueError(f"root_id must be a non-empty string, got {root_id!r}")
        return replace(self, root_id=root_id)

    def with_step_events(self, sink: EventSink) -> WorkflowBuilder:
        """Also hand every step event the executor emits to ``sink``."""
        return replace(self, step_events=sink)

    def with_cancel_board(self, board: RunRegistry) -> WorkflowBuilder:
        """Register the run on ``board`` so ``fleet cancel ROOT_ID`` reaches it.

        The run registers when its first verb starts, polls the board for a cancel every
        :data:`CANCEL_POLL_S` while it is open, and records how it ended (``fleet
        status``). Use a ``RedisRunRegistry`` (:mod:`fleet.runs`) on the fleet's Redis for a
        Celery run.
        """
        return replace(self, cancel_board=board)

    def with_run_id(self, run_id: str) -> WorkflowBuilder:
        """Give the run this id (default: a fresh :func:`fleet.runs.new_run_id` per build).

        The id names the run everywhere: its run registry record and cancel marker, its
        run log's start and end entries. ``fleet run`` mints it so its run index notes it
        too. Build one workflow per id: a second build would be a second run under it.
        """
        if not isinstance(run_id, str) or not run_id.strip():
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        return replace(self, run_id=run_id)

    def with_retention(self, retention: RedisRetention) -> WorkflowBuilder:
        """Keep the run's Redis records only ``retention.retention_s`` once it has ended.

        When the run ends (finished, failed or cancelled) its events, budget account,
        run record, phase journals and step record get that expiry in one script; while
        it runs (and when it begins again) they have none. ``fleet run`` sets this for
        every run that uses Redis; see :mod:`fleet.retention`.
        """
        return replace(self, retention=retention)

    def with_event_stream(
        self, url: str, *, key_prefix: str = "fleet", maxlen: int = 10_000
    ) -> WorkflowBuilder:
        """Also log events where another process can follow them (see :mod:`fleet.runlog`).

        ``url`` is a Redis URL (the stream ``{key_prefix}:events:{root_id}``) or
        ``sqlite:PATH`` (the ``fleet_events`` table of that file, e.g. the run's journal).
        The log keeps about ``maxlen`` entries per root id (``FleetSettings.
        event_stream_maxlen``) and a budget snapshot after each phase and at the end.
        Close the workflow (``async with`` / ``finish()`` / ``close()``) so the last
        events are flushed.
        """
        return replace(
            self,
            event_stream_url=url,
            event_stream_prefix=key_prefix,
            event_stream_maxlen=max(int(maxlen), 1),
        )

    def build(self) -> Workflow:
        """The workflow.

        Without :meth:`with_root_id`, a random ``wf-<uuid>`` root id is used, so a later
        run can never find this run's journals: resuming after a crash is impossible.
        """
        root_id = self.root_id or f"wf-{uuid.uuid4().hex}"
        run_id = self.run_id or new_run_id()
        stream: BufferedLog | None = None
        url = self.event_stream_url
        if url is not None and url.startswith("sqlite:"):
            from .runlog import SQLiteEventLog

            stream = SQLiteEventLog(
                url.removeprefix("sqlite:"),
                root_id,
                maxlen=self.event_stream_maxlen,
                run_id=run_id,
            )
        elif url is not None:
            stream = EventStream(
                url,
                event_stream_key(root_id, key_prefix=self.event_stream_prefix),
                maxlen=self.event_stream_maxlen,
                run_id=run_id,
            )
        return Workflow(
            _Run(
                deltas=self.executor.delta_channel(root_id),
                executor=self.executor,
                store=self.store,
                budget=self.budget,
                root_id=root_id,
                step_events=self.step_events,
                stream=stream,
                board=self.cancel_board,
                run_id=run_id,
                retention=self.retention,
            )
        )


class Workflow:
    """The facade a workflow program is written against.

    Build one with :meth:`builder`. Copies (:meth:`copy`) are cheap handles on the same
    run: they share the event bus, store, budget and phase numbering, so a helper that
    runs its own phases keeps the numbering consistent. Use ``async with workflow:``
    (or call :meth:`finish`) so journals are cleared once the program succeeded.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run

    @staticmethod
    def builder(executor: AgentExecutor) -> WorkflowBuilder:
        """Start configuring a workflow over ``executor``."""
        return WorkflowBuilder(executor)

    def copy(self) -> Workflow:
        """Another handle on the same run (shared bus, store, budget, numbering)."""
        return Workflow(self._run)

    __copy__ = copy

    def __repr__(self) -> str:
        return f"Workflow(root_id={self._run.root_id!r}, phases={self._run.phase_count})"

    @property
    def root_id(self) -> str:
        """The workflow's stable id (journal keys, budget, event stream)."""
        return self._run.root_id

    @property
    def executor(self) -> AgentExecutor:
        """The host steps run on."""
        return self._run.executor

    @property
    def store(self) -> CheckpointStore | None:
        """The journal phases are kept in, if any."""
        return self._run.store

    @property
    def budget(self) -> WorkflowBudget | None:
        """The budget this workflow reports on, if any."""
        return self._run.budget

    @property
    def closed(self) -> bool:
        """Whether :meth:`finish` or :meth:`close` ran."""
        return self._run.closed

    def subscribe(
        self, *, capacity: int = DEFAULT_SUBSCRIBER_CAPACITY, deltas: bool = False
    ) -> Subscription:
        """Receive every event sent from now on (see :class:`Subscription`).

        With ``deltas``, also the ``step_delta`` events of running steps: the text their
        agents produce as they produce it (:meth:`fleet.AgentContext.emit_delta`, an
        OpenAI-compatible agent with ``stream = true``). Every delta of a step is
        delivered before the subscription ends; fold them with
        :class:`fleet.deltas.LiveText`.
        """
        subscription = self._run.bus.subscribe(capacity, deltas=deltas)
        if deltas:
            self._run.read_deltas()
        return subscription

    async def budget_snapshot(self) -> BudgetSnapshot | None:
        """The budget's current figures, or ``None`` when no budget is attached."""
        if self._run.budget is None:
            return None
        return await self._run.budget.snapshot()

    @property
    def run_id(self) -> str:
        """This run's id: what a cancel marker names (a new run of the root id gets a new one)."""
        return self._run.run_id

    @property
    def cancelled(self) -> bool:
        """Whether the workflow was cancelled (by this program, ``fleet cancel`` or its caller)."""
        return self._run.cancellation.cancelled

    @property
    def cancel_reason(self) -> str | None:
        """Why the workflow was cancelled (``None`` while it is not)."""
        return self._run.cancellation.reason

    def _check_open(self) -> None:
        if self._run.closed:
            raise WorkflowClosedError(self._run.root_id)

    async def _verb(self, verb: str, body: Callable[[], Awaitable[T]]) -> T:
        """Run a verb under the workflow's cancellation; a cancel of its caller cancels it."""
        self._check_open()
        run = self._run
        if run.cancellation.cancelled:
            raise WorkflowCancelledError(run.root_id, run.cancellation.reason or "cancelled")
        if not run.begun:
            await self._begin()
        reader = run.read_deltas()
        if reader is not None and not reader.done():
            # No delta is sent before the reader is in place; a failed one is logged at the end.
            with contextlib.suppress(Exception):
                await asyncio.shield(reader)
        run.running_verbs += 1
        try:
            with use_cancellation(run.cancellation), use_deltas(run.deltas):
                result = await body()
        except asyncio.CancelledError:
            await self._cancel(f"the task awaiting Workflow.{verb} was cancelled")
            raise
        finally:
            run.running_verbs -= 1
        if run.board is not None and not run.cancellation.cancelled:
            # The workers read the board too, and may stop their steps before the
            # watcher's next look: without this, a cancelled run could end 'finished'.
            with contextlib.suppress(Exception):  # the watcher warns about an unreadable board
                await self._heed(run.board)
        return result

    async def agent(self, spec: AgentStepSpec) -> StepOutcome:
        """Run one step (not journaled); a failure comes back as a failed outcome."""
        outcomes = await self.parallel([spec])
        if not outcomes:
            return StepOutcome.failed(spec.task_id, spec.agent, "step produced no outcome")
        return outcomes[0]

    async def parallel(self, specs: Sequence[AgentStepSpec]) -> list[StepOutcome]:
        """A barrier fan-out (:func:`fleet.execute_steps_parallel`); not journaled."""

        async def body() -> list[StepOutcome]:
            run = self._run
            if telemetry.active() is None:
                outcomes = await execute_steps_parallel(
                    run.executor, specs, events=run.on_step_event
                )
            else:
                attributes = {"fleet.workflow.id": run.root_id}
                with telemetry.span("parallel", attributes, parent=self._trace()):
                    outcomes = await execute_steps_parallel(
                        run.executor, specs, events=run.on_step_event
                    )
            await self._observe_budget(outcomes)
            return outcomes

        return await self._verb("parallel", body)

    def _trace(self) -> Any:
        """The workflow's span (opened on first use; ``None`` when tracing is off)."""
        run = self._run
        if run.span is None and not run.closed:
            run.span = telemetry.open_span(
                "workflow", {"fleet.workflow.id": run.root_id, "gen_ai.operation.name": "workflow"}
            )
        return run.span

    async def phase(self, name: str, specs: Sequence[AgentStepSpec]) -> list[StepOutcome]:
        """A named barrier fan-out: the workflow's milestone and resume boundary.

        Emits ``phase_start`` before any step runs and ``phase_end`` (counts of
        succeeded / failed outcomes, journaled ones counted as succeeded) after, then
        ``budget_exhausted`` if the budget ran out (once per workflow). With a store,
        the phase is journaled under ``"{root_id}/{name}"`` (``#2``, ``#3``… when the
        name repeats in one run); completed steps found there are not run again. With
        tracing on it is a ``phase`` span, a child of the workflow's span.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a phase needs a non-empty name, got {name!r}")
        return await self._verb("phase", lambda: self._traced_phase(name, list(specs)))

    async def _traced_phase(self, name: str, specs: list[AgentStepSpec]) -> list[StepOutcome]:
        if telemetry.active() is None:
            return await self._phase(name, specs)
        attributes = {"fleet.workflow.id": self._run.root_id, "fleet.phase.name": name}
        with telemetry.span("phase", attributes, parent=self._trace()):
            return await self._phase(name, specs)

    async def _phase(self, name: str, specs: list[AgentStepSpec]) -> list[StepOutcome]:
        run = self._run
        index = run.phase_count
        run.phase_count += 1
        journal = run.journal_id(name) if run.store is not None else None
        if journal is not None:
            await self._retain("keep", journals=[journal])  # an ended run's journal, resumed
        run.publish(PhaseStart(name=name, index=index, step_count=len(specs)))
        if run.store is not None and journal is not None:
            outcomes = await execute_steps_parallel_resumable(
                run.executor,
                specs,
                journal,
                run.store,
                events=run.on_step_event,
                keep_journal=True,
            )
        else:
            outcomes = await execute_steps_parallel(run.executor, specs, events=run.on_step_event)
        succeeded = sum(1 for outcome in outcomes if outcome.success)
        run.publish(
            PhaseEnd(name=name, index=index, succeeded=succeeded, failed=len(outcomes) - succeeded)
        )
        await self._observe_budget(outcomes)
        return outcomes

    async def pipeline(
        self, items: Sequence[Any], stages: Sequence[PipelineStage]
    ) -> list[StepOutcome | None]:
        """Per-item chains with no barrier between stages (:func:`fleet.execute_pipeline`)."""

        async def body() -> list[StepOutcome | None]:
            run = self._run
            results = await execute_pipeline(run.executor, items, stages, events=run.on_step_event)
            await self._observe_budget([result for result in results if result is not None])
            return results

        return await self._verb("pipeline", body)

    async def loop(
        self, initial: Sequence[AgentStepSpec], max_iterations: int, next: LoopPredicate
    ) -> list[StepOutcome]:
        """Barrier rounds until ``next`` stops them (:func:`fleet.execute_loop`)."""

        async def body() -> list[StepOutcome]:
            run = self._run
            outcomes = await execute_loop(
                run.executor, initial, max_iterations, next, events=run.on_step_event
            )
            await self._observe_budget(outcomes)
            return outcomes

        return await self._verb("loop", body)

    @overload
    async def ask(
        self, name: str, *, question: str, schema: type[M], timeout_s: float | None = None
    ) -> M: ...

    @overload
    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: type[M],
        timeout_s: float | None = None,
        default: D,
    ) -> M | D: ...

    @overload
    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        default: Any = ...,
    ) -> Any: ...

    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: Any = None,
        timeout_s: float | None = None,
        default: Any = _NO_DEFAULT,
    ) -> Any:
        """Ask a person (or a system) and wait for the answer; a durable wait.

        The question, its schema and an absolute deadline are journaled in the run's
        store; an ``asked`` event is published; the program then waits, holding no step
        reservation, until ``fleet answer ROOT NAME``, the dashboard or
        :func:`fleet.asks.give_answer` gives an answer that fits (the first one wins; an
        ``answered`` event says who). A re-run of the program returns a journaled answer
        at once, and an answer given before the program got here is kept.

        Args:
            name: unique within the workflow: 1 to 100 letters, digits or ``_ . : -``.
            question: what to ask, shown by ``fleet asks``, ``fleet status`` and the page.
            schema: a pydantic model class (the answer comes back as an instance), a JSON
                Schema dict, or ``None`` (any JSON value).
            timeout_s: seconds from when the workflow first asked (an absolute deadline,
                kept across re-runs); ``None`` waits for ever.
            default: returned when the deadline passes unanswered.

        Raises:
            AskTimeout: the deadline passed unanswered and no ``default`` was given.
            AskError: the name was already asked in this run, is malformed, the schema is
                not usable, or the workflow has no store to journal in.
            WorkflowCancelledError: the workflow was cancelled while waiting.
        """
        from .asks import NO_DEFAULT, ask_book_for, wait_for_answer

        run = self._run
        if name in run.asked or run.store is None:
            raise AskError(
                f"workflow {run.root_id!r} already asked {name!r}; give each ask its own name"
                if run.store is not None
                else f"ask {name!r} needs a journal to wait durably: build the workflow "
                "with .with_store(...) (fleet run always gives it one)",
                name=name,
            )
        run.asked.add(name)
        book = run.ask_book = run.ask_book or ask_book_for(run.store)

        async def body() -> Any:
            return await wait_for_answer(
                book,
                run.root_id,
                name,
                question=question,
                schema=schema,
                timeout_s=timeout_s,
                default=NO_DEFAULT if default is _NO_DEFAULT else default,
                publish=run.publish,
                cancellation=run.cancellation,
            )

        return await self._verb("ask", body)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, reason: str = "cancelled by the workflow program") -> None:
        """Cancel the workflow, here and on every worker.

        Nothing new is dispatched; running steps are interrupted (within about 2 s on a
        Celery fleet) and come back ``error="cancelled"`` from the verbs awaiting them;
        their reservations are settled at what they used; completed steps stay
        journaled; a ``workflow_cancelled`` event is sent; any later verb raises
        :class:`~fleet.errors.WorkflowCancelledError`. Running the same root id again
        resumes. Idempotent.
        """
        await self._cancel(str(reason) or "cancelled")

    async def _cancel(self, reason: str, *, record: bool = True) -> None:
        run = self._run
        if run.closed or not run.cancellation.cancel(reason):
            return
        run.publish(WorkflowCancelled(reason=reason))
        if record and run.board is not None and run.begun:
            try:
                await asyncio.shield(run.board.request(run.root_id, reason, run_id=run.run_id))
            except Exception as error:
                logger.warning(
                    "workflow %r: cannot record the cancel on %r (%s: %s)",
                    run.root_id,
                    run.board,
                    type(error).__name__,
                    error,
                )

    async def _begin(self) -> None:
        """Register the run on its cancel board and start watching it for a cancel."""
        run = self._run
        run.begun = True
        await self._retain("keep")
        if run.board is None:
            return
        try:
            await run.board.begin(run.root_id, run.run_id)
        except Exception as error:
            logger.warning(
                "workflow %r: cannot register on %r, so `fleet cancel` cannot reach it (%s: %s)",
                run.root_id,
                run.board,
                type(error).__name__,
                error,
            )
            return
        run.watcher = asyncio.create_task(
            self._watch(run.board), name=f"fleet-cancel:{run.root_id}"
        )

    async def _watch(self, board: RunRegistry) -> None:
        """Poll the board for a cancel, and heartbeat the run record every HEARTBEAT_S."""
        run = self._run
        warned = False
        beat_due = time.monotonic() + HEARTBEAT_S
        while not run.closed and not run.cancellation.cancelled:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                if time.monotonic() >= beat_due:
                    beat_due = time.monotonic() + HEARTBEAT_S
                    await board.heartbeat(run.root_id, run.run_id)
                    await run.record_live_budget()
                await self._heed(board)
            except Exception as error:
                if not warned:
                    warned = True
                    logger.warning(
                        "workflow %r: cannot read its cancel board: %s", run.root_id, error
                    )

    async def _heed(self, board: RunRegistry) -> None:
        """Look at the board once; cancel the run if a cancel is waiting there."""
        notice = await board.check(self._run.run_id)
        if notice is not None:
            await self._cancel(notice.reason, record=False)

    def log(self, level: str, message: str, **fields: Any) -> None:
        """Send a ``log`` event; never fails and never blocks.

        ``fields`` are made JSON-safe (values that JSON cannot hold become strings).
        """
        try:
            self._run.publish(
                LogEvent(level=str(level), message=str(message), fields=_json_safe(fields))
            )
        except Exception:
            logger.exception("Workflow.log could not send its event")

    async def _observe_budget(self, outcomes: Sequence[StepOutcome]) -> None:
        run = self._run
        if run.exhausted_reported and run.stream is None:
            return
        refused = any(outcome.error == "budget_exhausted" for outcome in outcomes)
        snapshot = await run.record_budget(flush=True)
        exhausted = snapshot is not None and snapshot.is_exhausted
        if run.exhausted_reported or not (exhausted or refused):
            return
        run.exhausted_reported = True
        resource, reason = "workflow_tokens", "workflow token budget exhausted"
        if snapshot is not None:
            if snapshot.limit_usd is not None and snapshot.consumed_usd >= snapshot.limit_usd:
                resource, reason = "workflow_usd", "workflow dollar budget exhausted"
                reason += f" (${snapshot.consumed_usd} / ${snapshot.limit_usd})"
            else:
                limit = "unlimited" if snapshot.limit_tokens is None else snapshot.limit_tokens
                reason += f" ({snapshot.consumed_tokens} / {limit} tokens)"
        if not exhausted:
            refusal = next(o for o in outcomes if o.error == "budget_exhausted")
            if "dollar budget" in refusal.output:
                resource = "workflow_usd"
            reason += "; a step was refused its " + (
                "dollar reservation" if resource == "workflow_usd" else "token reservation"
            )
        run.publish(BudgetExhausted(resource=resource, reason=reason))

    async def finish(self) -> None:
        """End the workflow successfully: delete this run's phase journals, then close.

        A cancelled workflow keeps its journals (a later run resumes it) and closes as
        ``cancelled``. Idempotent. After it, a run with the same root id starts from scratch.
        """
        run = self._run
        if run.closed:
            return
        if run.cancellation.cancelled:
            await self._shutdown("cancelled")
            return
        try:
            if run.store is not None:
                for journal in run.phase_journals:
                    await run.store.delete(journal)
                await self._clear_asks(run.store)
        finally:
            await self._shutdown("finished")

    async def _clear_asks(self, store: CheckpointStore) -> None:
        """Forget the run's asks and any early answer: a new run starts from scratch."""
        from .asks import ask_book_for

        book = self._run.ask_book or ask_book_for(store)
        try:
            await book.clear(self._run.root_id)
        finally:
            await book.close()

    async def close(self) -> None:
        """End this process's part without finishing: journals are kept for a resume.

        Ends every subscription (after its waiting events) and flushes the event stream.
        Idempotent.
        """
        await self._shutdown("cancelled" if self.cancelled else "closed")

    async def _shutdown(self, status: RunState) -> None:
        run = self._run
        if run.closed:
            return
        run.closed = True
        if run.span is not None:
            run.span.set_attribute("fleet.workflow.status", status)
            run.span.end()
        if run.watcher is not None:
            # It polls the board and stops once the run is closed; a cancel swallowed
            # inside a Redis call must not keep the workflow from closing.
            await stop_task(run.watcher)
        if run.ask_book is not None:
            with contextlib.suppress(Exception):  # closing only releases a connection
                await run.ask_book.close()
        if run.board is not None and run.begun:
            try:
                await run.board.end(run.root_id, run.run_id, status)
            except Exception as error:
                logger.warning("workflow %r: cannot record its end: %s", run.root_id, error)
        await run.stop_deltas()
        run.bus.close()
        if run.stream is not None:
            await run.record_budget()
            await run.stream.close(status)
        if status in ("finished", "failed", "cancelled"):
            await self._retain("expire", journals=run.phase_journals, run_id=run.run_id)

    async def _retain(self, action: str, **keys: Any) -> None:
        """Keep (``"keep"``) or expire (``"expire"``) the run's Redis records; never fails."""
        run = self._run
        if run.retention is None:
            return
        budget = run.budget
        accounts = [budget.workflow_id] if budget is not None and budget.workflow_id else []
        try:
            await getattr(run.retention, action)(run.root_id, accounts=accounts, **keys)
        except Exception as error:  # `fleet gc` prunes what this leaves
            logger.warning(
                "workflow %r: cannot %s its Redis records: %s", run.root_id, action, error
            )

    async def __aenter__(self) -> Workflow:
        self._check_open()
        self._trace()
        if self._run.stream is not None:
            await self._run.record_budget()  # where a resumed run starts from
        if not self._run.begun:
            await self._begin()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.finish()
        elif exc_type is asyncio.CancelledError:
            await self._cancel("the workflow program was cancelled")
            await self._shutdown("cancelled")
        else:
            await self._shutdown("cancelled" if self.cancelled else "failed")
