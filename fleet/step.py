"""The execution half of a step's lifecycle: the step body every host shares.

Wherever a step runs, in this process (:class:`~fleet.LocalExecutor`) or inside a Celery
worker (``workers.runtime``), the same functions run it, in this order:
:func:`step_context` builds the agent's :class:`~fleet.agents.AgentContext`;
:func:`holding` puts it under the reservation admission took (:mod:`fleet.admission`, the
host's half), kept alive while it runs and, where the host settles, settled at the end;
:func:`run_interruptible` runs the agent (:func:`run_agent`) so that a cancel stops it;
:func:`close_deltas` flushes its streamed text before its outcome is announced.

:func:`run_agent` turns whatever the agent does (returns, raises, times out, answers
off-schema) into a :class:`~fleet.StepOutcome`. :func:`validate_output` is the
``output_schema`` check, also used by agents that repair an answer before returning it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from . import metrics, telemetry
from .agents.base import AgentContext, AgentDefinition, AgentResult
from .cancel.signal import Cancellation, StepInterrupted, cancelled_outcome
from .errors import AgentError
from .spec import NO_USAGE, AgentStepSpec, StepOutcome

if TYPE_CHECKING:
    from .budget import Reservation
    from .deltas import DeltaPublisher
    from .events import EventSink
    from .limiters import RateLimiter

__all__ = [
    "DEFAULT_RESERVE_TOKENS",
    "as_result",
    "close_deltas",
    "holding",
    "run_agent",
    "run_interruptible",
    "step_context",
    "validate_output",
]

DEFAULT_RESERVE_TOKENS = 1000
"""Reservation for a step with no ``max_tokens`` whose agent names no default."""


def step_context(
    definition: AgentDefinition,
    spec: AgentStepSpec,
    *,
    started: float,
    worker: str,
    limiter: RateLimiter,
    events: EventSink | None = None,
    workflow_id: str | None = None,
    traceparent: str | None = None,
    deltas: DeltaPublisher | None = None,
) -> AgentContext:
    """What the step's agent receives beside its spec (no budget yet: see :func:`holding`).

    Args:
        definition: the step's agent (its provider ``limit`` is kept on the context).
        spec: the step.
        started: ``time.monotonic()`` when the step started (its deadline counts from it).
        worker: where it runs, for humans (``"local"`` in this process).
        limiter: where its provider limits are kept.
        events: the sink its own events (``rate_limited``) go to.
        workflow_id: the workflow it belongs to, when known.
        traceparent: the span its ``invoke_agent`` span descends from (on another process).
        deltas: where its streamed output goes.
    """
    return AgentContext(
        spec=spec,
        deadline=None if spec.timeout_s is None else started + spec.timeout_s,
        events=events,
        worker=worker,
        workflow_id=workflow_id,
        traceparent=traceparent,
        limit=definition.limit,
        limiter=limiter,
        deltas=deltas,
    )


@contextlib.asynccontextmanager
async def holding(
    reservation: Reservation, ctx: AgentContext, *, settle: bool
) -> AsyncIterator[None]:
    """Run the block under ``reservation``: the agent draws on it, its lease kept alive.

    Args:
        reservation: the step's tokens, taken at admission.
        ctx: the step's context; its model calls are capped to the hold and reserve
            their dollars in the same budget.
        settle: charge what ``ctx`` used when the block ends (also when it is cancelled:
            tokens spent are spent). A worker passes ``False``: it settles once it knows
            whether its outcome was recorded.
    """
    ctx.held_tokens = reservation.tokens
    ctx.budget = reservation.budget
    async with reservation.kept_alive():
        if not settle:
            yield
            return
        try:
            yield
        finally:
            # Only the agent is interruptible, never the settlement.
            await asyncio.shield(reservation.settle(ctx.used.total_tokens))


def close_deltas(ctx: AgentContext) -> None:
    """Flush and close the step's delta publisher: its last text goes before its outcome."""
    if ctx.deltas is not None:
        ctx.deltas.close()


def as_result(raw: object, agent: str) -> AgentResult:
    """An agent's return value as an :class:`~fleet.AgentResult` (a ``str`` is shorthand).

    Raises:
        TypeError: the agent returned something else.
    """
    if isinstance(raw, AgentResult):
        return raw
    if isinstance(raw, str):
        # Hot path: nothing to validate in a plain string result.
        return AgentResult.model_construct(output=raw, structured=None, usage=NO_USAGE)
    raise TypeError(
        f"agent {agent!r} returned {type(raw).__name__}; return an AgentResult or a str"
    )


