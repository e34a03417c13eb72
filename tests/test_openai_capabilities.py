"""What the openai agent learns about its server: fallbacks, what is retried, concurrency."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from fleet import AgentStepSpec, LocalExecutor, StepOutcome
from fleet.agents import AgentContext, OpenAIAgent, OpenAIAgentConfig
from fleet.agents.openai.concurrency import AdaptiveLimit
from fleet.step import run_agent

from .fake_openai import AutoModel, FakeOpenAI, error, reply, tool_call

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def make_agent(base_url: str, **options: Any) -> OpenAIAgent:
    options.setdefault("model", "m")
    options.setdefault("backoff_s", 0.01)
    return OpenAIAgent(OpenAIAgentConfig(base_url=base_url, **options), name="llm")


def make_spec(task_id: str = "t1", **fields: Any) -> AgentStepSpec:
    fields.setdefault("prompt", "Count.")
    return AgentStepSpec(task_id=task_id, agent="llm", description="d", **fields)


async def run(agent: OpenAIAgent, spec: AgentStepSpec) -> StepOutcome:
    ctx = AgentContext(spec=spec)
    return await run_agent(agent.definition("llm"), spec, ctx, started=time.monotonic())


def formats(server: FakeOpenAI) -> list[Any]:
    return [(r.body.get("response_format") or {}).get("type") for r in server.requests]


async def test_json_schema_500_falls_back_once_and_is_remembered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 500 validation error on json_schema: json_object next, for this and later steps."""
    with FakeOpenAI(reject_json_schema=True, auto=AutoModel(service_s=0)) as server:
        agent = make_agent(server.base_url)
        with caplog.at_level(logging.INFO, logger="fleet.agents.openai"):
            first = await run(agent, make_spec("a", output_schema=SCHEMA))
            second = await run(agent, make_spec("b", output_schema=SCHEMA))

    assert first.success and second.success, (first.output, second.output)
    assert first.structured == second.structured == {"n": 1}
    assert formats(server) == ["json_schema", "json_object", "json_object"]
    assert server.requests[1].body["response_format"]["schema"] == SCHEMA
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "rejects 'response_format'; using json_object response format from now on" in lines[0]
    assert "SECRET-LOOKING" not in caplog.text and "Traceback" not in caplog.text


async def test_rejected_json_object_falls_back_to_the_prompt() -> None:
    """A server that refuses json_object too is asked with the schema in the prompt only."""
    with FakeOpenAI() as server:
        message = "1 validation error: response_format: Input should be 'text' or 'json_object'"
        server.script(
            error(400, message),
            error(400, "validation error: response_format is not supported"),
            reply('{"n": 3}'),
        )
        outcome = await run(make_agent(server.base_url), make_spec(output_schema=SCHEMA))

    assert outcome.success and outcome.structured == {"n": 3}
    assert formats(server) == ["json_schema", "json_object", None]
    assert "FINAL OUTPUT CONTRACT" in server.requests[2].body["messages"][-1]["content"]


async def test_validation_500_without_a_fallback_is_provider_at_once() -> None:
    """A 500 validation error is not retried: provider, naming the rejected field."""
    with FakeOpenAI() as server:
        body = "1 validation error for CreateChatCompletionRequest\nstop\n  Input should be a list"
        server.script(error(500, body), reply("never"))
        outcome = await run(make_agent(server.base_url), make_spec())

    assert outcome.error == "provider"
    assert "rejected the request's 'stop' (HTTP 500" in outcome.output
    assert len(server.requests) == 1


async def test_plain_500_is_retried_and_503_too() -> None:
    """A 500 without a validation body, and 502/503/504/408, are retried."""
    with FakeOpenAI() as server:
        server.script(
            error(500, "CUDA error"), error(502, "x"), error(504, "x"), error(408, "x"), reply("ok")
        )
        outcome = await run(make_agent(server.base_url), make_spec())

    assert outcome.success and len(server.requests) == 5


async def test_null_content_rejected_becomes_empty_string() -> None:
    """A server that refuses content: null beside tool calls gets "" from then on."""
    with FakeOpenAI(reject_null_content=True, auto=AutoModel(service_s=0)) as server:
        agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"])
        first = await run(agent, make_spec("a"))
        second = await run(agent, make_spec("b"))

    assert first.success and second.success, (first.output, second.output)
    statuses = [
        next((m["content"] for m in r.body["messages"] if m["role"] == "assistant"), "none")
        for r in server.requests
    ]
    # a: tool call, refused null, "" accepted; b: tool call, "" at once.
    assert statuses == ["none", None, "", "none", ""]


async def test_max_tokens_refused_switches_to_max_completion_tokens() -> None:
    """A model that wants max_completion_tokens gets it, and keeps getting it."""
    with FakeOpenAI() as server:
        server.script(
            error(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
            ),
            reply("a"),
            reply("b"),
        )
        agent = make_agent(server.base_url, max_tokens=20)
        assert (await run(agent, make_spec("a"))).success
        assert (await run(agent, make_spec("b"))).success

    first, second, third = (r.body for r in server.requests)
    assert first["max_tokens"] == 20 and "max_completion_tokens" not in first
    assert second["max_completion_tokens"] == 20 and "max_tokens" not in second
    assert third["max_completion_tokens"] == 20


async def test_tool_call_with_null_content_is_read() -> None:
    """An answer with content: null and tool calls is read leniently, extra keys ignored."""
    with FakeOpenAI() as server:
        call = tool_call("add", {"a": 1, "b": 2}) | {"index": 0, "extra": {"x": 1}}
        server.script(reply(None, tool_calls=[call]), reply("3"))
        agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"])
        outcome = await run(agent, make_spec())

    assert outcome.success and outcome.output == "3"
    assert server.requests[1].body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "3",
    }


