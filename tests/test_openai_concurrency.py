"""How many calls an openai agent keeps in flight: a wide start, one cap, a shared memory."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, LocalExecutor, load_agents
from fleet.agents import OpenAIAgent, OpenAIAgentConfig
from fleet.limiters import RedisRateLimiter

from .fake_openai import AutoModel, FakeOpenAI


def make_agent(base_url: str, **options: Any) -> OpenAIAgent:
    options.setdefault("model", "m")
    options.setdefault("backoff_s", 0.01)
    return OpenAIAgent(OpenAIAgentConfig(base_url=base_url, **options), name="llm")


def specs(count: int) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"t{i}", agent="llm", description="d", prompt=f"Count {i}.")
        for i in range(count)
    ]


async def test_an_agent_that_declares_nothing_starts_as_wide_as_its_steps() -> None:
    """32 steps at once, no max_concurrent: all 32 calls are sent before the first answer."""
    service_s = 5.0  # the first answer comes this late: time enough for 32 sends on a busy host
    with FakeOpenAI(auto=AutoModel(service_s=service_s, slots=64)) as server:
        agent = make_agent(server.base_url)
        executor = LocalExecutor(agents={"llm": agent}, max_concurrency=32)
        outcomes = await asyncio.gather(*[executor.execute_step(s) for s in specs(32)])
        first = min(r.at for r in server.requests)
        before_any_answer = [r for r in server.requests if r.at < first + service_s]

    assert all(o.success for o in outcomes)
    assert len(before_any_answer) == 32
    assert agent.transport.gate.peak == 32


async def test_what_a_narrow_server_taught_is_remembered_fleet_wide(
    redis_url: str, key_prefix: str
) -> None:
    """A one-slot server narrows the limit; another process's agent starts there, not wide."""
    with FakeOpenAI(auto=AutoModel(service_s=0.5, slots=1)) as server:
        first = make_agent(server.base_url)
        one = RedisRateLimiter(redis_url, key_prefix=key_prefix)
        executor = LocalExecutor(agents={"llm": first}, max_concurrency=10, limiter=one)
        await asyncio.gather(*[executor.execute_step(s) for s in specs(10)])
        learned = await one.recall_width(first.transport.gate.endpoint)
        await one.close()

        second = make_agent(server.base_url)  # a fresh agent: as in another worker
        sent_before = len(server.requests)
        other = RedisRateLimiter(redis_url, key_prefix=key_prefix)
        executor = LocalExecutor(agents={"llm": second}, max_concurrency=10, limiter=other)
        outcomes = await asyncio.gather(*[executor.execute_step(s) for s in specs(10)])
        await other.close()
        calls = server.requests[sent_before:]
        first_sent = min(r.at for r in calls)
        before_any_answer = [r for r in calls if r.at < first_sent + 0.5]

    assert learned is not None and learned < 10  # the climbing latency halved it
    assert all(o.success for o in outcomes)
    assert len(before_any_answer) <= learned  # it started where the first left off, not wide
    assert second.transport.gate.peak < 10


def test_max_concurrent_has_one_owner_the_limit_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[limits.NAME] max_concurrent caps its agents; the agent's own key warns it moved."""
    path = tmp_path / "agents.toml"
    path.write_text(
        textwrap.dedent(
            """
            [limits.local]
            requests = 1000
            max_concurrent = 3

            [agents.capped]
            kind = "openai"
            base_url = "http://127.0.0.1:9/v1"
            model = "m"
            limit = "local"

            [agents.old]
            kind = "openai"
            base_url = "http://127.0.0.1:9/v1"
            model = "m"
            max_concurrent = 5
            """
        ),
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="fleet.agents"):
        agents = load_agents(path)
    capped, old = agents["capped"].run, agents["old"].run
    assert isinstance(capped, OpenAIAgent) and isinstance(old, OpenAIAgent)
    assert capped.transport.gate.policy.ceiling == 3
    assert old.transport.gate.policy.ceiling == 5
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1 and "[agents.old] max_concurrent" in warned[0]
    assert "[limits.NAME]" in warned[0]


async def test_a_queued_call_is_waited_for_while_the_server_answers() -> None:
    """Six calls on a one-slot server, timeout under the queue: six requests, no retry."""
    with FakeOpenAI(auto=AutoModel(service_s=0.3, slots=1)) as server:
        agent = make_agent(server.base_url, timeout_s=0.8, max_retries=4)
        executor = LocalExecutor(agents={"llm": agent}, max_concurrency=6)
        outcomes = await asyncio.gather(*[executor.execute_step(s) for s in specs(6)])
        received = len(server.requests)
        await agent.aclose()

    assert [o.error for o in outcomes] == [None] * 6, [o.output for o in outcomes]
    assert received == 6
