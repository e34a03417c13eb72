"""pydantic-ai agents as fleet steps (kind "pydantic_ai"): budget, limits, cancel, outcomes.

The agents are real ``pydantic_ai.Agent`` objects (``tests/pydantic_ai_agents.py``) whose
OpenAI-compatible model talks to a real HTTP server on loopback: ``tests/fake_openai.py``
(scripted replies, request and hang-up records) or ``bench/provider.py`` (usage in every
answer, its own rate limits). Fleet tests start real Celery worker processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent, PromptedOutput
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from bench.provider import Provider, ProviderProcess
from bench.rate_limits import served, window_peaks
from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget, execute_steps_parallel, load_agents
from fleet.agents.pydantic_ai import PydanticAIAgent
from fleet.cancel import Cancellation, use_cancellation
from fleet.celery import CeleryExecutor
from fleet.deltas import LiveText
from fleet.errors import ConfigError
from fleet.events import StepDelta
from fleet.ledgers import RedisLedger
from fleet.workflow import Workflow
from tests import pydantic_ai_agents
from tests.celery_support import fleet_settings, running_workers
from tests.fake_openai import AutoModel, FakeOpenAI, error, reply, tool_call

REPO = Path(__file__).resolve().parent.parent
AGENTS = "tests.pydantic_ai_agents"


def _agents_file(tmp_path: Path, *names: str, limit: str = "") -> Path:
    """An agents file with the named test agents (kind pydantic_ai) and an optional limit."""
    tables = [
        f'[agents.{name}]\nkind = "pydantic_ai"\ntarget = "{AGENTS}:{name}"\n' for name in names
    ]
    if limit:
        tables = [table + 'limit = "provider"\n' for table in tables]
    path = tmp_path / "agents.toml"
    path.write_text(
        'unknown_price = "allow"\n\n' + limit + "\n" + "\n".join(tables), encoding="utf-8"
    )
    return path


def _spec(task_id: str, agent: str = "writer", **fields: Any) -> AgentStepSpec:
    fields.setdefault("prompt", f"write about {task_id}")
    return AgentStepSpec(task_id=task_id, agent=agent, description="d", **fields)


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close the test agents' HTTP clients in the test's own event loop."""
    yield
    while pydantic_ai_agents.CLIENTS:
        await pydantic_ai_agents.CLIENTS.pop().close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """A scripted loopback server the test agents talk to."""
    with FakeOpenAI() as fake:
        monkeypatch.setenv("PA_TEST_BASE_URL", fake.base_url)
        yield fake


