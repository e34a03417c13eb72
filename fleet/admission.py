"""The admission half of a step's lifecycle: what the host decides before a step runs.

A host admits a step before it runs anywhere: it resolves the step's agent (an unknown
one fails the step ``unknown_agent``), sizes the step's token reservation, takes it from
the workflow's budget or refuses the step (``budget_exhausted``, ``budget``), and checks
for a cancel. :class:`~fleet.LocalExecutor` admits and then executes in one process
(:mod:`fleet.step` is the execution half); the Celery host (``fleet.celery.round``)
admits only and sends what it admitted; a worker executes only. Each decision is written
here once, so the hosts cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cancel.signal import Cancellation, cancelled_outcome
from .errors import BudgetError, BudgetExhaustedError, UnknownAgentError
from .spec import AgentStepSpec, StepOutcome

if TYPE_CHECKING:
    from .agents.base import AgentDefinition
    from .agents.registry import AgentRegistry
    from .budget import Reservation, WorkflowBudget

__all__ = [
    "cancelled_before_start",
    "refusal",
    "reservation_tokens",
    "reserve_or_refuse",
    "resolve_agent",
]


def resolve_agent(
    registry: AgentRegistry, spec: AgentStepSpec, *, worker: str | None = None
) -> AgentDefinition | StepOutcome:
    """The step's agent, or the ``unknown_agent`` outcome that ends the step unrun."""
    try:
        return registry.resolve(spec.agent)
    except UnknownAgentError as error:
        return StepOutcome.failed(
            spec.task_id, spec.agent, str(error), error="unknown_agent", worker=worker
        )


def reservation_tokens(
    definition: AgentDefinition | None, spec: AgentStepSpec, default: int
) -> int:
    """Tokens to reserve for ``spec``: its ``max_tokens``, else its agent's rule, else ``default``.

    Args:
        definition: the step's agent, or ``None`` when this host does not know it (the
            step is still sent: the worker answers ``unknown_agent``).
        spec: the step.
        default: the reservation of a step with no ``max_tokens`` whose agent names none.
    """
    if definition is not None:
        return definition.reservation_for(spec, default)
    return spec.max_tokens if spec.max_tokens is not None else default


def refusal(
    spec: AgentStepSpec,
    error: BudgetExhaustedError | BudgetError,
    *,
    worker: str | None = None,
) -> StepOutcome:
    """The outcome of a step its budget refused: ``budget_exhausted``, else ``budget``.

    ``budget`` means the budget cannot be used at all (an unknown parent, a cycle).
    """
    kind = "budget_exhausted" if isinstance(error, BudgetExhaustedError) else "budget"
    return StepOutcome.failed(spec.task_id, spec.agent, str(error), error=kind, worker=worker)


async def reserve_or_refuse(
    budget: WorkflowBudget,
    spec: AgentStepSpec,
    tokens: int,
    *,
    holder: str,
    reservation_id: str | None = None,
    worker: str | None = None,
) -> Reservation | StepOutcome:
    """Take the step's reservation from ``budget``, or the :func:`refusal` outcome.

    A cancel of the caller while it waits propagates (nothing is refused then).
    """
    try:
        return await budget.reserve(tokens, holder=holder, reservation_id=reservation_id)
    except (BudgetExhaustedError, BudgetError) as error:
        return refusal(spec, error, worker=worker)


def cancelled_before_start(
    spec: AgentStepSpec, cancellation: Cancellation | None, *, worker: str | None = None
) -> StepOutcome | None:
    """The ``cancelled`` outcome of a step whose workflow was cancelled before it started."""
    if cancellation is None or not cancellation.cancelled:
        return None
    return cancelled_outcome(spec, cancellation.reason, worker=worker)
