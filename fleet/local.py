"""The embedded default host: runs every step in this process, on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from .agents.base import AgentContext, AgentDefinition
from .agents.registry import AgentLike, AgentRegistry
from .cancel.signal import (
    Cancellation,
    StepInterrupted,
    cancelled_outcome,
    current_cancellation,
)
from .deltas import current_deltas
from .errors import BudgetError, BudgetExhaustedError, UnknownAgentError
from .events import EventSink, StepFinished, StepStarted, emit
from .executor import DEFAULT_CONCURRENCY_HINT, AgentExecutor
from .limiters import MemoryRateLimiter, RateLimiter
from .perloop import PerLoop
from .spec import AgentStepSpec, StepOutcome
from .step import DEFAULT_RESERVE_TOKENS, run_interruptible

if TYPE_CHECKING:
    from .budget import WorkflowBudget

__all__ = ["LocalExecutor"]


def _interruptible(cancellation: Cancellation | None) -> contextlib.AbstractContextManager[None]:
    return cancellation.interrupts() if cancellation is not None else contextlib.nullcontext()


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
        limiter: where the provider limits of agents with ``limit = "NAME"`` are kept
            (default: a :class:`~fleet.limiters.MemoryRateLimiter` of this executor;
            pass a :class:`~fleet.limiters.RedisRateLimiter` to share them with a fleet).
    """

    def __init__(
        self,
        *,
        agents: Mapping[str, AgentLike] | None = None,
        budget: WorkflowBudget | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY_HINT,
        default_reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.registry = AgentRegistry(agents)
        self.limiter = limiter if limiter is not None else MemoryRateLimiter()
        self.budget = budget
        self.max_concurrency = max(int(max_concurrency), 1)
        self.default_reserve_tokens = default_reserve_tokens
        # One semaphore per event loop: an executor may outlive an asyncio.run().
        self._slots: PerLoop[asyncio.Semaphore] = PerLoop(
            lambda: asyncio.Semaphore(self.max_concurrency)
        )

    def __repr__(self) -> str:
        return (
            f"LocalExecutor(agents={sorted(self.registry)!r}, "
            f"max_concurrency={self.max_concurrency}, budget={self.budget!r})"
        )

    def concurrency_hint(self) -> int:
        """The shared concurrency limit."""
        return self.max_concurrency

    def _slot(self) -> asyncio.Semaphore:
        return self._slots.get()

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        """Run ``spec`` here; never raises (cancelling the caller cancels the step).

        Under a cancelled workflow (:func:`fleet.cancel.current_cancellation`) nothing
        starts and a running step is interrupted: both come back ``error="cancelled"``.
        """
        cancellation = current_cancellation()
        if cancellation is not None and cancellation.cancelled:
            return cancelled_outcome(spec, cancellation.reason, worker="local")
        try:
            definition = self.registry.resolve(spec.agent)
        except UnknownAgentError as error:
            refused = StepOutcome.failed(
                spec.task_id, spec.agent, str(error), error="unknown_agent", worker="local"
            )
            emit(events, StepFinished.of(refused))  # as a Celery worker's answer is announced
            return refused
        async with self._slot():
            if cancellation is None:
                return await self._run(definition, spec, events, None)
            if cancellation.cancelled:  # cancelled while waiting for a slot
                return cancelled_outcome(spec, cancellation.reason, worker="local")
            return await self._run(definition, spec, events, cancellation)

    @contextlib.asynccontextmanager
    async def _hold(
        self,
        budget: WorkflowBudget,
        definition: AgentDefinition,
        spec: AgentStepSpec,
        ctx: AgentContext,
        cancellation: Cancellation | None,
    ) -> AsyncIterator[None]:
        """Reserve the step's tokens for the block, then settle what ``ctx`` used.

        Only the reservation wait is interruptible, never the settlement.
        """
        request = definition.reservation_for(spec, self.default_reserve_tokens)
        with _interruptible(cancellation):
            reservation = await budget.reserve(
                request, holder=f"{spec.task_id}:{uuid.uuid4().hex[:8]}"
            )
        ctx.held_tokens = reservation.tokens
        ctx.budget = budget
        async with reservation.kept_alive():
            try:
                yield
            finally:
                # Tokens spent are spent, even when the step is being cancelled.
                await asyncio.shield(reservation.settle(ctx.used.total_tokens))

    async def _run(
        self,
        definition: AgentDefinition,
        spec: AgentStepSpec,
        events: EventSink | None,
        cancellation: Cancellation | None,
    ) -> StepOutcome:
        started = time.monotonic()
        channel = current_deltas()
        ctx = AgentContext(
            spec=spec,
            deadline=None if spec.timeout_s is None else started + spec.timeout_s,
            events=events,
            worker="local",
            limit=definition.limit,
            limiter=self.limiter,
            deltas=None if channel is None else channel.publisher(spec.task_id),
        )
        try:
            try:
                outcome = await self._hold_and_run(
                    definition, spec, events, ctx, started, cancellation
                )
            finally:
                if ctx.deltas is not None:  # its last text before its step_finished
                    ctx.deltas.close()
        except StepInterrupted as stop:  # cancelled while waiting for its tokens
            duration = time.monotonic() - started
            outcome = cancelled_outcome(
                spec, stop.reason, usage=ctx.used, duration_s=duration, worker="local"
            )
        except asyncio.CancelledError:
            # The caller was cancelled: report the step, then let the cancel through.
            reason = "the caller was cancelled"
            emit(events, StepFinished.of(cancelled_outcome(spec, reason, usage=ctx.used)))
            raise
        except (BudgetExhaustedError, BudgetError) as error:
            # BudgetError: the budget cannot be used at all (an unknown parent, a cycle).
            kind = "budget_exhausted" if isinstance(error, BudgetExhaustedError) else "budget"
            outcome = StepOutcome.failed(
                spec.task_id, spec.agent, str(error), error=kind, worker="local"
            )
        if events is not None:  # building the event costs as much as a no-op step
            emit(events, StepFinished.of(outcome))
        return outcome

    async def _hold_and_run(
        self,
        definition: AgentDefinition,
        spec: AgentStepSpec,
        events: EventSink | None,
        ctx: AgentContext,
        started: float,
        cancellation: Cancellation | None,
    ) -> StepOutcome:
        """Reserve the step's tokens, run it, settle what it used (also when cancelled).

        Only the reservation wait and the agent are interruptible, never the settlement.
        """
        budget = self.budget
        if budget is None:  # the common case, without a context manager's cost
            return await self._start(definition, spec, events, ctx, started, cancellation)
        async with self._hold(budget, definition, spec, ctx, cancellation):
            return await self._start(definition, spec, events, ctx, started, cancellation)

    async def _start(
        self,
        definition: AgentDefinition,
        spec: AgentStepSpec,
        events: EventSink | None,
        ctx: AgentContext,
        started: float,
        cancellation: Cancellation | None,
    ) -> StepOutcome:
        """Announce the step and run its agent (interruptible by ``cancellation``)."""
        if events is not None:
            emit(events, StepStarted(task_id=spec.task_id, agent=spec.agent, worker="local"))
        return await run_interruptible(
            definition, spec, ctx, started=started, cancellation=cancellation
        )
