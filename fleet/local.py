"""The embedded default host: runs every step in this process, on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from .agents.base import AgentContext, AgentDefinition, AgentResult
from .agents.registry import AgentLike, AgentRegistry
from .errors import AgentError, BudgetError, BudgetExhaustedError, UnknownAgentError
from .events import EventSink, StepFinished, StepStarted, emit
from .executor import DEFAULT_CONCURRENCY_HINT, AgentExecutor
from .spec import NO_USAGE, AgentStepSpec, StepOutcome

if TYPE_CHECKING:
    from .budget import Reservation, WorkflowBudget

__all__ = ["DEFAULT_RESERVE_TOKENS", "LocalExecutor", "run_agent"]

DEFAULT_RESERVE_TOKENS = 1000
"""Reservation for a step with no ``max_tokens`` whose agent names no default."""


def _as_result(raw: object, agent: str) -> AgentResult:
    if isinstance(raw, AgentResult):
        return raw
    if isinstance(raw, str):
        # Hot path: nothing to validate in a plain string result.
        return AgentResult.model_construct(output=raw, structured=None, usage=NO_USAGE)
    raise TypeError(
        f"agent {agent!r} returned {type(raw).__name__}; return an AgentResult or a str"
    )


def _structured(spec: AgentStepSpec, result: AgentResult) -> tuple[Any, str | None]:
    """Validate the step's structured value; returns ``(value, problem)``."""
    assert spec.output_schema is not None
    value = result.structured
    if value is None:
        try:
            value = json.loads(result.output)
        except ValueError as error:
            return None, f"output is not JSON ({error.args[0] if error.args else error})"
    validator = Draft202012Validator(spec.output_schema)
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

    This is the step body every host shares (in-process, or inside a Celery worker).
    """
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
        result = _as_result(raw, agent)
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
        structured, problem = _structured(spec, result)
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


class LocalExecutor(AgentExecutor):
    """Runs steps in-process on asyncio; the embedded default host.

    Args:
        agents: extra agents by name (coroutine functions, ``"pkg.mod:func"`` paths or
            :class:`~fleet.agents.AgentDefinition`), added to the built-ins (``echo``).
        budget: a :class:`~fleet.WorkflowBudget`; each step's tokens are reserved from it
            once the step has its concurrency slot, and settled when it ends.
        max_concurrency: how many steps run at once across *every* fan-out started
            through this executor (also its concurrency hint).
        default_reserve_tokens: reservation for a step with no ``max_tokens`` whose agent
            names no default.
    """

    def __init__(
        self,
        *,
        agents: Mapping[str, AgentLike] | None = None,
        budget: WorkflowBudget | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY_HINT,
        default_reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    ) -> None:
        self.registry = AgentRegistry(agents)
        self.budget = budget
        self.max_concurrency = max(int(max_concurrency), 1)
        self.default_reserve_tokens = default_reserve_tokens
        self._slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        return (
            f"LocalExecutor(agents={sorted(self.registry)!r}, "
            f"max_concurrency={self.max_concurrency}, budget={self.budget!r})"
        )

    def concurrency_hint(self) -> int:
        """The shared concurrency limit."""
        return self.max_concurrency

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None:
            # One semaphore per event loop: an executor may outlive an asyncio.run().
            self._slots = {lp: s for lp, s in self._slots.items() if not lp.is_closed()}
            slot = self._slots[loop] = asyncio.Semaphore(self.max_concurrency)
        return slot

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        """Run ``spec`` here; never raises (cancelling the caller cancels the step)."""
        try:
            definition = self.registry.resolve(spec.agent)
        except UnknownAgentError as error:
            return StepOutcome.failed(
                spec.task_id, spec.agent, str(error), error="unknown_agent", worker="local"
            )
        async with self._slot():
            return await self._run(definition, spec, events)

    @contextlib.asynccontextmanager
    async def _hold(
        self, definition: AgentDefinition, spec: AgentStepSpec
    ) -> AsyncIterator[Reservation | None]:
        if self.budget is None:
            yield None
            return
        request = definition.reservation_for(spec, self.default_reserve_tokens)
        reservation = await self.budget.reserve(
            request, holder=f"{spec.task_id}:{uuid.uuid4().hex[:8]}"
        )
        async with reservation.kept_alive():
            yield reservation

    async def _run(
        self, definition: AgentDefinition, spec: AgentStepSpec, events: EventSink | None
    ) -> StepOutcome:
        started = time.monotonic()
        ctx = AgentContext(
            spec=spec,
            deadline=None if spec.timeout_s is None else started + spec.timeout_s,
            events=events,
            worker="local",
        )
        try:
            async with self._hold(definition, spec) as reservation:
                if reservation is not None:
                    ctx.held_tokens = reservation.tokens
                    ctx.budget = self.budget
                if events is not None:
                    emit(events, StepStarted(task_id=spec.task_id, agent=spec.agent))
                try:
                    outcome = await run_agent(definition, spec, ctx, started=started)
                finally:
                    if reservation is not None:
                        # Tokens spent are spent, even when the step is being cancelled.
                        await asyncio.shield(reservation.settle(ctx.used.total_tokens))
        except (BudgetExhaustedError, BudgetError) as error:
            # BudgetError: the budget cannot be used at all (an unknown parent, a cycle).
            kind = "budget_exhausted" if isinstance(error, BudgetExhaustedError) else "budget"
            outcome = StepOutcome.failed(
                spec.task_id, spec.agent, str(error), error=kind, worker="local"
            )
            emit(events, StepFinished.of(outcome))
            return outcome
        if events is not None:
            emit(events, StepFinished.of(outcome))
        return outcome
