"""The execution half of a step's lifecycle (fleet.step): context, hold, settle, deltas."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from fleet import AgentStepSpec, TokenUsage, WorkflowBudget
from fleet.agents import AgentContext, AgentDefinition, AgentRegistry
from fleet.deltas import MemoryDeltaChannel, StepDelta
from fleet.ledgers import MemoryLedger
from fleet.limiters import MemoryRateLimiter, ProviderLimit
from fleet.step import close_deltas, holding, step_context


def spec(**extra: object) -> AgentStepSpec:
    return AgentStepSpec(task_id="t1", agent="echo", description="d", prompt="p", **extra)


def context() -> AgentContext:
    echo = AgentRegistry().resolve("echo")
    return step_context(echo, spec(), started=0.0, worker="w", limiter=MemoryRateLimiter())


def budget(limit: int = 1000) -> WorkflowBudget:
    return WorkflowBudget(limit, ledger=MemoryLedger(), workflow_id=f"wf-{uuid.uuid4().hex[:8]}")


def test_the_context_carries_the_steps_deadline_limit_and_origin() -> None:
    """step_context: deadline from the start and timeout, the agent's limit, where it runs."""
    limit = ProviderLimit(name="model", requests=60, tokens=None)
    definition = AgentDefinition("limited", AgentRegistry().resolve("echo").run, limit=limit)
    limiter = MemoryRateLimiter()
    ctx = step_context(
        definition,
        spec(timeout_s=5.0),
        started=100.0,
        worker="w1",
        limiter=limiter,
        workflow_id="wf",
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    )
    assert (ctx.deadline, ctx.worker, ctx.workflow_id) == (105.0, "w1", "wf")
    assert ctx.limit is limit and ctx.limiter is limiter
    assert ctx.held_tokens is None and ctx.budget is None and ctx.deltas is None
    assert (
        step_context(definition, spec(), started=1.0, worker="w", limiter=limiter).deadline is None
    )


async def test_holding_caps_the_step_and_settles_what_it_used() -> None:
    """With settle=True the hold caps the context, and what it used is charged at the end."""
    guard = budget()
    reservation = await guard.reserve(300, holder="t1")
    ctx = context()
    async with holding(reservation, ctx, settle=True):
        assert ctx.held_tokens == 300 and ctx.budget is guard
        ctx.used = TokenUsage(input_tokens=20, output_tokens=20, total_tokens=40)
        assert (await guard.snapshot()).reserved_tokens == 300
    snapshot = await guard.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (40, 0)


async def test_holding_settles_a_cancelled_step_at_what_it_used() -> None:
    """A step cancelled inside its hold is still charged what it spent, and holds nothing."""
    guard = budget()
    reservation = await guard.reserve(300, holder="t1")
    ctx = context()

    async def step() -> None:
        async with holding(reservation, ctx, settle=True):
            ctx.used = TokenUsage(input_tokens=5, output_tokens=7, total_tokens=12)
            await asyncio.sleep(60)

    task = asyncio.create_task(step())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snapshot = await guard.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (12, 0)


async def test_holding_without_settle_leaves_the_reservation_to_its_caller() -> None:
    """With settle=False (a worker, which settles once its outcome is recorded) nothing is charged."""
    guard = budget()
    reservation = await guard.reserve(300, holder="t1")
    ctx = context()
    async with holding(reservation, ctx, settle=False):
        ctx.used = TokenUsage(input_tokens=5, output_tokens=5, total_tokens=10)
    snapshot = await guard.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (0, 300)
    assert not reservation.settled


async def test_close_deltas_delivers_the_steps_last_text() -> None:
    """close_deltas flushes what the publisher still holds (and is a no-op without one)."""
    seen: list[StepDelta] = []
    channel = MemoryDeltaChannel(interval_s=60.0)
    await channel.start(seen.append)
    ctx = context()
    close_deltas(ctx)  # no publisher: nothing to do
    ctx.deltas = channel.publisher("t1")
    assert ctx.deltas is not None
    ctx.deltas.emit("first")  # the first delta goes at once
    ctx.deltas.emit(" second")  # held back by the interval
    started = time.monotonic()
    close_deltas(ctx)
    assert time.monotonic() - started < 60.0
    assert "".join(d.text for d in seen) == "first second"
