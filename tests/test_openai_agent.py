"""The OpenAI-compatible agent against a real chat-completions server on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import fleet
from fleet import AgentStepSpec, FleetError, LocalExecutor, StepOutcome
from fleet.agents import AgentContext, OpenAIAgent, OpenAIAgentConfig
from fleet.agents.openai import definition_from_config
from fleet.budget import WorkflowBudget
from fleet.errors import ConfigError
from fleet.redis_server import free_port
from fleet.step import run_agent

from .fake_openai import FakeOpenAI, Reply, error, reply, tool_call

KEY_ENV = "FLEET_TEST_OPENAI_KEY"
SECRET = "sk-test-0123456789abcdefSECRET"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
}


# -- tools the model may call (importable as tests.test_openai_agent:NAME) -----------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def lookup(query: str, limit: int = 2) -> list[str]:
    """Look a word up (async)."""
    await asyncio.sleep(0)
    return [f"{query}-{i}" for i in range(limit)]


class Place(BaseModel):
    city: str
    country: str = "NL"


def weather(place: Place) -> dict[str, str]:
    """Weather for a place (arguments as one pydantic model)."""
    return {"city": place.city, "country": place.country, "sky": "grey"}


def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"tool broke: {reason}")


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def make_agent(base_url: str, **options: Any) -> OpenAIAgent:
    options.setdefault("model", "test-model")
    options.setdefault("backoff_s", 0.01)
    return OpenAIAgent(OpenAIAgentConfig(base_url=base_url, **options), name="llm")


def make_spec(prompt: str = "Say hello.", **fields: Any) -> AgentStepSpec:
    return AgentStepSpec(task_id="t1", agent="llm", description="test", prompt=prompt, **fields)


async def run(
    agent: OpenAIAgent, spec: AgentStepSpec, *, held: int | None = None
) -> tuple[StepOutcome, AgentContext]:
    """Run one step through the shared host step body (timeout, error mapping)."""
    started = time.monotonic()
    deadline = None if spec.timeout_s is None else started + spec.timeout_s
    ctx = AgentContext(spec=spec, held_tokens=held, deadline=deadline)
    outcome = await run_agent(agent.definition("llm"), spec, ctx, started=started)
    return outcome, ctx


# -- answers and tools ---------------------------------------------------------------


async def test_plain_answer(server: FakeOpenAI) -> None:
    """A plain answer becomes the output; the request carries model, prompt and limits."""
    server.script(reply("Hello there!", prompt_tokens=12, completion_tokens=3))
    agent = make_agent(server.base_url, system="Be brief.", temperature=0.3, max_tokens=64)
    outcome, ctx = await run(agent, make_spec())

    assert outcome.success, outcome.output
    assert outcome.output == "Hello there!"
    assert outcome.usage.model_dump() == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
    }
    assert ctx.used.total_tokens == 15
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "test-model"
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ]
    assert request.body["max_tokens"] == 64
    assert request.body["temperature"] == 0.3
    assert "tools" not in request.body and "response_format" not in request.body
    assert "authorization" not in {name.lower() for name in request.headers}


async def test_tool_round_trip(server: FakeOpenAI) -> None:
    """Requested tools run (sync, async, pydantic-model arguments) and their results go back."""
    server.script(
        reply(
            None,
            tool_calls=[
                tool_call("add", {"a": 2, "b": 3}, call_id="c1"),
                tool_call("lookup", {"query": "fleet"}, call_id="c2"),
                tool_call("weather", {"city": "Delft"}, call_id="c3"),
            ],
            prompt_tokens=40,
            completion_tokens=20,
        ),
        reply("2 + 3 = 5, and Delft is grey.", prompt_tokens=90, completion_tokens=10),
    )
    tools = [f"tests.test_openai_agent:{name}" for name in ("add", "lookup", "weather")]
    agent = make_agent(server.base_url, tools=tools)
    outcome, ctx = await run(agent, make_spec("What is 2 + 3?"))

    assert outcome.success, outcome.output
    assert outcome.output == "2 + 3 = 5, and Delft is grey."
    assert ctx.used.total_tokens == 160
    first, second = server.requests
    offered = {tool["function"]["name"]: tool["function"] for tool in first.body["tools"]}
    assert set(offered) == {"add", "lookup", "weather"}
    assert offered["add"]["description"] == "Add two integers."
    assert offered["add"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert offered["add"]["parameters"]["required"] == ["a", "b"]
    assert offered["weather"]["parameters"]["required"] == ["city"]
    messages = second.body["messages"]
    assert messages[-4]["role"] == "assistant"
    assert [call["id"] for call in messages[-4]["tool_calls"]] == ["c1", "c2", "c3"]
    results = {m["tool_call_id"]: m["content"] for m in messages[-3:]}
    assert results["c1"] == "5"
    assert json.loads(results["c2"]) == ["fleet-0", "fleet-1"]
    assert json.loads(results["c3"]) == {"city": "Delft", "country": "NL", "sky": "grey"}


async def test_tool_problems_go_back_to_the_model(server: FakeOpenAI) -> None:
    """An unknown tool, bad arguments or a raising tool become the tool result, not a crash."""
    server.script(
        reply(
            None,
            tool_calls=[
                tool_call("nope", {}, call_id="c1"),
                tool_call("add", {"a": "two", "b": 3}, call_id="c2"),
                tool_call("add", "{not json", call_id="c3"),
                tool_call("explode", {"reason": "disk"}, call_id="c4"),
            ],
        ),
        reply("I could not compute it."),
    )
    tools = ["tests.test_openai_agent:add", "tests.test_openai_agent:explode"]
    outcome, _ = await run(make_agent(server.base_url, tools=tools), make_spec())

    assert outcome.success, outcome.output
    results = {
        m["tool_call_id"]: m["content"]
        for m in server.requests[1].body["messages"]
        if m["role"] == "tool"
    }
    assert "no tool named 'nope'" in results["c1"] and "add, explode" in results["c1"]
    assert results["c2"].startswith("error: invalid arguments for 'add'")
    assert "not a JSON object" in results["c3"]
    assert "RuntimeError: tool broke: disk" in results["c4"]


async def test_tool_with_parameters_from_config(server: FakeOpenAI) -> None:
    """A tool's JSON Schema given in config is sent as is and checked before the call."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    server.script(
        reply(None, tool_calls=[tool_call("sum", {"a": 1}, call_id="c1")]),
        reply(None, tool_calls=[tool_call("sum", {"a": 1, "b": 1}, call_id="c2")]),
        reply("2"),
    )
    tool = {
        "target": "tests.test_openai_agent:add",
        "name": "sum",
        "description": "Sum",
        "parameters": schema,
    }
    outcome, _ = await run(make_agent(server.base_url, tools=[tool]), make_spec())

    assert outcome.success, outcome.output
    assert server.requests[0].body["tools"] == [
        {
            "type": "function",
            "function": {"name": "sum", "description": "Sum", "parameters": schema},
        }
    ]
    assert "'b' is a required property" in server.requests[1].body["messages"][-1]["content"]
    assert server.requests[2].body["messages"][-1]["content"] == "2"


