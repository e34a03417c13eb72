"""The openai agent's transport: pooled connections, the retry policy, its reservation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleet import AgentStepSpec, LocalExecutor
from fleet.agents import AgentContext, OpenAIAgent, OpenAIAgentConfig
from fleet.agents.openai import backoff
from fleet.budget import WorkflowBudget

from .fake_openai import FakeOpenAI, reply


def make_agent(base_url: str, **options: Any) -> OpenAIAgent:
    options.setdefault("model", "test-model")
    return OpenAIAgent(OpenAIAgentConfig(base_url=base_url, **options), name="llm")


def make_spec(task_id: str = "t1", **fields: Any) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="llm", description="d", prompt="Hi.", **fields)


async def test_steps_reuse_one_connection() -> None:
    """Sequential steps of one agent on one event loop share one pooled TCP connection."""
    with FakeOpenAI() as server:
        server.script(reply("a"), reply("b"), reply("c"))
        agent = make_agent(server.base_url)
        for index in range(3):
            spec = make_spec(f"t{index}")
            assert (await agent(spec, AgentContext(spec=spec))).output in "abc"
        await agent.aclose()

    assert len({request.peer for request in server.requests}) == 1


def test_each_event_loop_gets_its_own_client() -> None:
    """An agent outlives an asyncio.run(): the next loop gets a fresh, working client."""
    with FakeOpenAI() as server:
        server.script(reply("first"), reply("second"))
        agent = make_agent(server.base_url)
        spec = make_spec()

        async def once() -> str:
            return (await agent(spec, AgentContext(spec=spec))).output

        assert asyncio.run(once()) == "first"
        assert asyncio.run(once()) == "second"

    first, second = server.requests
    assert first.peer != second.peer


def test_backoff_is_a_pure_policy() -> None:
    """Retry-After wins; otherwise the base doubles per attempt, capped, plus jitter."""
    assert backoff(1, 7.5, base_s=0.5, jitter=0.9) == 7.5
    assert backoff(1, None, base_s=0.5) == 0.5
    assert backoff(3, None, base_s=0.5) == 2.0
    assert backoff(3, None, base_s=0.5, jitter=0.5) == 2.25
    assert backoff(20, None, base_s=0.5) == 30.0
    assert backoff(20, None, base_s=0.5, cap_s=4.0, jitter=1.0) == 4.5
    assert backoff(2, None, base_s=0.0, jitter=0.7) == 0.0


@pytest.mark.parametrize("form", ["object", "definition"])
async def test_agent_object_keeps_its_own_reservation(form: str) -> None:
    """Registered as the object or as its definition, a step reserves the agent's default."""
    with FakeOpenAI() as server:
        server.script(reply("ok", delay_s=0.5))
        # "test-model" has no price: allowed explicitly (tests/test_money.py covers money)
        agent = make_agent(server.base_url, reserve_tokens=321, unknown_price="allow")
        budget = WorkflowBudget(10_000)
        registered = agent if form == "object" else agent.definition("llm")
        executor = LocalExecutor(
            agents={"llm": registered}, budget=budget, default_reserve_tokens=55
        )
        step = asyncio.create_task(executor.execute_step(make_spec()))
        assert await asyncio.to_thread(server.wait_for, lambda s: len(s.requests) == 1)
        held = (await budget.snapshot()).reserved_tokens
        outcome = await step

    assert outcome.success, outcome.output
    assert held == 321
