"""The admission half of a step's lifecycle (fleet.admission), and both hosts using it."""

from __future__ import annotations

import uuid

import pytest

from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget
from fleet.admission import (
    cancelled_before_start,
    refusal,
    reservation_tokens,
    reserve_or_refuse,
    resolve_agent,
)
from fleet.agents import AgentDefinition, AgentRegistry
from fleet.budget import Reservation
from fleet.cancel.signal import Cancellation
from fleet.errors import BudgetError, BudgetExhaustedError
from fleet.ledgers import MemoryLedger
from fleet.spec import StepOutcome


def spec(task_id: str = "t1", agent: str = "echo", **extra: object) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent=agent, description="d", prompt="p", **extra)


def budget(limit: int) -> WorkflowBudget:
    return WorkflowBudget(limit, ledger=MemoryLedger(), workflow_id=f"wf-{uuid.uuid4().hex[:8]}")


def test_an_unknown_agent_is_an_outcome_naming_it() -> None:
    """resolve_agent returns the step's agent, or an unknown_agent outcome on its worker."""
    registry = AgentRegistry()
    assert resolve_agent(registry, spec()) is registry.resolve("echo")
    outcome = resolve_agent(registry, spec(agent="nobody"), worker="w1")
    assert isinstance(outcome, StepOutcome)
    assert (outcome.success, outcome.error, outcome.worker) == (False, "unknown_agent", "w1")
    assert "nobody" in outcome.output


def test_the_reservation_is_max_tokens_else_the_agents_rule_else_the_default() -> None:
    """reservation_tokens: max_tokens, the agent's reserve_tokens, the default; unknown agents too."""
    registry = AgentRegistry()
    definition = AgentDefinition("greedy", registry.resolve("echo").run, reserve_tokens=300)
    assert reservation_tokens(definition, spec(agent="greedy", max_tokens=40), 1000) == 40
    assert reservation_tokens(definition, spec(agent="greedy"), 1000) == 300
    plain = AgentDefinition("plain", definition.run)
    assert reservation_tokens(plain, spec(agent="plain"), 1000) == 1000
    assert reservation_tokens(None, spec(agent="nobody", max_tokens=7), 1000) == 7
    assert reservation_tokens(None, spec(agent="nobody"), 1000) == 1000


def test_a_refusal_maps_the_budget_error_to_its_kind() -> None:
    """BudgetExhaustedError fails the step budget_exhausted; any other BudgetError, budget."""
    exhausted = refusal(spec(), BudgetExhaustedError("spent"), worker="local")
    unusable = refusal(spec(), BudgetError("parent cycle"))
    assert (exhausted.success, exhausted.error, exhausted.worker) == (
        False,
        "budget_exhausted",
        "local",
    )
    assert (unusable.error, unusable.output, unusable.worker) == ("budget", "parent cycle", None)


async def test_reserve_or_refuse_holds_the_tokens_or_returns_the_refusal() -> None:
    """A request that fits is held under the id asked for; one that cannot fit is refused."""
    guard = budget(100)
    held = await reserve_or_refuse(guard, spec(), 60, holder="t1", reservation_id="t1")
    assert isinstance(held, Reservation) and held.id == "t1" and held.tokens == 60
    assert (await guard.snapshot()).reserved_tokens == 60
    refused = await reserve_or_refuse(guard, spec("t2"), 200, holder="t2")
    assert isinstance(refused, StepOutcome) and refused.error == "budget_exhausted"
    await held.settle(10)
    snapshot = await guard.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (10, 0)


def test_only_a_cancelled_workflow_stops_a_step_before_it_starts() -> None:
    """cancelled_before_start: None without a cancel; the cancelled outcome with one."""
    cancellation = Cancellation(["r1"])
    assert cancelled_before_start(spec(), None) is None
    assert cancelled_before_start(spec(), cancellation) is None
    cancellation.cancel("stop now")
    outcome = cancelled_before_start(spec(), cancellation, worker="local")
    assert outcome is not None and outcome.error == "cancelled" and outcome.worker == "local"
    assert "stop now" in outcome.output


@pytest.mark.parametrize("limit", [50, 0])
async def test_the_local_host_refuses_with_the_shared_mapping(limit: int) -> None:
    """LocalExecutor's refused step is exactly admission.refusal of the budget's error."""
    guard = budget(limit)
    executor = LocalExecutor(budget=guard)
    step = spec("big", max_tokens=80)
    outcome = await executor.execute_step(step)
    try:
        await guard.reserve(80, holder="probe")
    except BudgetExhaustedError as error:
        expected = refusal(step, error, worker="local")
    assert outcome.model_dump(exclude={"duration_s"}) == expected.model_dump(exclude={"duration_s"})
