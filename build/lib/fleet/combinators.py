"""The orchestration grammar: barrier fan-out, per-item pipelines and loops.

Every combinator returns one result per input, in input order, and turns a crashing
branch into a failed value without touching its siblings.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .cancel.signal import cancelled_outcome, current_cancellation
from .events import EventSink
from .executor import AgentExecutor, OutcomeCallback, PipelineStage
from .fanout import run_ordered
from .spec import AgentStepSpec, StepOutcome

__all__ = [
    "LoopDecision",
    "PipelineStage",
    "crash_outcome",
    "execute_loop",
    "execute_pipeline",
    "execute_steps_parallel",
    "run_round",
]

logger = logging.getLogger(__name__)


def _hint(executor: AgentExecutor) -> int:
    return max(int(executor.concurrency_hint()), 1)


def crash_outcome(spec: AgentStepSpec, error: BaseException) -> StepOutcome:
    """The failed outcome that stands in for a branch that raised."""
    return StepOutcome.failed(
        spec.task_id,
        spec.agent,
        f"parallel branch crashed: {type(error).__name__}: {error}",
        error="crashed",
    )


async def _execute(
    executor: AgentExecutor, spec: AgentStepSpec, events: EventSink | None
) -> StepOutcome:
    """``executor.execute_step``, unless the workflow is cancelled: then nothing is sent."""
    cancellation = current_cancellation()
    if cancellation is not None and cancellation.cancelled:
        return cancelled_outcome(spec, cancellation.reason)
    return await executor.execute_step(spec, events)


async def run_round(
    executor: AgentExecutor,
    specs: Sequence[AgentStepSpec],
    *,
    events: EventSink | None = None,
    on_outcome: OutcomeCallback | None = None,
    workflow_id: str | None = None,
) -> list[StepOutcome]:
    """Run one barrier round: the host's native shape if it has one, else a sliding window."""
    specs = list(specs)
    if not specs:
        return []
    cancellation = current_cancellation()
    if cancellation is not None and cancellation.cancelled:
        return [cancelled_outcome(spec, cancellation.reason) for spec in specs]
    native = await executor.native_round(
        specs, events=events, on_outcome=on_outcome, workflow_id=workflow_id
    )
    if native is not None:
        if len(native) != len(specs):
            raise RuntimeError(
                f"{type(executor).__name__}.native_round returned {len(native)} outcomes "
                f"for {len(specs)} specs; a host must return one outcome per spec"
            )
        return native

    async def run(index: int, spec: AgentStepSpec) -> StepOutcome:
        outcome = await _execute(executor, spec, events)
        if on_outcome is not None:
            await on_outcome(index, outcome)
        return outcome

    return await run_ordered(
        specs, _hint(executor), run, lambda _i, spec, error: crash_outcome(spec, error)
    )


async def execute_steps_parallel(
    executor: AgentExecutor,
    specs: Sequence[AgentStepSpec],
    *,
    events: EventSink | None = None,
) -> list[StepOutcome]:
    """Fan ``specs`` out across ``executor`` and wait for all of them (a barrier).

    At most ``executor.concurrency_hint()`` steps run at once, started in input order as
    earlier ones finish. Returns one outcome per spec, in input order; a branch that
    raises becomes ``StepOutcome(success=False, error="crashed")`` with the spec's task id
    and agent. Task ids are not de-duplicated here (see the resumable variant).
    """
    return await run_round(executor, specs, events=events)


async def _run_chain(
    executor: AgentExecutor,
    item: Any,
    stages: Sequence[PipelineStage],
    events: EventSink | None,
) -> StepOutcome | None:
    previous: StepOutcome | None = None
    for stage in stages:
        spec = stage(previous, item)
        if spec is None:
            break
        previous = await _execute(executor, spec, events)
        if not previous.success:
            break
    return previous


def _chain_crashed(index: int, _item: Any, error: Exception) -> None:
    logger.warning(
        "pipeline chain for item #%d crashed (%s: %s); its result is None",
        index,
        type(error).__name__,
        error,
    )


async def execute_pipeline(
    executor: AgentExecutor,
    items: Sequence[Any],
    stages: Sequence[PipelineStage],
    *,
    events: EventSink | None = None,
) -> list[StepOutcome | None]:
    """Run each item through ``stages`` as its own chain, with no barrier between stages.

    Each stage gets the item's previous outcome (``None`` before the first) and the item,
    and returns the next spec or ``None`` to stop. A chain also stops at a failed step.
    Up to ``concurrency_hint()`` chains are active at once. Returns, per item in input
    order, its last outcome (failed or not), or ``None`` if its first stage declined or
    anything in its chain raised (other chains are unaffected).
    """
    items = list(items)
    stages = list(stages)
    if not items:
        return []
    native = await executor.native_pipeline(items, stages, events=events)
    if native is not None:
        return native

    async def run(_index: int, item: Any) -> StepOutcome | None:
        return await _run_chain(executor, item, stages, events)

    return await run_ordered(items, _hint(executor), run, _chain_crashed)


@dataclass(frozen=True)
class _Continue:
    specs: list[AgentStepSpec] = field(default_factory=list)


@dataclass(frozen=True)
class _Stop:
    pass


class LoopDecision:
    """What an :func:`execute_loop` predicate decides after a round.

    ``LoopDecision.Continue(specs)`` runs another round with ``specs`` (an empty list
    ends the loop: nothing left to do); ``LoopDecision.Stop()`` ends it now.
    """

    Continue: TypeAlias = _Continue
    Stop: TypeAlias = _Stop


LoopPredicate = Callable[
    [list[StepOutcome]], "LoopDecision.Continue | LoopDecision.Stop | Awaitable[Any]"
]


async def execute_loop(
    executor: AgentExecutor,
    initial: Sequence[AgentStepSpec],
    max_iterations: int,
    next: LoopPredicate,
    *,
    events: EventSink | None = None,
) -> list[StepOutcome]:
    """Run barrier rounds until ``next`` says stop, asks for no specs, or the cap is hit.

    ``next(outcomes)`` (sync or async) is called after every round, the last capped round
    included, and returns :class:`LoopDecision`. At most ``max(max_iterations, 1)``
    rounds run. Returns the last round's outcomes; an empty ``initial`` runs nothing,
    never calls ``next`` and returns ``[]``.
    """
    cap = max(int(max_iterations), 1)
    specs = list(initial)
    last: list[StepOutcome] = []
    rounds = 0
    while specs:
        last = await execute_steps_parallel(executor, specs, events=events)
        rounds += 1
        cancellation = current_cancellation()
        if cancellation is not None and cancellation.cancelled:
            break  # a cancelled workflow asks for no further round
        decision = next(list(last))
        if inspect.isawaitable(decision):
            decision = await decision
        if isinstance(decision, _Continue) and rounds < cap:
            specs = list(decision.specs)
        elif isinstance(decision, _Continue | _Stop):
            break
        else:
            raise TypeError(
                f"execute_loop predicate returned {decision!r}; return "
                "LoopDecision.Continue(specs) or LoopDecision.Stop()"
            )
    return last
