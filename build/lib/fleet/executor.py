"""The one seam: :class:`AgentExecutor` runs a step and gives back its outcome.

The framework owns the grammar (which steps, how they compose, the concurrency
hint); the executor owns placement (in-process, a Celery task, anything else).
Combinators never learn where a step ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .deltas import DeltaChannel, MemoryDeltaChannel
from .events import EventSink
from .spec import AgentStepSpec, StepOutcome

__all__ = ["DEFAULT_CONCURRENCY_HINT", "AgentExecutor", "OutcomeCallback", "PipelineStage"]

DEFAULT_CONCURRENCY_HINT = 8
"""What a host that does not say otherwise is taken to handle at once."""

PipelineStage = Callable[[StepOutcome | None, Any], AgentStepSpec | None]
"""Builds an item's next step from its previous outcome (``None`` before the first stage);
returning ``None`` ends that item's chain."""

OutcomeCallback = Callable[[int, StepOutcome], Awaitable[None]]
"""Told ``(index, outcome)`` as each step of a round finishes (the resumable journal hook)."""


class AgentExecutor(ABC):
    """Runs agent steps: the boundary between orchestration grammar and placement.

    Subclasses implement :meth:`execute_step`. Hosts with a native batch shape (a
    Celery group, a chain of tasks) may also override :meth:`native_round` and
    :meth:`native_pipeline`; combinators use them when offered and fall back to
    driving :meth:`execute_step` themselves otherwise, with identical results.
    """

    @abstractmethod
    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        """Run one step to completion.

        Never raises: a failed, refused, crashed, timed-out or cancelled step comes back
        as ``StepOutcome(success=False, error=...)``.
        """

    def concurrency_hint(self) -> int:
        """Advisory ceiling on how many steps combinators run at once (< 1 is taken as 1)."""
        return DEFAULT_CONCURRENCY_HINT

    def delta_channel(self, root_id: str) -> DeltaChannel:
        """Where the output deltas of workflow ``root_id`` travel on this host.

        The default keeps them in this process (:class:`~fleet.deltas.MemoryDeltaChannel`);
        a host whose steps run elsewhere returns a channel they can reach.
        """
        return MemoryDeltaChannel()

    async def native_round(
        self,
        specs: Sequence[AgentStepSpec],
        *,
        events: EventSink | None = None,
        on_outcome: OutcomeCallback | None = None,
        workflow_id: str | None = None,
    ) -> list[StepOutcome] | None:
        """Run a whole barrier round in the host's own shape, or return ``None`` to decline.

        An override must keep the round's contract: one outcome per spec in input order,
        a crash isolated to its step, ``on_outcome`` awaited once per finished step.
        ``workflow_id`` names the journal the round belongs to, when it is journaled.
        """
        return None

    async def native_pipeline(
        self,
        items: Sequence[Any],
        stages: Sequence[PipelineStage],
        *,
        events: EventSink | None = None,
    ) -> list[StepOutcome | None] | None:
        """Run per-item chains in the host's own shape, or return ``None`` to decline."""
        return None