async def test_max_concurrent_caps_calls_in_flight() -> None:
    """max_concurrent bounds the calls one agent keeps in flight, whatever the executor allows."""
    with FakeOpenAI(auto=AutoModel(service_s=0.05, slots=8)) as server:
        agent = make_agent(server.base_url, max_concurrent=2)
        executor = LocalExecutor(agents={"llm": agent}, max_concurrency=16)
        outcomes = await asyncio.gather(
            *[executor.execute_step(make_spec(f"t{i}")) for i in range(12)]
        )

    assert all(o.success for o in outcomes)
    assert agent.transport.gate.peak == 2


def test_adaptive_limit_grows_then_halves_once_per_round() -> None:
    """Slow start doubles per round; congestion halves once per round, then growth is +1/round."""
    policy = AdaptiveLimit(ceiling=16)
    for _ in range(5):
        policy.on_success(policy.epoch, latency_s=1.0, tokens=10)
    assert policy.slots == 6
    epoch = policy.epoch
    policy.on_congestion(epoch)
    policy.on_congestion(epoch)  # same round: no second halving
    assert policy.slots == 3 and not policy.slow_start
    for _ in range(4):  # +1/3, +1/3.33, ...: one slot more after about a round
        policy.on_success(policy.epoch, latency_s=1.0, tokens=10)
    assert policy.slots == 4
    policy.on_success(policy.epoch, latency_s=5.0, tokens=10)  # one slow call: jitter
    policy.on_success(policy.epoch, latency_s=5.0, tokens=10)
    assert policy.slots == 4
    policy.on_success(policy.epoch, latency_s=5.0, tokens=10)  # the median climbed 5x
    assert policy.slots == 2
    for _ in range(300):
        policy.on_success(policy.epoch, latency_s=1.0, tokens=10)
    assert policy.slots == 16


def test_one_slow_answer_among_quick_ones_does_not_narrow_the_width() -> None:
    """Jitter is not congestion: one call 1000x slower than the rest leaves 16 calls in flight."""
    policy = AdaptiveLimit(ceiling=16, limit=16.0, slow_start=False)
    for i in range(200):
        slow = i in (3, 60, 61)  # a stray one while warming up, then two in a row
        policy.on_success(policy.epoch, latency_s=1.0 if slow else 0.001, tokens=40, in_flight=16)
    assert policy.slots == 16 and policy.epoch == 0


def test_calls_from_before_a_fall_do_not_narrow_it_again() -> None:
    """After a fall, only calls sent at the new width judge it."""
    policy = AdaptiveLimit(ceiling=16, limit=16.0, slow_start=False)
    policy.on_success(0, latency_s=0.1, tokens=10, in_flight=16)
    for _ in range(5):
        policy.on_success(0, latency_s=2.0, tokens=10, in_flight=16)  # a queueing server
    assert policy.slots == 8 and policy.epoch == 1
    for _ in range(8):  # the rest of the old round answers, as slowly: growth, no fall
        policy.on_success(0, latency_s=2.0, tokens=10, in_flight=8)
    assert policy.slots == 9 and policy.epoch == 1
    for _ in range(5):  # the new width queues too
        policy.on_success(1, latency_s=2.0, tokens=10, in_flight=8)
    assert policy.slots == 4 and policy.epoch == 2


async def test_a_timed_out_call_waits_for_its_slot_before_the_retry() -> None:
    """After a timeout the slot stays taken a while (the server may still be busy with it)."""
    with FakeOpenAI() as server:
        server.script(reply("late", delay_s=3), reply("ok"))
        agent = make_agent(server.base_url, timeout_s=0.5, max_concurrent=2)
        agent.transport.gate.policy.limit = 2.0
        outcome = await run(agent, make_spec())

    assert outcome.success and outcome.output == "ok"
    first, second = server.requests
    assert second.at - first.at >= 0.95  # timeout 0.5 s, then the slot held 0.5 s
    assert agent.transport.gate.policy.epoch == 1  # the limit was halved once
    assert agent.transport.gate.in_flight == 0


async def test_calls_waiting_for_a_slot_use_what_was_learned_meanwhile() -> None:
    """Eight structured steps at once: the refused json_schema is sent once, not once each."""
    with FakeOpenAI(reject_json_schema=True, auto=AutoModel(service_s=0.02)) as server:
        agent = make_agent(server.base_url)
        executor = LocalExecutor(agents={"llm": agent}, max_concurrency=8)
        outcomes = await asyncio.gather(
            *[executor.execute_step(make_spec(f"t{i}", output_schema=SCHEMA)) for i in range(8)]
        )

    assert all(o.success for o in outcomes), [o.output for o in outcomes]
    assert formats(server).count("json_schema") == 1
    assert len(server.requests) == 9


def test_slow_start_ends_when_a_call_waited_a_quarter_of_its_timeout() -> None:
    """A call that queued past a quarter of its timeout ends doubling without halving."""
    policy = AdaptiveLimit(ceiling=16)
    for _ in range(3):
        policy.on_success(policy.epoch, latency_s=0.3, tokens=8, timeout_s=1.5)
    assert policy.slots == 4 and policy.slow_start
    policy.on_success(policy.epoch, latency_s=0.6, tokens=8, timeout_s=1.5)  # queued
    assert not policy.slow_start and policy.epoch == 0
    assert policy.slots == 4  # +1/4: growth is a call per round now
    policy.on_success(policy.epoch, latency_s=0.9, tokens=8, timeout_s=1.5)  # > half
    assert policy.slots == 2 and policy.epoch == 1
