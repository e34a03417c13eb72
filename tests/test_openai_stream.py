"""The OpenAI-compatible agent with ``stream = true`` against the loopback provider's SSE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.provider import Provider
from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget
from fleet.agents.openai import OpenAIAgent, OpenAIAgentConfig
from fleet.deltas import LiveText
from fleet.events import StepDelta
from fleet.workflow import Workflow
from tests.celery_support import until

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["answer", "why"],
}


@pytest.fixture
def provider() -> Iterator[Provider]:
    with Provider(latency_s=0.0, token_interval_s=0.002, completion_tokens=24) as server:
        yield server


def agent(provider: Provider, **options: Any) -> OpenAIAgent:
    options = {"model": "m", "unknown_price": "allow", "backoff_s": 0.01, **options}
    config = OpenAIAgentConfig(base_url=provider.base_url, stream=True, **options)
    return OpenAIAgent(config, name="llm")


def spec(task_id: str, **fields: Any) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="llm", description="d", prompt=task_id, **fields)


async def run_live(
    llm: OpenAIAgent, specs: list[AgentStepSpec], budget: WorkflowBudget | None = None
) -> tuple[list[Any], LiveText, list[StepDelta]]:
    executor = LocalExecutor(agents={"llm": llm.definition("llm")}, budget=budget)
    flow = Workflow.builder(executor).build()
    events = flow.subscribe(deltas=True, capacity=100_000)
    outcomes = await flow.parallel(specs)
    await flow.close()
    await llm.aclose()
    deltas = [event async for event in events if isinstance(event, StepDelta)]
    live = LiveText()
    for delta in deltas:
        live.fold(delta)
    return outcomes, live, deltas


async def test_streamed_text_joins_to_the_output_and_usage_is_the_providers(
    provider: Provider,
) -> None:
    """Deltas arrive in order and join to each output; the budget is charged the provider's usage."""
    budget = WorkflowBudget(100_000)
    outcomes, live, deltas = await run_live(
        agent(provider), [spec(f"s{i}") for i in range(3)], budget
    )
    assert all(outcome.success for outcome in outcomes), outcomes
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    words = " ".join(f"w{i}" for i in range(1, 24))
    assert all(o.output.startswith("answer ") and o.output.endswith(words) for o in outcomes)
    assert len(deltas) > 3  # streamed, not one delta per step
    log = provider.stats()["log"]
    assert all(entry["status"] == 200 and "first_token_at" in entry for entry in log)
    charged = sum(outcome.usage.total_tokens for outcome in outcomes)
    assert charged == sum(entry["total_tokens"] for entry in log)
    assert (await budget.snapshot()).consumed_tokens == charged


async def test_tool_rounds_and_output_schema_work_while_streaming(provider: Provider) -> None:
    """A tool round, then a schema answer: the step succeeds and its live text is the answer."""
    provider.configure(tool_rounds=1)
    llm = agent(provider, tools=["tests.test_openai_agent:add"])
    outcomes, live, _ = await run_live(llm, [spec("tool"), spec("schema", output_schema=SCHEMA)])
    tool, structured = outcomes
    assert tool.success and structured.success, outcomes
    assert structured.structured is not None and set(structured.structured) == {"answer", "why"}
    assert live.text["tool"] == tool.output
    assert live.text["schema"] == structured.output
    assert provider.stats()["requests"] == 4  # a tool call and an answer each


async def test_a_server_streaming_without_usage_is_not_streamed_from_again(
    provider: Provider,
) -> None:
    """The first answer (no usage) is charged an estimate; later ones unstreamed and exact."""
    provider.configure(stream_usage=False)
    llm = agent(provider)
    first, _, _ = await run_live(llm, [spec("a")])
    assert first[0].success and llm.capabilities.learned.stream is False
    later, _, deltas = await run_live(llm, [spec("b")])
    assert later[0].success and not deltas
    assert later[0].usage.total_tokens == provider.stats()["log"][-1]["total_tokens"]


async def test_a_server_refusing_stream_is_asked_again_without_it(provider: Provider) -> None:
    """A 400 naming 'stream' makes the agent send the call (and later ones) unstreamed."""
    provider.configure(reject_stream=True)
    llm = agent(provider)
    outcomes, _, _ = await run_live(llm, [spec("a"), spec("b")])
    assert all(outcome.success for outcome in outcomes), outcomes
    assert llm.capabilities.learned.stream is False
    statuses = [entry["status"] for entry in provider.stats()["log"]]
    assert statuses.count(400) == 1 and statuses.count(200) == 2