async def test_max_steps_exhausted(server: FakeOpenAI) -> None:
    """A model that keeps calling tools past max_steps fails the step, usage still charged."""
    call = reply(
        None, tool_calls=[tool_call("add", {"a": 1, "b": 1})], prompt_tokens=30, completion_tokens=5
    )
    server.script(call, call, call)
    agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"])
    outcome, ctx = await run(agent, make_spec(max_steps=1))

    assert not outcome.success
    assert outcome.error == "max_steps"
    assert "tool round 2" in outcome.output and "max_steps allows 1" in outcome.output
    assert len(server.requests) == 2
    assert outcome.usage.total_tokens == ctx.used.total_tokens == 70


async def test_max_steps_zero_offers_no_tools(server: FakeOpenAI) -> None:
    """With max_steps=0 the model is not offered tools at all."""
    server.script(reply("direct answer"))
    agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"])
    outcome, _ = await run(agent, make_spec(max_steps=0))

    assert outcome.success and outcome.output == "direct answer"
    assert "tools" not in server.requests[0].body


# -- structured output ---------------------------------------------------------------


async def test_schema_valid(server: FakeOpenAI) -> None:
    """A valid JSON answer lands in structured; the schema is asked for twice over."""
    server.script(reply('```json\n{"answer": 4}\n```'))
    outcome, _ = await run(make_agent(server.base_url), make_spec("2+2?", output_schema=SCHEMA))

    assert outcome.success, outcome.output
    assert outcome.structured == {"answer": 4}
    assert json.loads(outcome.output) == {"answer": 4}
    body = server.requests[0].body
    assert "FINAL OUTPUT CONTRACT" in body["messages"][-1]["content"]
    assert '"answer"' in body["messages"][-1]["content"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


async def test_schema_repaired(server: FakeOpenAI) -> None:
    """An invalid answer gets one repair call; its valid answer is used and its usage added."""
    server.script(
        reply("The answer is four.", prompt_tokens=20, completion_tokens=6),
        reply('{"answer": 4}', prompt_tokens=40, completion_tokens=4),
    )
    outcome, _ = await run(make_agent(server.base_url), make_spec("2+2?", output_schema=SCHEMA))

    assert outcome.success, outcome.output
    assert outcome.structured == {"answer": 4}
    assert outcome.usage.total_tokens == 70
    repair = server.requests[1].body["messages"]
    assert repair[-2] == {"role": "assistant", "content": "The answer is four."}
    assert "output is not JSON" in repair[-1]["content"]


async def test_schema_failed(server: FakeOpenAI) -> None:
    """Still invalid after the repair call: error 'schema' with the validation message."""
    server.script(
        reply("four", prompt_tokens=20, completion_tokens=1),
        reply('{"answer": "four"}', prompt_tokens=30, completion_tokens=5),
        reply("never used"),
    )
    outcome, ctx = await run(make_agent(server.base_url), make_spec("2+2?", output_schema=SCHEMA))

    assert not outcome.success
    assert outcome.error == "schema"
    assert outcome.structured is None
    assert "at answer: 'four' is not of type 'integer'" in outcome.output
    assert "repair" in outcome.output
    assert len(server.requests) == 2
    assert outcome.usage.total_tokens == ctx.used.total_tokens == 56


async def test_response_format_rejected_falls_back_to_prompt() -> None:
    """A server that rejects response_format with 400 is asked again without it."""
    with FakeOpenAI(reject_response_format=True) as server:
        server.script(reply('{"answer": 4}'))
        agent = make_agent(server.base_url)
        outcome, _ = await run(agent, make_spec("2+2?", output_schema=SCHEMA))

    assert outcome.success, outcome.output
    assert outcome.structured == {"answer": 4}
    first, second = server.requests
    assert "response_format" in first.body and "response_format" not in second.body
    assert "FINAL OUTPUT CONTRACT" in second.body["messages"][-1]["content"]


# -- budget --------------------------------------------------------------------------


async def test_usage_charged_exactly_to_the_workflow_budget(server: FakeOpenAI) -> None:
    """Every call's reported usage reaches the budget, also for a step that fails."""
    server.script(
        reply(
            None,
            tool_calls=[tool_call("add", {"a": 1, "b": 2})],
            prompt_tokens=100,
            completion_tokens=20,
        ),
        reply("3", prompt_tokens=150, completion_tokens=30),
        reply("not json", prompt_tokens=11, completion_tokens=2),
        reply("still not json", prompt_tokens=13, completion_tokens=4),
    )
    # "test-model" has no price: allowed explicitly (tests/test_money.py covers money)
    agent = make_agent(
        server.base_url, tools=["tests.test_openai_agent:add"], unknown_price="allow"
    )
    budget = WorkflowBudget(10_000)
    executor = LocalExecutor(agents={"llm": agent.definition("llm")}, budget=budget)

    ok = await executor.execute_step(make_spec(max_tokens=2000))
    bad = await executor.execute_step(
        make_spec(max_tokens=2000, output_schema=SCHEMA).model_copy(update={"task_id": "t2"})
    )

    assert ok.success and ok.usage.total_tokens == 300
    assert not bad.success and bad.error == "schema" and bad.usage.total_tokens == 30
    snapshot = await budget.snapshot()
    assert snapshot.consumed_tokens == 330
    assert snapshot.reserved_tokens == 0
    assert snapshot.remaining_tokens == 10_000 - 330


async def test_default_reservation_is_max_tokens_plus_prompt(server: FakeOpenAI) -> None:
    """Without spec.max_tokens a step reserves max_tokens + the prompt estimate; calls are capped."""
    agent = make_agent(server.base_url, max_tokens=300)
    spec = make_spec("x" * 400)
    definition = agent.definition("llm")
    estimate = agent.prompt_estimate(agent.first_messages(spec), tools=True)
    assert estimate >= 100
    assert definition.reservation_for(spec, 1) == 300 + estimate
    assert definition.reservation_for(make_spec(max_tokens=77), 1) == 77
    fixed = make_agent(server.base_url, max_tokens=300, reserve_tokens=900).definition("llm")
    assert fixed.reservation_for(spec, 1) == 900

    server.script(reply("ok"), reply("ok"))
    await run(agent, spec, held=300 + estimate)
    await run(agent, spec, held=estimate + 50)
    assert server.requests[0].body["max_tokens"] == 300
    assert server.requests[1].body["max_tokens"] == 50


async def test_budget_refused_before_the_call(server: FakeOpenAI) -> None:
    """A hold too small for the prompt fails as budget_exhausted and sends nothing."""
    server.script(reply("never sent"))
    budget = WorkflowBudget(10_000)
    executor = LocalExecutor(
        agents={"llm": make_agent(server.base_url).definition("llm")}, budget=budget
    )
    outcome = await executor.execute_step(make_spec("word " * 200, max_tokens=20))

    assert not outcome.success
    assert outcome.error == "budget_exhausted"
    assert "t1" in outcome.output and "max_tokens" in outcome.output
    assert server.requests == []
    assert (await budget.snapshot()).consumed_tokens == 0


async def test_budget_refuses_the_next_call_after_spending(server: FakeOpenAI) -> None:
    """Once a call spent the hold, the next call is refused; the spent tokens stay charged."""
    server.script(
        reply(
            None,
            tool_calls=[tool_call("add", {"a": 1, "b": 1})],
            prompt_tokens=180,
            completion_tokens=20,
        ),
        reply("never sent"),
    )
    agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"], max_tokens=50)
    outcome, ctx = await run(agent, make_spec(), held=200)

    assert outcome.error == "budget_exhausted"
    assert len(server.requests) == 1
    assert outcome.usage.total_tokens == ctx.used.total_tokens == 200


# -- failures and retries ------------------------------------------------------------


async def test_429_then_success_honours_retry_after(
    server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 is retried after the server's Retry-After, then the answer is used."""
    server.script(error(429, "slow down", headers={"Retry-After": "1"}), reply("done"))
    with caplog.at_level(logging.WARNING, logger="fleet.agents.openai"):
        outcome, _ = await run(make_agent(server.base_url, backoff_s=0.0), make_spec())

    assert outcome.success and outcome.output == "done"
    first, second = server.requests
    assert second.at - first.at >= 1.0
    assert "HTTP 429: slow down; retrying in 1.00 s (attempt 2 of 5)" in caplog.text


async def test_5xx_and_dropped_connections_are_retried(server: FakeOpenAI) -> None:
    """503s and a dropped connection are retried with backoff until an answer comes."""
    server.script(error(503, "overloaded"), Reply(drop=True), error(500, "oops"), reply("fine"))
    outcome, _ = await run(make_agent(server.base_url), make_spec())

    assert outcome.success and outcome.output == "fine"
    assert len(server.requests) == 4


async def test_each_call_of_a_step_gets_its_own_retries(server: FakeOpenAI) -> None:
    """Retries restart per call: a tool round and the final call both survive a 503."""
    server.script(
        error(503, "busy"),
        reply(None, tool_calls=[tool_call("add", {"a": 1, "b": 1})]),
        error(503, "busy"),
        reply("2"),
    )
    agent = make_agent(server.base_url, tools=["tests.test_openai_agent:add"], max_retries=1)
    outcome, _ = await run(agent, make_spec())

    assert outcome.success and outcome.output == "2"
    assert len(server.requests) == 4


async def test_retries_exhausted_is_unavailable(server: FakeOpenAI) -> None:
    """After max_retries the step fails as unavailable with the last error."""
    server.script(*[error(502, "bad gateway")] * 3, reply("never"))
    outcome, _ = await run(make_agent(server.base_url, max_retries=2), make_spec())

    assert outcome.error == "unavailable"
    assert "HTTP 502: bad gateway" in outcome.output and "3 attempt(s)" in outcome.output
    assert len(server.requests) == 3


async def test_retry_after_past_the_deadline_gives_up_at_once(server: FakeOpenAI) -> None:
    """A Retry-After longer than the step has left fails now instead of sleeping."""
    server.script(error(429, "quota", headers={"Retry-After": "30"}), reply("never"))
    outcome, _ = await run(make_agent(server.base_url), make_spec(timeout_s=5))

    assert outcome.error == "unavailable"
    assert "next try would be in 30.00 s" in outcome.output
    assert len(server.requests) == 1


async def test_401_fails_at_once_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused key fails as auth without retrying, naming the variable, not the key."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeOpenAI(api_key="the-right-key") as server:
        outcome, _ = await run(make_agent(server.base_url, api_key_env=KEY_ENV), make_spec())

    assert outcome.error == "auth"
    assert "refused the API key (HTTP 401" in outcome.output
    assert f"check the key in ${KEY_ENV}" in outcome.output
    assert "Incorrect API key provided: ***" in outcome.output
    assert SECRET not in outcome.output
    assert len(server.requests) == 1


async def test_401_without_a_key_says_none_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """With api_key_env unset in the environment, the message says no key was sent."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAI(api_key="the-right-key") as server:
        outcome, _ = await run(make_agent(server.base_url, api_key_env=KEY_ENV), make_spec())

    assert outcome.error == "auth"
    assert f"${KEY_ENV} is not set, so no key was sent" in outcome.output
    assert "authorization" not in {name.lower() for name in server.requests[0].headers}


async def test_404_unknown_model() -> None:
    """An unknown model fails as provider, naming the model."""
    with FakeOpenAI(models={"real-model"}) as server:
        outcome, _ = await run(make_agent(server.base_url, model="no-such-model"), make_spec())

    assert outcome.error == "provider"
    assert "404 for model 'no-such-model'" in outcome.output
    assert "does not exist" in outcome.output
    assert len(server.requests) == 1


async def test_other_4xx_is_provider(server: FakeOpenAI) -> None:
    """A 400 the agent cannot work around fails as provider with the server's message."""
    server.script(error(400, "context length exceeded"))
    outcome, _ = await run(make_agent(server.base_url), make_spec())

    assert outcome.error == "provider"
    assert "HTTP 400: context length exceeded" in outcome.output


async def test_unreachable_server_is_unavailable() -> None:
    """Nobody listening: retried, then unavailable naming the server."""
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    outcome, _ = await run(make_agent(base_url, max_retries=1), make_spec())

    assert outcome.error == "unavailable"
    assert base_url in outcome.output and "ConnectError" in outcome.output


async def test_request_timeout_is_retried_then_unavailable(server: FakeOpenAI) -> None:
    """A request slower than timeout_s is abandoned and retried; still slow → unavailable."""
    server.script(reply("late", delay_s=5), reply("late", delay_s=5))
    agent = make_agent(server.base_url, timeout_s=0.2, max_retries=1)
    outcome, _ = await run(agent, make_spec())

    assert outcome.error == "unavailable"
    assert "no answer within 0.2 s" in outcome.output
    assert await asyncio.to_thread(server.wait_for, lambda s: s.disconnects == 2)


async def test_step_timeout_aborts_the_request(server: FakeOpenAI) -> None:
    """The step's timeout_s ends the step as timeout and the server sees the client go."""
    server.script(reply("late", delay_s=10))
    outcome, _ = await run(make_agent(server.base_url), make_spec(timeout_s=0.3))

    assert outcome.error == "timeout"
    assert await asyncio.to_thread(server.wait_for, lambda s: s.disconnects == 1)


async def test_cancellation_aborts_the_request(server: FakeOpenAI) -> None:
    """Cancelling the caller mid-request drops the HTTP connection."""
    server.script(reply("late", delay_s=10))
    executor = LocalExecutor(agents={"llm": make_agent(server.base_url).definition("llm")})
    task = asyncio.create_task(executor.execute_step(make_spec()))
    assert await asyncio.to_thread(server.wait_for, lambda s: len(s.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(server.wait_for, lambda s: s.disconnects == 1)


# -- the API key ---------------------------------------------------------------------


async def test_key_never_leaks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key is sent, but never appears in outcomes, events, logs or reprs, even echoed."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    events: list[Any] = []
    with FakeOpenAI(api_key=SECRET) as server, caplog.at_level(logging.DEBUG):
        server.script(
            reply(f"Your key is {SECRET}."),
            error(500, f"internal error for key {SECRET}"),
            reply(f'{{"answer": 1, "note": "{SECRET}"}}'),
            error(400, f"bad request from {SECRET}"),
        )
        agent = make_agent(server.base_url, api_key_env=KEY_ENV)
        executor = LocalExecutor(agents={"llm": agent.definition("llm")})
        outcomes = [
            await executor.execute_step(make_spec(), events=events.append),
            await executor.execute_step(
                make_spec(output_schema={"type": "object"}), events=events.append
            ),
            await executor.execute_step(make_spec(), events=events.append),
        ]
    with FakeOpenAI(api_key="another-key") as refusing:
        other = make_agent(refusing.base_url, api_key_env=KEY_ENV)
        outcomes.append(await LocalExecutor(agents={"llm": other}).execute_step(make_spec()))

    assert all(r.headers["Authorization"] == f"Bearer {SECRET}" for r in server.requests)
    assert [o.error for o in outcomes] == [None, None, "provider", "auth"]
    assert outcomes[0].output == "Your key is ***."
    assert outcomes[1].structured == {"answer": 1, "note": "***"}
    assert "internal error for key ***" in caplog.text
    seen = [o.to_json() for o in outcomes] + [e.to_json() for e in events]
    seen += [caplog.text, repr(agent), repr(agent.definition("llm")), repr(executor)]
    assert events and caplog.records
    for text in seen:
        assert SECRET not in text


# -- the agents file -----------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(text, encoding="utf-8")
    return path


async def test_agents_file_loads_and_runs(server: FakeOpenAI, tmp_path: Path) -> None:
    """An agents file declares python and openai agents (with tools) that a host runs."""
    path = write(
        tmp_path,
        f"""
[agents.local]
kind = "python"
target = "tests.agents:slow_echo"

[agents.llm]
kind = "openai"
base_url = "{server.base_url}"
model = "m1"
system = "sys"
max_tokens = 99
reserve_tokens = 500
api_key_env = "{KEY_ENV}"
tools = [
    "tests.test_openai_agent:add",
    {{ target = "tests.test_openai_agent:lookup", name = "search" }},
]
""",
    )
    agents = fleet.load_agents(path)
    assert {name: d.kind for name, d in agents.items()} == {"local": "python", "llm": "openai"}
    assert agents["llm"].reservation_for(make_spec(), 1) == 500

    server.script(
        reply(None, tool_calls=[tool_call("search", {"query": "q", "limit": 1})]), reply("found")
    )
    outcome = await LocalExecutor(agents=agents).execute_step(make_spec())
    assert outcome.success and outcome.output == "found"
    body = server.requests[0].body
    assert body["model"] == "m1" and body["max_tokens"] == 99
    assert {t["function"]["name"] for t in body["tools"]} == {"add", "search"}
    assert server.requests[1].body["messages"][-1]["content"] == '["q-0"]'


def test_shipped_agents_file_loads() -> None:
    """config/agents.toml is a valid example with both kinds."""
    agents = fleet.load_agents(Path(__file__).parent.parent / "config" / "agents.toml")
    kinds = {d.kind for d in agents.values()}
    assert kinds == {"python", "openai"}


def test_missing_agents_file_names_the_path(tmp_path: Path) -> None:
    """A missing agents file is a FleetError naming the path."""
    missing = tmp_path / "nope" / "agents.toml"
    with pytest.raises(FleetError, match="nope/agents.toml"):
        fleet.load_agents(missing)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('base_url = "http://x/v1"', "model"),
        ('base_url = "http://x/v1"\nmodel = "m"\nmax_token = 5', "max_token"),
        ('base_url = "http://x/v1"\nmodel = "m"\nmax_tokens = "many"', "max_tokens"),
        ('base_url = "http://x/v1"\nmodel = "m"\ntools = ["tests.nowhere:f"]', "tests.nowhere"),
        ('base_url = "http://x/v1"\nmodel = "m"\ntools = ["tests.test_openai_agent:nope"]', "nope"),
    ],
)
def test_bad_openai_tables_name_the_key(tmp_path: Path, body: str, expected: str) -> None:
    """A bad [agents.NAME] table fails at load with the file and the key named."""
    path = write(tmp_path, f'[agents.llm]\nkind = "openai"\n{body}\n')
    with pytest.raises(ConfigError) as caught:
        fleet.load_agents(path)
    assert str(path) in str(caught.value) and "agents.llm" in str(caught.value)
    assert expected in str(caught.value)


def test_api_key_in_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """A key written into the agents file is refused and not repeated in the message."""
    table = {"kind": "openai", "base_url": "http://x/v1", "model": "m", "api_key": SECRET}
    with pytest.raises(ConfigError, match="api_key_env") as caught:
        definition_from_config("llm", table, source="agents.toml")
    assert SECRET not in str(caught.value)


def test_constructor_is_simple_and_exported() -> None:
    """OpenAIAgent(OpenAIAgentConfig(base_url=..., model=...)) works from fleet.agents."""
    agent = fleet.agents.OpenAIAgent(
        fleet.agents.OpenAIAgentConfig(base_url="http://127.0.0.1:9/v1/", model="m")
    )
    assert agent.endpoint == "http://127.0.0.1:9/v1/chat/completions"
    with pytest.raises(ConfigError, match="max_tokens"):
        OpenAIAgentConfig(base_url="http://x/v1", model="m", max_tokens=0)


async def test_a_post_reports_once_when_its_body_is_written(server: FakeOpenAI) -> None:
    """``on_sent`` (what a provider limit's window is corrected by) fires once per request."""
    from fleet.agents.openai.connections import Connections
    from fleet.agents.openai.transport import tls_context

    server.script(reply("hello"))
    pool, sent = Connections(ssl_context=tls_context()), []
    before = time.monotonic()
    try:
        answer = await pool.post_json(
            f"{server.base_url}/chat/completions",
            {"model": "test-model", "messages": []},
            headers={"Authorization": "Bearer k"},
            timeout_s=10,
            on_sent=sent.append,
        )
    finally:
        await pool.aclose()
    assert answer.status == 200 and json.loads(answer.text)["choices"]
    (request,) = server.requests
    assert len(sent) == 1 and before <= sent[0] <= request.at  # written, then received
    assert {k.lower(): v for k, v in request.headers.items()}["authorization"] == "Bearer k"