def _modules_after(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- the extra ----------------------------------------------------------------------


def test_import_fleet_imports_nothing_of_pydantic_ai(tmp_path: Path) -> None:
    """`import fleet` and an agents file without the kind load no pydantic_ai module."""
    path = tmp_path / "agents.toml"
    path.write_text('[agents.p]\nkind = "python"\ntarget = "fleet.agents:echo"\n', encoding="utf-8")
    out = _modules_after(
        f"""
        import sys
        import fleet
        fleet.load_agents({str(path)!r})
        print(sorted(m for m in sys.modules if m.split(".")[0] == "pydantic_ai" or "pydantic_ai" in m))
        """
    )
    assert out.strip() == "[]"


def test_the_kind_without_the_extra_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """pydantic_ai not importable: loading the kind fails one line, naming the extra."""
    path = _agents_file(tmp_path, "writer")
    out = _modules_after(
        f"""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pydantic_ai":
                    raise ImportError(f"No module named {{name!r}}")
                return None

        sys.meta_path.insert(0, Blocker())
        import fleet
        from fleet.errors import ConfigError
        try:
            fleet.load_agents({str(path)!r})
        except ConfigError as error:
            print(type(error).__name__, error.key, str(error))
        """
    )
    assert out.startswith("ConfigError agents.writer.kind ")
    assert "pip install 'fleet[pydantic-ai]'" in out and "[agents.writer]" in out
    assert len(out.strip().splitlines()) == 1


def test_a_target_that_is_not_an_agent_is_a_config_error(tmp_path: Path) -> None:
    """A target that is not a pydantic_ai.Agent fails at load, naming the table."""
    path = tmp_path / "agents.toml"
    path.write_text(
        '[agents.x]\nkind = "pydantic_ai"\ntarget = "tests.pydantic_ai_agents:lookup"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"\[agents.x\].*is not a pydantic_ai.Agent"):
        load_agents(path)
    path.write_text('[agents.x]\nkind = "pydantic_ai"\ntarget = "t:a"\nmodel = "m"\n')
    with pytest.raises(ConfigError, match=r"\[agents.x\] \(kind 'pydantic_ai'\) is invalid"):
        load_agents(path)


def test_an_api_key_in_the_table_says_where_the_key_goes(tmp_path: Path) -> None:
    """A key written into a pydantic_ai table is refused, naming where keys go, not its value."""
    path = tmp_path / "agents.toml"
    target = 'target = "tests.pydantic_ai_agents:writer"'
    for line in ('api_key = "sk-hunter2"', 'api_key_env = "MY_KEY"'):
        path.write_text(f'[agents.x]\nkind = "pydantic_ai"\n{target}\n{line}\n')
        with pytest.raises(ConfigError, match=r"takes no API key.*OPENAI_API_KEY") as caught:
            load_agents(path)
        assert "hunter2" not in str(caught.value)


# -- the budget -----------------------------------------------------------------------


@pytest.fixture(params=["local", "celery"])
def host_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_fan_out_under_a_token_budget_charges_exactly_what_the_provider_reported(
    host_kind: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """8 steps, each a pydantic-ai run: consumed == the provider's usage, nothing reserved."""
    with ProviderProcess(latency_s=0.05, completion_tokens=12) as provider:
        agents = _agents_file(tmp_path, "writer")
        specs = [_spec(f"s{i}", max_tokens=300) for i in range(8)]
        if host_kind == "local":
            env = {"PA_TEST_BASE_URL": provider.base_url}
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                budget = WorkflowBudget(10_000)
                host = LocalExecutor(agents=load_agents(agents), budget=budget)
                outcomes = await execute_steps_parallel(host, specs)
                snapshot = await budget.snapshot()
        else:
            settings = fleet_settings(redis_url, agents_file=agents)
            ledger = RedisLedger(redis_url, key_prefix=settings.key_prefix)
            budget = WorkflowBudget(10_000, ledger=ledger, workflow_id=f"{key_prefix}-wf")
            env = {"PA_TEST_BASE_URL": provider.base_url}
            with running_workers(settings, tmp_path, "w1", "w2", concurrency=4, env=env):
                host = CeleryExecutor(settings=settings, budget=budget)
                try:
                    outcomes = await execute_steps_parallel(host, specs)
                finally:
                    await host.aclose()
            snapshot = await budget.snapshot()
            await ledger.close()
        log = provider.stats()["log"]
    assert [o.error for o in outcomes] == [None] * 8, [o.output for o in outcomes]
    assert all(o.output == "ok" or o.output for o in outcomes)
    reported = sum(tokens for _, tokens in served(log))
    assert len(served(log)) == 8
    assert snapshot.consumed_tokens == reported == sum(o.usage.total_tokens for o in outcomes)
    assert snapshot.reserved_tokens == 0
    if host_kind == "celery":
        assert all(o.worker.startswith("w") for o in outcomes)


async def test_a_budget_that_fits_some_steps_refuses_the_rest_before_any_request(
    server: FakeOpenAI,
) -> None:
    """Each step holds 120 and spends 50 of a 300 budget: 4 run, 4 never reach the server."""
    server.script(*[reply("ok", prompt_tokens=30, completion_tokens=20) for _ in range(4)])
    budget = WorkflowBudget(300)
    agents = {"writer": PydanticAIAgent(pydantic_ai_agents.writer, unknown_price="allow")}
    host = LocalExecutor(agents=agents, budget=budget, max_concurrency=1)
    outcomes = await execute_steps_parallel(
        host, [_spec(f"s{i}", max_tokens=120) for i in range(8)]
    )
    snapshot = await budget.snapshot()

    assert [o.success for o in outcomes] == [True] * 4 + [False] * 4
    assert {o.error for o in outcomes[4:]} == {"budget_exhausted"}
    assert len(server.requests) == 4
    assert all(0 < r.body["max_completion_tokens"] <= 120 for r in server.requests)
    assert snapshot.consumed_tokens == 200 and snapshot.reserved_tokens == 0


async def test_each_request_is_capped_to_the_dollars_left(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    """$0.001 a token, $0.10 left: the request asks for at most what the dollars cover."""
    path = _agents_file(tmp_path, "writer")
    text = path.read_text().replace('unknown_price = "allow"', "")
    path.write_text(
        text + '\n[prices."m"]\ninput_per_mtok = 1000.0\noutput_per_mtok = 1000.0\n',
        encoding="utf-8",
    )
    server.script(reply("ok", prompt_tokens=20, completion_tokens=30))
    budget = WorkflowBudget(limit_usd="0.10")
    host = LocalExecutor(agents=load_agents(path), budget=budget)
    outcome = await host.execute_step(_spec("d", max_tokens=10_000))
    snapshot = await budget.snapshot()

    assert outcome.success, outcome.output
    asked = server.requests[0].body["max_completion_tokens"]
    assert 0 < asked < 100, asked
    assert outcome.cost_usd == Decimal("0.05")
    assert snapshot.consumed_usd == Decimal("0.05") and snapshot.reserved_usd == 0


async def test_a_request_the_step_hold_cannot_cover_is_refused_before_it_is_sent(
    server: FakeOpenAI,
) -> None:
    """A tool run whose first request spends the whole hold: the second is never sent."""
    server.script(
        reply(
            None,
            tool_calls=[tool_call("lookup", {"city": "Oslo"})],
            prompt_tokens=300,
            completion_tokens=100,
        )
    )
    budget = WorkflowBudget(1_000)
    agents = {"tooled": PydanticAIAgent(pydantic_ai_agents.tooled, unknown_price="allow")}
    outcome = await LocalExecutor(agents=agents, budget=budget).execute_step(
        _spec("t", "tooled", max_tokens=400)
    )
    snapshot = await budget.snapshot()

    assert outcome.error == "budget_exhausted", outcome.output
    assert "spent its token hold" in outcome.output
    assert len(server.requests) == 1
    assert server.requests[0].body["max_completion_tokens"] < 400
    assert outcome.usage.total_tokens == 400
    assert snapshot.consumed_tokens == 400 and snapshot.reserved_tokens == 0
    assert pydantic_ai_agents.TOOL_THREADS, "the tool ran in this process"


# -- limits ---------------------------------------------------------------------------


async def test_a_shared_limit_holds_across_two_worker_processes(
    redis_url: str, tmp_path: Path
) -> None:
    """2 workers x 8 threads of pydantic-ai steps under one [limits] table: no 429, ever."""
    window_s, requests, tokens = 3.0, 6, 100_000
    limit = f"[limits.provider]\nrequests = {requests}\ntokens = {tokens}\nwindow_s = {window_s}\n"
    with ProviderProcess(
        latency_s=0.3, completion_tokens=20, requests_per_window=requests, window_s=window_s
    ) as provider:
        agents = _agents_file(tmp_path, "capped", limit=limit)
        settings = fleet_settings(redis_url, agents_file=agents, max_in_flight=64)
        env = {"PA_TEST_BASE_URL": provider.base_url}
        with running_workers(settings, tmp_path, "w1", "w2", concurrency=8, env=env) as fleet:
            async with fleet.executor() as host:
                specs = [_spec(f"s{i}", "capped", timeout_s=60) for i in range(16)]
                outcomes = await execute_steps_parallel(host, specs)
            logs = fleet.workers["w1"].log_text() + fleet.workers["w2"].log_text()
        stats = provider.stats()
    assert [o.output for o in outcomes if not o.success] == []
    assert stats["rate_limited"] == 0 and stats["requests"] == 16
    assert window_peaks(stats["log"], window_s)[0] <= requests
    assert {o.worker.split("@")[0] for o in outcomes} == {"w1", "w2"}
    assert "admitted under limit 'provider' after waiting" in logs


# -- outcomes -------------------------------------------------------------------------


async def test_a_native_output_model_fills_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    """NativeOutput(City): asked as a JSON-schema response format; structured is the model's dump."""
    with FakeOpenAI(auto=AutoModel()) as fake:
        monkeypatch.setenv("PA_TEST_BASE_URL", fake.base_url)
        agents = {"city": PydanticAIAgent(pydantic_ai_agents.city, unknown_price="allow")}
        outcome = await LocalExecutor(agents=agents).execute_step(_spec("c", "city"))
        sent = fake.requests[0].body
    assert outcome.success, outcome.output
    assert sent["response_format"]["type"] == "json_schema"
    assert outcome.structured == {"name": "x", "population": 1}
    assert outcome.output == '{"name":"x","population":1}'
    assert outcome.usage.total_tokens > 0


@pytest.mark.parametrize(
    ("replies", "kind", "says"),
    [
        ([reply("not json"), reply("{}")], "schema", "output"),
        ([error(400, "context length exceeded")], "provider", "context length exceeded"),
        ([error(400, "key sk-test-unused is not for this model")], "provider", "key *** is not"),
        ([error(503, "overloaded")], "unavailable", "503"),
        ([error(401, "Incorrect API key provided: sk-test-unused")], "auth", "API key"),
        ([reply("late", delay_s=10)], "timeout", "timed out"),
    ],
)
async def test_pydantic_ai_errors_become_fleet_error_kinds(
    server: FakeOpenAI, replies: list[Any], kind: str, says: str
) -> None:
    """Each failure a run can end with is a failed step of fleet's matching kind."""
    server.script(*replies)
    agents = {"city": PydanticAIAgent(pydantic_ai_agents.city, unknown_price="allow")}
    outcome = await LocalExecutor(agents=agents).execute_step(_spec("e", "city", timeout_s=1.0))

    assert outcome.error == kind, outcome.output
    assert says in outcome.output
    assert "sk-test-unused" not in outcome.output
    assert len(server.requests) == len(replies)


# -- cancel ---------------------------------------------------------------------------


@pytest.fixture
async def slow_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        monkeypatch.setenv("PA_TEST_BASE_URL", fake.base_url)
        fake.script(*[reply("late", delay_s=60) for _ in range(4)])
        yield fake


async def test_a_cancel_closes_the_agents_open_requests_within_2_s(slow_server: FakeOpenAI) -> None:
    """Cancelled mid-request: every open request is closed within 2 s, nothing stays reserved."""
    budget = WorkflowBudget(100_000)
    agents = {"writer": PydanticAIAgent(pydantic_ai_agents.writer, unknown_price="allow")}
    executor = LocalExecutor(agents=agents, budget=budget)
    workflow = Workflow.builder(executor).with_budget(budget).build()
    specs = [_spec(f"s{i}", max_tokens=200) for i in range(4)]
    round_ = asyncio.create_task(workflow.parallel(specs))
    assert await asyncio.to_thread(slow_server.wait_for, lambda s: len(s.requests) == 4)
    cancelled_at = time.monotonic()
    await workflow.cancel("test says stop")
    closed = await asyncio.to_thread(slow_server.wait_for, lambda s: s.disconnects == 4, 2.0)
    closed_after = time.monotonic() - cancelled_at
    outcomes = await round_
    await workflow.finish()

    assert closed, f"{slow_server.disconnects} of 4 requests closed after {closed_after:.2f} s"
    assert closed_after <= 2.0
    assert [o.error for o in outcomes] == ["cancelled"] * 4
    assert (await budget.snapshot()).reserved_tokens == 0


async def test_output_schema_and_max_steps_reach_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """output_schema becomes the run's output type; max_steps caps its requests."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with FakeOpenAI(auto=AutoModel()) as fake:
        monkeypatch.setenv("PA_TEST_BASE_URL", fake.base_url)
        agents = {
            "writer": PydanticAIAgent(pydantic_ai_agents.writer, unknown_price="allow"),
            "tooled": PydanticAIAgent(pydantic_ai_agents.tooled, unknown_price="allow"),
        }
        host = LocalExecutor(agents=agents)
        shaped = await host.execute_step(_spec("o", output_schema=schema))
        capped = await host.execute_step(_spec("m", "tooled", max_steps=0))
        sent = [r.body for r in fake.requests]
    assert shaped.success, shaped.output
    assert shaped.structured == {"n": 1} and shaped.output == '{"n":1}'
    assert sent[0]["tools"][0]["function"]["parameters"]["required"] == ["n"]
    assert capped.error == "max_steps", capped.output
    assert len(sent) == 2, "the tool round after the first request was never asked for"


async def test_a_streaming_agent_publishes_its_text_and_is_charged_the_providers_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stream = true: requests stream, deltas join to each output, the budget is exact."""
    with Provider(latency_s=0.0, token_interval_s=0.002, completion_tokens=24) as provider:
        monkeypatch.setenv("PA_TEST_BASE_URL", provider.base_url)
        agent = PydanticAIAgent(pydantic_ai_agents.writer, unknown_price="allow", stream=True)
        budget = WorkflowBudget(100_000)
        flow = Workflow.builder(LocalExecutor(agents={"writer": agent}, budget=budget)).build()
        events = flow.subscribe(deltas=True, capacity=100_000)
        outcomes = await flow.parallel([_spec(f"s{i}", max_tokens=400) for i in range(3)])
        await flow.close()
        live = LiveText()
        deltas = [e async for e in events if isinstance(e, StepDelta)]
        for delta in deltas:
            live.fold(delta)
        log = provider.stats()["log"]
        snapshot = await budget.snapshot()
    assert all(o.success for o in outcomes), [o.output for o in outcomes]
    assert len(deltas) > 3
    assert live.text == {o.task_id: o.output for o in outcomes}
    assert all("first_token_at" in entry for entry in log), "every request streamed"
    reported = sum(entry["total_tokens"] for entry in log)
    assert snapshot.consumed_tokens == reported == sum(o.usage.total_tokens for o in outcomes)
    assert snapshot.reserved_tokens == 0


async def test_a_429_pauses_the_agents_limit(server: FakeOpenAI, tmp_path: Path) -> None:
    """A 429 with Retry-After: 1 fails its step `unavailable`; the next request waits 1 s."""
    server.script(error(429, "slow down", headers={"Retry-After": "1"}), reply("ok"))
    limit = "[limits.provider]\nrequests = 100\n"
    host = LocalExecutor(agents=load_agents(_agents_file(tmp_path, "writer", limit=limit)))
    first = await host.execute_step(_spec("a", timeout_s=10))
    second = await host.execute_step(_spec("b", timeout_s=10))

    assert first.error == "unavailable" and "429" in first.output, first.output
    assert second.success, second.output
    refused, answered = server.requests
    assert answered.at - refused.at >= 1.0 - 0.02


async def test_a_cancel_closes_the_open_requests_on_celery_workers_within_2_s(
    slow_server: FakeOpenAI, redis_url: str, tmp_path: Path
) -> None:
    """On a worker too: a cancel closes every open request of the agents within 2 s."""
    settings = fleet_settings(
        redis_url, agents_file=_agents_file(tmp_path, "writer"), claim_timeout_s=60.0
    )
    cancellation = Cancellation(("pa-cancel",))
    env = {"PA_TEST_BASE_URL": slow_server.base_url}
    with running_workers(settings, tmp_path, "w1", concurrency=4, env=env):
        async with CeleryExecutor(settings=settings) as host:
            with use_cancellation(cancellation):
                round_ = asyncio.create_task(
                    execute_steps_parallel(host, [_spec(f"s{i}") for i in range(4)])
                )
            assert await asyncio.to_thread(slow_server.wait_for, lambda s: len(s.requests) == 4)
            cancelled_at = time.monotonic()
            cancellation.cancel("test says stop")
            closed = await asyncio.to_thread(
                slow_server.wait_for, lambda s: s.disconnects == 4, 2.0
            )
            closed_after = time.monotonic() - cancelled_at
            outcomes = await asyncio.wait_for(round_, 30)

    assert closed, f"{slow_server.disconnects} of 4 requests closed after {closed_after:.2f} s"
    assert closed_after <= 2.0
    assert [o.error for o in outcomes] == ["cancelled"] * 4


async def test_a_model_that_is_not_openai_compatible_is_held_the_same_way() -> None:
    """pydantic-ai's in-process FunctionModel: its request sees the cap, its usage is charged."""
    seen: list[Any] = []

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append((info.model_settings or {}).get("max_tokens"))
        usage = RequestUsage(input_tokens=40, output_tokens=9)
        return ModelResponse(parts=[TextPart("hello")], usage=usage, model_name="local-fn")

    agent = PydanticAIAgent(Agent(FunctionModel(answer, model_name="local-fn")))
    budget = WorkflowBudget(1_000)
    host = LocalExecutor(agents={"writer": agent}, budget=budget)
    outcome = await host.execute_step(_spec("f", max_tokens=300))
    snapshot = await budget.snapshot()

    assert outcome.success and outcome.output == "hello", outcome.output
    assert len(seen) == 1 and 0 < seen[0] < 300
    assert outcome.usage.total_tokens == 49
    assert snapshot.consumed_tokens == 49 and snapshot.reserved_tokens == 0


def _cut_off(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """An answer cut off at the token limit in the middle of its JSON."""
    usage = RequestUsage(input_tokens=10, output_tokens=5)
    return ModelResponse(parts=[TextPart('{"name": "Os')], usage=usage, finish_reason="length")


@pytest.mark.parametrize(("budget", "kind"), [(1_000, "budget_exhausted"), (None, "provider")])
async def test_an_answer_cut_off_at_fleets_cap_is_budget_exhausted(
    budget: int | None, kind: str
) -> None:
    """Cut off under fleet's cap: the hold ran out (budget_exhausted); else the model's own."""
    model = FunctionModel(_cut_off, model_name="local-fn")
    agent = PydanticAIAgent(Agent(model, output_type=PromptedOutput(pydantic_ai_agents.City)))
    host = LocalExecutor(
        agents={"writer": agent}, budget=None if budget is None else WorkflowBudget(budget)
    )
    outcome = await host.execute_step(_spec("c", max_tokens=300 if budget else None))

    assert outcome.error == kind, outcome.output
    assert "OutputTokenLimitExceeded" in outcome.output
    assert outcome.usage.total_tokens == 15


async def test_tools_run_on_the_worker_that_runs_the_step(
    server: FakeOpenAI, redis_url: str, tmp_path: Path
) -> None:
    """A tool round on a fleet: the tool runs inside the worker process, its result goes back."""
    server.script(
        reply(None, tool_calls=[tool_call("lookup", {"city": "Oslo"})]), reply("Oslo is small")
    )
    settings = fleet_settings(redis_url, agents_file=_agents_file(tmp_path, "tooled"))
    env = {"PA_TEST_BASE_URL": server.base_url}
    with running_workers(settings, tmp_path, "w1", concurrency=2, env=env) as fleet:
        worker_pid = fleet.workers["w1"].process.pid
        async with fleet.executor() as host:
            outcome = await host.execute_step(_spec("t", "tooled"))

    assert outcome.success and outcome.output == "Oslo is small", outcome.output
    assert outcome.worker.startswith("w1@")
    returned = [m for m in server.requests[1].body["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in returned] == [
        f"Oslo: 1000 people (looked up by process {worker_pid})"
    ]
    assert worker_pid != os.getpid()


def test_an_agent_module_that_fails_on_import_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AGENTS.md's own example without OPENAI_API_KEY: one line naming the file, no traceback."""
    (tmp_path / "needs_key_agents.py").write_text(
        'from pydantic_ai import Agent\n\nextractor = Agent("openai:gpt-4o-mini")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "agents.toml"
    path.write_text('[agents.x]\nkind = "pydantic_ai"\ntarget = "needs_key_agents:extractor"\n')
    with pytest.raises(ConfigError) as caught:
        load_agents(path)
    message = str(caught.value)
    assert "[agents.x]" in message and "needs_key_agents.py:3" in message, message
    assert "UserError: Set the `OPENAI_API_KEY` environment variable" in message, message
    assert len(message.splitlines()) == 1