def validate_output(
    schema: dict[str, Any], text: str, structured: Any = None
) -> tuple[Any, str | None]:
    """Check a step's answer against its ``output_schema``; returns ``(value, problem)``.

    Args:
        schema: the step's ``output_schema`` (a JSON Schema).
        text: the answer's text, parsed as JSON when ``structured`` is ``None``.
        structured: the value the agent already parsed, if any.

    Returns:
        ``(value, None)`` when it fits, else ``(None, problem)`` with a one-line reason.
    """
    value = structured
    if value is None:
        try:
            value = json.loads(text)
        except ValueError as error:
            return None, f"output is not JSON ({error.args[0] if error.args else error})"
    validator = Draft202012Validator(schema)
    problems = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if problems:
        first = problems[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        return None, f"output does not match output_schema at {where}: {first.message}"
    return value, None


async def run_agent(
    definition: AgentDefinition,
    spec: AgentStepSpec,
    ctx: AgentContext,
    *,
    started: float,
) -> StepOutcome:
    """Run one agent with the step's timeout and turn whatever happens into an outcome.

    This is the step body every host shares (in-process, or inside a Celery worker). With
    tracing on (:mod:`fleet.telemetry`) the step is an ``invoke_agent`` span, the child of
    ``ctx.traceparent`` (its round on another process) or else of the current span; with
    metrics on (:mod:`fleet.metrics`) it is counted.
    """
    metrics.step_started(spec.agent)
    try:
        if telemetry.active() is None:
            outcome = await _run_agent(definition, spec, ctx, started)
        else:
            with telemetry.span(
                f"invoke_agent {spec.agent}",
                telemetry.step_attributes(spec.task_id, spec.agent, ctx.workflow_id),
                traceparent=ctx.traceparent,
            ) as span:
                outcome = await _run_agent(definition, spec, ctx, started)
                telemetry.end_step(span, outcome)
    finally:
        metrics.step_ended()  # also when the step is cancelled
    metrics.step_finished(outcome, time.monotonic() - started, ctx.model)
    return outcome


async def _run_agent(
    definition: AgentDefinition, spec: AgentStepSpec, ctx: AgentContext, started: float
) -> StepOutcome:
    task_id, agent, worker = spec.task_id, spec.agent, ctx.worker

    def failed(message: str, error: str) -> StepOutcome:
        return StepOutcome.failed(
            task_id,
            agent,
            message,
            error=error,
            usage=ctx.used,
            duration_s=time.monotonic() - started,
            worker=worker,
            cost_usd=ctx.cost_usd,
        )

    timeout = asyncio.timeout(spec.timeout_s)
    try:
        async with timeout:
            raw = await definition.run(spec, ctx)
        result = as_result(raw, agent)
    except TimeoutError:
        if timeout.expired():
            return failed(f"step {task_id!r} timed out after {spec.timeout_s} s", "timeout")
        return failed(f"step {task_id!r} failed: agent {agent!r} raised TimeoutError", "crashed")
    except AgentError as error:
        return failed(f"step {task_id!r} failed: {error}", error.kind)
    except Exception as error:
        return failed(
            f"step {task_id!r} crashed: agent {agent!r} raised {type(error).__name__}: {error}",
            "crashed",
        )
    usage = result.usage if result.usage.total_tokens >= ctx.used.total_tokens else ctx.used
    ctx.used = usage
    structured = result.structured
    if spec.output_schema is not None:
        structured, problem = validate_output(spec.output_schema, result.output, structured)
        if problem is not None:
            return failed(f"step {task_id!r} failed: {problem}", "schema")
    # Every field comes from validated values (the spec, the agent's result, the clock):
    # construct without validating again, on the path every step takes.
    return StepOutcome.model_construct(
        task_id=task_id,
        session_id=f"task-run-{task_id}",
        agent=agent,
        output=result.output,
        success=True,
        structured=structured,
        usage=usage,
        error=None,
        duration_s=time.monotonic() - started,
        worker=worker,
        cost_usd=ctx.cost_usd,
    )


async def run_interruptible(
    definition: AgentDefinition,
    spec: AgentStepSpec,
    ctx: AgentContext,
    *,
    started: float,
    cancellation: Cancellation | None,
) -> StepOutcome:
    """:func:`run_agent` that a cancel interrupts: the step then ends ``error="cancelled"``.

    An agent that blocked its thread, and so returned without noticing the cancel, has its
    result discarded. The usage spent until then stays on the outcome (to be settled).
    """
    if cancellation is None:
        return await run_agent(definition, spec, ctx, started=started)
    outcome = None
    ctx.cancellation = cancellation
    try:
        with cancellation.interrupts():
            outcome = await run_agent(definition, spec, ctx, started=started)
            # One turn of the loop, so a cancel that came in from another thread while the
            # agent blocked this one lands now (and its result is discarded).
            await asyncio.sleep(0)
    except StepInterrupted as stop:
        return cancelled_outcome(
            spec,
            stop.reason,
            usage=ctx.used,
            duration_s=time.monotonic() - started,
            worker=ctx.worker,
            discarded=outcome is not None and outcome.success,
        )
    if cancellation.cancelled:
        return cancelled_outcome(
            spec,
            cancellation.reason,
            usage=outcome.usage,
            duration_s=time.monotonic() - started,
            worker=ctx.worker,
            discarded=outcome.success,
        )
    return outcome
