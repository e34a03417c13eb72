"""LocalExecutor enforces a WorkflowBudget: reserve before each step, settle after it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleet import (
    AgentContext,
    AgentResult,
    AgentStepSpec,
    LocalExecutor,
    TokenUsage,
    WorkflowBudget,
    execute_steps_parallel,
)
from fleet.agents import estimate_tokens
from fleet.events import StepFinished, StepStarted
from fleet.ledgers import BudgetLedger, MemoryLedger, RedisLedger


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[BudgetLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    redis_ledger = RedisLedger(request.getfixturevalue("redis_url"), key_prefix=key_prefix)
    yield redis_ledger
    await redis_ledger.close()


def budget_of(ledger: BudgetLedger, limit: int | None) -> WorkflowBudget:
    return WorkflowBudget(limit, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex[:8]}")


async def test_fan_out_of_50_echo_steps_with_budget_for_20(ledger: BudgetLedger) -> None:
    """Exactly 20 of 50 echo steps run; 30 fail budget_exhausted; the snapshot agrees."""
    prompts = [f"step {i:02d} ".ljust(40, ".") for i in range(50)]
    per_step = 2 * estimate_tokens(prompts[0])  # echo charges prompt + echoed completion
    assert per_step == 20
    budget = budget_of(ledger, 20 * per_step)
    executor = LocalExecutor(budget=budget, max_concurrency=8)
    events: list[Any] = []
    specs = [
        AgentStepSpec(task_id=f"s{i:02d}", agent="echo", description="echo", prompt=prompt)
        for i, prompt in enumerate(prompts)
    ]
    outcomes = await execute_steps_parallel(executor, specs, events=events.append)

    assert [o.task_id for o in outcomes] == [s.task_id for s in specs]
    ran = [o for o in outcomes if o.success]
    refused = [o for o in outcomes if not o.success]
    assert len(ran) == 20 and len(refused) == 30
    assert [o.output for o in ran] == [prompts[int(o.task_id[1:])] for o in ran]
    for outcome in refused:
        assert outcome.error == "budget_exhausted"
        assert outcome.output == "workflow token budget exhausted (400 / 400 tokens)"
        assert outcome.usage.total_tokens == 0
    assert sum(o.usage.total_tokens for o in ran) == 400

    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.limit_tokens) == (400, 0, 400)
    assert snap.remaining_tokens == 0 and snap.is_exhausted

    started = {e.task_id for e in events if isinstance(e, StepStarted)}
    finished = {e.task_id: e for e in events if isinstance(e, StepFinished)}
    assert started == {o.task_id for o in ran}
    assert len(finished) == 50
    assert {t for t, e in finished.items() if e.error == "budget_exhausted"} == {
        o.task_id for o in refused
    }


def recording_agent(ran: list[str]) -> Callable[[AgentStepSpec, AgentContext], Any]:
    async def spend(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        ran.append(spec.task_id)
        tokens = int(spec.prompt)
        ctx.check_tokens(tokens)
        usage = TokenUsage(prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2)
        ctx.charge(usage)
        return AgentResult(output=f"spent {tokens}", usage=usage)

    return spend


async def test_charges_actual_usage_and_never_runs_a_refused_step(ledger: BudgetLedger) -> None:
    """Steps reserve max_tokens but are charged what they used; refused ones never run."""
    ran: list[str] = []
    budget = budget_of(ledger, 100)
    executor = LocalExecutor(agents={"spend": recording_agent(ran)}, budget=budget)
    specs = [
        AgentStepSpec(task_id=f"t{i}", agent="spend", description="d", prompt="10", max_tokens=50)
        for i in range(10)
    ]
    outcomes = await execute_steps_parallel(executor, specs)
    succeeded = [o.task_id for o in outcomes if o.success]
    refused = [o for o in outcomes if not o.success]
    # Reservations of 50 are released down to the 10 used: 6 steps fit (60 + 50 > 100 after).
    assert len(succeeded) == 6 and len(refused) == 4
    assert sorted(ran) == sorted(succeeded)
    for outcome in refused:
        assert outcome.error == "budget_exhausted"
        assert outcome.output.startswith("workflow token budget exhausted (60 / 100 tokens)")
        assert "50" in outcome.output
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (60, 0, 40)


async def test_failed_step_is_charged_what_it_spent(ledger: BudgetLedger) -> None:
    """Tokens spent before an agent crashes are charged; nothing else is kept."""

    async def spend_then_crash(spec: AgentStepSpec, ctx: AgentContext) -> str:
        ctx.charge(TokenUsage(prompt_tokens=10, completion_tokens=5))
        raise RuntimeError("model server went away")

    budget = budget_of(ledger, 1000)
    executor = LocalExecutor(agents={"flaky": spend_then_crash}, budget=budget)
    spec = AgentStepSpec(task_id="x", agent="flaky", description="d", prompt="p", max_tokens=200)
    outcome = await executor.execute_step(spec)
    assert not outcome.success and outcome.error == "crashed"
    assert outcome.usage.total_tokens == 15
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (15, 0)


async def test_step_hold_caps_each_call_then_refuses(ledger: BudgetLedger) -> None:
    """Calls are capped to what the step still holds; a spent hold fails the step."""
    caps: list[int | None] = []

    async def greedy(spec: AgentStepSpec, ctx: AgentContext) -> str:
        while True:
            cap = ctx.check_tokens(30)
            caps.append(cap)
            ctx.charge(TokenUsage(completion_tokens=cap or 0))

    budget = budget_of(ledger, 1000)
    executor = LocalExecutor(agents={"greedy": greedy}, budget=budget)
    spec = AgentStepSpec(task_id="g", agent="greedy", description="d", prompt="p", max_tokens=50)
    outcome = await executor.execute_step(spec)
    assert caps == [30, 20]
    assert not outcome.success and outcome.error == "budget_exhausted"
    assert outcome.usage.total_tokens == 50
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (50, 0, 950)
