"""The embedded default host: admits every step and runs it in this process, on asyncio.

A step's lifecycle here is both halves in one process: admission (:mod:`fleet.admission`:
its agent, its reservation, a cancel) and execution (:mod:`fleet.step`: its context, its
agent run under the hold, the settlement, its events).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .admission import (
    cancelled_before_start,
    refusal,
    reservation_tokens,
    reserve_or_refuse,
    resolve_agent,
)
from .agents.base import AgentContext, AgentDefinition
from .agents.registry import AgentLike, AgentRegistry
from .cancel.signal import (
    Cancellation,
    StepInterrupted,
    cancelled_outcome,
    current_cancellation,
)
from .deltas import current_deltas
from .errors import BudgetError, BudgetExhaustedError
from .events import EventSink, StepFinished, StepStarted, emit
from .executor import DEFAULT_CONCURRENCY_HINT, AgentExecutor
from .limiters import MemoryRateLimiter, RateLimiter
from .perloop import PerLoop
from .spec import AgentStepSpec, StepOutcome
from .step import (
    DEFAULT_RESERVE_TOKENS,
    close_deltas,
    holding,
    run_interruptible,
    step_context,
)

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
        """Admit ``spec`` and run it here; never raises (cancelling the caller cancels the step).

        Under a cancelled workflow (:func:`fleet.cancel.current_cancellation`) nothing
        starts and a running step is interrupted: both come back ``error="cancelled"``.
        """
        cancellation = current_cancellation()
        stopped = cancelled_before_start(spec, cancellation, worker="local")
        if stopped is not None:
            return stopped
        definition = resolve_agent(self.registry, spec, worker="local")
        if isinstance(definition, StepOutcome):
            emit(events, StepFinished.of(definition))  # as a Celery worker's answer is announced
            return definition
        async with self._slot():
            if cancellation is None:
                return await self._run(definition, spec, events, None)
            # Cancelled while waiting for a slot?
            stopped = cancelled_before_start(spec, cancellation, worker="local")
            if stopped is not None:
                return stopped
            return await self._run(definition, spec, events, cancellation)

    async def _run(
        self,
        definition: AgentDefinition,
        spec: AgentStepSpec,
        events: EventSink | None,
        cancellation: Cancellation | None,
    ) -> StepOutcome:
        started = time.monotonic()
        channel = current_deltas()
        ctx = step_context(
            definition,
            spec,
            started=started,
            worker="local",
            limiter=self.limiter,
            events=events,
            deltas=None if channel is None else channel.publisher(spec.task_id),
        )
        try:
            try:
                outcome = await self._hold_and_run(
                    definition, spec, events, ctx, started, cancellation
                )
            finally:
                close_deltas(ctx)  # its last text before its step_finished
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
            outcome = refusal(spec, error, worker="local")
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
        tokens = reservation_tokens(definition, spec, self.default_reserve_tokens)
        with _interruptible(cancellation):
            reservation = await reserve_or_refuse(
                budget,
                spec,
                tokens,
                holder=f"{spec.task_id}:{uuid.uuid4().hex[:8]}",
                worker="local",
            )
        if isinstance(reservation, StepOutcome):  # refused: it never starts
            return reservation
        async with holding(reservation, ctx, settle=True):
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
