"""Workflow events: phase milestones, logs, budget exhaustion and per-step progress.

``WorkflowEvent`` is a discriminated union on ``type`` (JSON tag). Executors emit
``step_started`` / ``step_finished`` to the ``events`` sink a combinator was given;
the :class:`fleet.Workflow` facade emits the rest. A sink is a plain callable that
must not block: it is called inline on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from .spec import FleetModel, StepOutcome

__all__ = [
    "Answered",
    "Asked",
    "BudgetExhausted",
    "EventSink",
    "LogEvent",
    "PhaseEnd",
    "PhaseStart",
    "RateLimited",
    "StepFinished",
    "StepDelta",
    "StepStarted",
    "WORDED_FAILURES",
    "WorkflowCancelled",
    "WorkflowEvent",
    "emit",
    "parse_event",
]

logger = logging.getLogger(__name__)


class PhaseStart(FleetModel):
    """A phase is about to run its steps."""

    type: Literal["phase_start"] = "phase_start"
    name: str
    """The phase name as the program gave it."""
    index: int
    """0-based phase number within the workflow, in call order."""
    step_count: int
    """How many specs the phase was given."""


class PhaseEnd(FleetModel):
    """A phase returned; journaled steps served from the journal count as succeeded."""

    type: Literal["phase_end"] = "phase_end"
    name: str
    index: int
    succeeded: int
    failed: int


class LogEvent(FleetModel):
    """A line the workflow program logged with ``Workflow.log``."""

    type: Literal["log"] = "log"
    level: str
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


class BudgetExhausted(FleetModel):
    """The workflow's budget ran out (emitted once per workflow).

    ``resource`` is ``workflow_tokens`` or ``workflow_usd``.
    """

    type: Literal["budget_exhausted"] = "budget_exhausted"
    resource: str = "workflow_tokens"
    reason: str


class WorkflowCancelled(FleetModel):
    """The workflow was cancelled: nothing new is dispatched, running steps are interrupted."""

    type: Literal["workflow_cancelled"] = "workflow_cancelled"
    reason: str
    """Why (the ``--reason`` of ``fleet cancel``, the argument of ``Workflow.cancel``)."""


class StepStarted(FleetModel):
    """A step got its slot and its tokens and is about to run."""

    type: Literal["step_started"] = "step_started"
    task_id: str
    agent: str
    host_task_id: str | None = None
    """The host's own id of the step (the Celery task id on the fleet), so a monitor
    such as the dashboard can link the step to it in Flower; ``None`` in-process."""
    worker: str | None = None
    """Where it runs, for humans (the Celery node that claimed it, ``local`` in-process);
    ``None`` when the worker did not say."""


WORDED_FAILURES = frozenset({"unknown_agent", "duplicate_task_id", "no_price"})
"""Failure kinds whose message fleet writes itself (no prompt, output or provider text)."""


class StepFinished(FleetModel):
    """A step finished (successfully or not)."""

    type: Literal["step_finished"] = "step_finished"
    task_id: str
    agent: str
    success: bool
    total_tokens: int = 0
    duration_s: float = 0.0
    error: str | None = None
    worker: str | None = None
    host_task_id: str | None = None
    """The host's own id of the step, as in :class:`StepStarted`."""
    cost_usd: Decimal | None = None
    """What the step's model calls cost in dollars; ``None`` when none was priced."""
    message: str | None = None
    """Why the step failed, for the failures fleet words itself (:data:`WORDED_FAILURES`:
    the message names the fix); ``None`` otherwise, so no agent's output is ever shown."""

    @classmethod
    def of(cls, outcome: StepOutcome, *, host_task_id: str | None = None) -> StepFinished:
        """The event that reports ``outcome`` (of the host's task ``host_task_id``)."""
        worded = not outcome.success and outcome.error in WORDED_FAILURES
        message = outcome.output.strip().partition("\n")[0] if worded else ""
        return cls(
            message=message or None,
            host_task_id=host_task_id,
            task_id=outcome.task_id,
            agent=outcome.agent,
            success=outcome.success,
            total_tokens=outcome.usage.total_tokens,
            duration_s=outcome.duration_s,
            error=outcome.error,
            worker=outcome.worker,
            cost_usd=outcome.cost_usd,
        )


class RateLimited(FleetModel):
    """A model call waited noticeably for room under its provider limit."""

    type: Literal["rate_limited"] = "rate_limited"
    limit: str
    """The ``[limits.NAME]`` the call counted against."""
    wait_s: float
    """How long the call waited before it was admitted."""
    task_id: str | None = None
    """The step that made the call."""
    agent: str | None = None
    """The step's agent."""


class StepDelta(FleetModel):
    """Text a running step's agent produced since its last delta (only to ``deltas=True``).

    Deltas travel on their own channel, never through the journal or the run's event log
    (see :mod:`fleet.deltas`). To show a step's live text, keep ``text[:offset] + delta.text``
    per task id and attempt: ``offset`` 0 starts the text over (a new model call of the
    step), and a new ``attempt`` is the step run again from the start (its worker died).
    """

    type: Literal["step_delta"] = "step_delta"
    task_id: str
    """The step (``spec.task_id``)."""
    text: str
    """The new text."""
    attempt: str = ""
    """Names this run of the step; a re-run after a lost worker gets a new one."""
    offset: int = 0
    """Characters of this attempt's current text that come before ``text``."""
    restart: bool = False
    """The step was run again from the start: drop the text shown for earlier attempts."""
    id: str = ""
    """The delta's position on its channel (a Redis stream entry id on a fleet): read on
    after it to resume without gaps or repeats."""


class Asked(FleetModel):
    """The program asked a question (``Workflow.ask``) and waits for its answer."""

    type: Literal["asked"] = "asked"
    name: str
    """The ask's name (what ``fleet answer ROOT NAME`` names)."""
    question: str
    """The question, as the program wrote it."""


class Answered(FleetModel):
    """An ask's answer was taken (also when a re-run finds it journaled)."""

    type: Literal["answered"] = "answered"
    name: str
    """The ask's name."""
    by: str
    """Who answered (``fleet answer --by``, the dashboard's user)."""


WorkflowEvent = Annotated[
    PhaseStart
    | PhaseEnd
    | LogEvent
    | BudgetExhausted
    | WorkflowCancelled
    | StepStarted
    | StepFinished
    | StepDelta
    | RateLimited
    | Asked
    | Answered,
    Field(discriminator="type"),
]
"""Any workflow event; dispatch on ``event.type``."""

EventSink = Callable[[Any], object]
"""Receives events; must return quickly and never block (called on the event loop)."""

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(WorkflowEvent)


def parse_event(data: dict[str, Any] | str | bytes) -> Any:
    """Load one event from its JSON form (a dict or text)."""
    if isinstance(data, str | bytes):
        return _EVENT_ADAPTER.validate_json(data)
    return _EVENT_ADAPTER.validate_python(data)


def emit(sink: EventSink | None, event: Any) -> None:
    """Deliver ``event`` to ``sink``; a failing sink is logged, never propagated."""
    if sink is None:
        return
    try:
        sink(event)
    except Exception:
        logger.exception("event sink %r failed on a %s event", sink, event.type)