async def test_a_stream_is_bounded_per_read_not_in_all(provider: Provider) -> None:
    """timeout_s bounds each wait for the server's bytes: a slow stream ends, a stalled one fails.

    1.5 s of tokens 50 ms apart under a 0.5 s timeout succeeds; with tokens 1.5 s apart
    the call is given up 0.5 s after the first (not when the 4.5 s answer would end).
    """
    llm = agent(provider, timeout_s=0.5, max_retries=0)
    provider.configure(token_interval_s=0.05, completion_tokens=30)
    [slow], live, _ = await run_live(llm, [spec("slow")])
    assert slow.success and live.text["slow"] == slow.output
    provider.configure(token_interval_s=1.5, completion_tokens=3)
    llm = agent(provider, timeout_s=0.5, max_retries=0)
    started = time.monotonic()
    [stalled], live, _ = await run_live(llm, [spec("stalled")])
    waited = time.monotonic() - started
    assert stalled.error == "unavailable" and "no answer within 0.5 s" in stalled.output
    assert live.text["stalled"].startswith("answ")  # its first token had arrived
    assert 0.5 <= waited < 1.5 + 0.5  # before the second token would have reset the wait


async def test_a_streamed_answer_is_read_without_a_timer_per_chunk(provider: Provider) -> None:
    """Reading 200 chunks arriving 5 ms apart schedules a few timers on the loop, not one a read."""
    from fleet import AgentContext

    provider.configure(token_interval_s=0.005, completion_tokens=200)
    llm, one = agent(provider, max_tokens=400), spec("timers")
    await llm(one, AgentContext(spec=one))  # the connection is open: only the call is counted
    loop = asyncio.get_running_loop()
    call_at, scheduled = loop.call_at, []

    def counting(when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        scheduled.append(callback)
        return call_at(when, callback, *args, context=context)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        result = await llm(one, AgentContext(spec=one))
    finally:
        del loop.call_at
        await llm.aclose()
    assert result.usage.completion_tokens == 200
    assert len(scheduled) < 20


async def test_cancel_mid_stream_closes_the_request_within_2_s(provider: Provider) -> None:
    """Cancelling the workflow while an answer streams closes the HTTP stream within 2 s."""
    provider.configure(token_interval_s=0.05, completion_tokens=1000)
    llm = agent(provider, max_tokens=2000)
    flow = Workflow.builder(LocalExecutor(agents={"llm": llm.definition("llm")})).build()
    events = flow.subscribe(deltas=True, capacity=100_000)
    running = asyncio.create_task(flow.parallel([spec("long")]))
    async for event in events:
        if isinstance(event, StepDelta):
            break
    cancelled_at = time.monotonic()
    await flow.cancel("stop")
    [outcome] = await running
    await until(lambda: provider.stats(log=False)["client_closed"] >= 1, 5.0, "the hang-up")
    closed_after = time.monotonic() - cancelled_at
    await flow.close()
    assert outcome.error == "cancelled"
    assert provider.stats(log=False)["client_closed"] == 1
    assert closed_after <= 2.0


def test_a_stream_is_put_back_together_skipping_what_it_cannot_read() -> None:
    """Text, tool-call parts by index, finish reason and usage; odd chunks lose only themselves."""
    from fleet.agents.openai.wire import ChatCompletion, StreamedCompletion

    pieces: list[tuple[str, bool]] = []
    stream = StreamedCompletion(lambda text, first: pieces.append((text, first)))
    call = {"index": 0, "id": "c1", "function": {"name": "add", "arguments": '{"a": '}}
    for chunk in [
        "not an object",
        {"choices": "not a list"},
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Let me "}}]},
        {"choices": [{"delta": {"content": [{"type": "text", "text": "add."}]}}]},
        {"choices": [{"delta": {"tool_calls": [call]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}},
    ]:
        stream.feed(chunk)
    completion = ChatCompletion.parse(stream.body())
    assert pieces == [("Let me ", True), ("add.", False)]
    assert completion.first is not None and completion.first.message is not None
    assert completion.first.message.text == "Let me add."
    assert completion.first.finish_reason == "tool_calls"
    [tool] = completion.first.message.tool_calls
    assert (tool.id, tool.function.name, tool.function.arguments) == ("c1", "add", '{"a": 1}')
    assert completion.usage is not None and completion.usage.total_tokens == 12
    assert stream.error is None
    stream.feed({"error": {"message": "overloaded"}})
    assert stream.error == {"message": "overloaded"}
