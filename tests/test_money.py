"""Money: model prices, the dollar hold around each model call, and dollar-limited fan-outs."""

from __future__ import annotations

import asyncio
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import hypothesis  # noqa: F401 - see below
import pytest
from genai_prices import Usage, calc_price

from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget, execute_steps_parallel, load_agents
from fleet.agents import OpenAIAgent, OpenAIAgentConfig
from fleet.errors import ConfigError
from fleet.ledgers import BudgetLedger, MemoryLedger, RedisLedger
from fleet.pricing import ModelPrice, micros_to_usd, parse_prices, price_model

from .fake_openai import FakeOpenAI, reply
from .test_cli_run import run_fleet

# hypothesis is imported here on purpose: run alone, this file's concurrent Redis test
# otherwise leaves hypothesis' pytest plugin to import it at the end of the session,
# where CPython 3.11.7's parser fails with "AST constructor recursion depth mismatch".

QWEN = ModelPrice(
    model="qwen2.5-7b",
    source="prices",
    input_per_mtok=Decimal("0.15"),
    output_per_mtok=Decimal("0.60"),
)


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[BudgetLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    made = RedisLedger(request.getfixturevalue("redis_url"), key_prefix=key_prefix)
    yield made
    await made.close()


def agents_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def spec(task_id: str = "t1", prompt: str = "Say hello.", **fields: Any) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="llm", description="d", prompt=prompt, **fields)


# -- prices --------------------------------------------------------------------------


def test_price_matches_genai_prices_for_a_known_model(tmp_path: Path) -> None:
    """A listed model is priced exactly as genai-prices prices it, also through the agents file."""
    price = price_model("gpt-4o", provider="openai")
    assert price is not None and price.source == "genai-prices"
    expected = calc_price(
        Usage(input_tokens=1234, output_tokens=567), "gpt-4o", provider_id="openai"
    )
    assert price.cost(1234, 567) == expected.total_price
    assert price.cost_micros(1234, 567) == int(
        (expected.total_price * 1_000_000).to_integral_value(rounding="ROUND_CEILING")
    )
    path = agents_file(
        tmp_path,
        """
        [agents.llm]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        model = "gpt-4o"
        provider = "openai"
        """,
    )
    agent = load_agents(path)["llm"].run
    assert isinstance(agent, OpenAIAgent)
    assert agent.price is not None and agent.price.cost(1234, 567) == expected.total_price


def test_override_table_prices_an_unlisted_model_exactly(tmp_path: Path) -> None:
    """[prices."MODEL"] prices a model genai-prices does not list, in exact decimals."""
    assert price_model("qwen2.5-7b") is None
    path = agents_file(
        tmp_path,
        """
        [prices."qwen2.5-7b"]
        input_per_mtok = 0.15
        output_per_mtok = 0.60

        [prices."gpt-4o"]          # the table wins over genai-prices
        input_per_mtok = 1
        output_per_mtok = 2

        [agents.llm]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        model = "qwen2.5-7b"
        """,
    )
    agent = load_agents(path)["llm"].run
    assert isinstance(agent, OpenAIAgent)
    assert agent.price == QWEN
    # 0.15 * 1001 + 0.60 * 333 = 349.95 micro-dollars: exact, then rounded up once
    assert QWEN.cost(1001, 333) == Decimal("0.00034995")
    assert QWEN.cost_micros(1001, 333) == 350
    assert micros_to_usd(350) == Decimal("0.000350")
    listed = parse_prices({"gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2}}, "f")
    assert price_model("gpt-4o", prices=listed) == listed["gpt-4o"]


def test_pricing_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading genai-prices' data and pricing a call never opens a socket."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    genai_prices.data_snapshot._bundled_snapshot.cache_clear()
    from fleet import pricing

    pricing._genai_provider.cache_clear()
    price = price_model("claude-sonnet-4-5", base_url="https://api.anthropic.com/v1")
    assert price is not None and price.cost(1000, 1000) > 0
    assert price_model("gpt-4o-mini") is not None
    assert attempts == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('prices = "cheap"', "'prices' must be a table"),
        ('[prices."m"]\ninput_per_mtok = 0.1', "misses ['output_per_mtok']"),
        ('[prices."m"]\ninput_per_mtok = 0.1\noutput_per_mtok = 1\ncurrency = "EUR"', "currency"),
        ('[prices."m"]\ninput_per_mtok = -1\noutput_per_mtok = 1', "input_per_mtok"),
        ('[prices."m"]\ninput_per_mtok = nan\noutput_per_mtok = 1', "finite"),
        ('[prices."m"]\ninput_per_mtok = "0.1"\noutput_per_mtok = 1', "must be a number"),
        ("[prices]\nm = 3", "must be a table with input_per_mtok"),
        ('unknown_price = "maybe"', "unknown_price must be"),
    ],
)
def test_malformed_price_table_is_a_config_error(tmp_path: Path, body: str, problem: str) -> None:
    """A bad [prices] table or unknown_price fails loading with the file, key and value."""
    path = agents_file(tmp_path, body)
    with pytest.raises(ConfigError) as raised:
        load_agents(path)
    assert problem in str(raised.value) and str(path) in str(raised.value)


# -- the agent -----------------------------------------------------------------------


def make_agent(base_url: str, model: str = "qwen2.5-7b", **options: Any) -> OpenAIAgent:
    prices = {"qwen2.5-7b": QWEN}
    unknown = options.pop("file_unknown_price", "refuse")
    config = OpenAIAgentConfig(base_url=base_url, model=model, backoff_s=0.01, **options)
    return OpenAIAgent(config, name="llm", prices=prices, unknown_price=unknown)


async def test_unpriced_model_is_refused_before_any_request(ledger: BudgetLedger) -> None:
    """No price anywhere: the step fails no_price, names the model, shows the table; no request."""
    with FakeOpenAI() as server:
        server.script(reply("never sent"))
        agent = make_agent(server.base_url, model="mystery-7b")
        budget = WorkflowBudget(limit_usd=5, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex}")
        executor = LocalExecutor(agents={"llm": agent}, budget=budget)
        outcome = await executor.execute_step(spec())
        assert server.requests == []
    assert not outcome.success and outcome.error == "no_price"
    assert "'mystery-7b'" in outcome.output
    assert '[prices."mystery-7b"]' in outcome.output and "output_per_mtok" in outcome.output
    snapshot = await budget.snapshot()
    assert snapshot.consumed_usd == 0 and snapshot.reserved_usd == 0


async def test_token_only_budget_runs_an_unpriced_model(ledger: BudgetLedger) -> None:
    """A token-only budget needs no price: the unpriced model runs and its tokens are charged."""
    with FakeOpenAI() as server:
        server.script(reply("hi", prompt_tokens=10, completion_tokens=5))
        agent = make_agent(server.base_url, model="mystery-7b")
        budget = WorkflowBudget(5000, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex}")
        outcome = await LocalExecutor(agents={"llm": agent}, budget=budget).execute_step(spec())
        assert len(server.requests) == 1
    assert outcome.success, outcome.output
    assert outcome.cost_usd is None
    snapshot = await budget.snapshot()
    assert snapshot.consumed_tokens == 15 and snapshot.consumed_usd == 0


async def test_an_account_dollar_limit_refuses_an_unpriced_model(ledger: BudgetLedger) -> None:
    """A token-only run under an account with a dollar limit still refuses no_price, unsent."""
    from fleet.accounts import set_account

    team = f"team:{uuid.uuid4().hex[:8]}"
    await set_account(ledger, team, limit_usd=1)
    with FakeOpenAI() as server:
        server.script(reply("never sent"))
        agent = make_agent(server.base_url, model="mystery-7b")
        budget = WorkflowBudget(
            5000, parents=[team], ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex}"
        )
        outcome = await LocalExecutor(agents={"llm": agent}, budget=budget).execute_step(spec())
        assert server.requests == []
    assert not outcome.success and outcome.error == "no_price"


@pytest.mark.parametrize("where", ["agent", "file"])
async def test_unknown_price_allow_runs_the_unpriced_model(where: str) -> None:
    """unknown_price = "allow" (on the agent or the file) runs it, uncharged and unpriced."""
    options = {"unknown_price": "allow"} if where == "agent" else {"file_unknown_price": "allow"}
    with FakeOpenAI() as server:
        server.script(reply("hi", prompt_tokens=10, completion_tokens=5))
        agent = make_agent(server.base_url, model="mystery-7b", **options)
        budget = WorkflowBudget(limit_usd=5)
        outcome = await LocalExecutor(agents={"llm": agent}, budget=budget).execute_step(spec())
        assert len(server.requests) == 1
    assert outcome.success and outcome.cost_usd is None
    assert (await budget.snapshot()).consumed_tokens == 15


async def test_a_call_holds_its_worst_case_and_settles_its_real_cost(ledger: BudgetLedger) -> None:
    """While a call is in flight its worst case is held; after it, the real cost is charged."""
    with FakeOpenAI() as server:
        server.script(reply("hi", prompt_tokens=900, completion_tokens=40, delay_s=0.5))
        agent = make_agent(server.base_url, max_tokens=500)
        the_spec = spec()
        estimate = agent.prompt_estimate(agent.first_messages(the_spec), tools=False)
        budget = WorkflowBudget(limit_usd="1", ledger=ledger, workflow_id=f"wf-{uuid.uuid4()}")
        executor = LocalExecutor(agents={"llm": agent}, budget=budget)
        step = asyncio.create_task(executor.execute_step(the_spec))
        assert await asyncio.to_thread(server.wait_for, lambda s: len(s.requests) == 1)
        during = await budget.snapshot()
        outcome = await step
    assert during.reserved_usd == micros_to_usd(QWEN.cost_micros(estimate, 500))
    assert outcome.success and outcome.cost_usd == micros_to_usd(QWEN.cost_micros(900, 40))
    after = await budget.snapshot()
    assert after.consumed_usd == outcome.cost_usd and after.reserved_usd == 0
    assert after.remaining_usd == Decimal(1) - outcome.cost_usd


async def test_max_tokens_is_capped_so_the_worst_case_fits(ledger: BudgetLedger) -> None:
    """With little money left, the call's max_tokens shrinks until its worst case fits."""
    with FakeOpenAI() as server:
        server.script(reply("hi", prompt_tokens=10, completion_tokens=5))
        agent = make_agent(server.base_url, max_tokens=1000)
        the_spec = spec()
        estimate = agent.prompt_estimate(agent.first_messages(the_spec), tools=False)
        room = QWEN.cost_micros(estimate, 100)  # exactly 100 completion tokens fit
        budget = WorkflowBudget(
            limit_usd=micros_to_usd(room), ledger=ledger, workflow_id=f"wf-{uuid.uuid4()}"
        )
        outcome = await LocalExecutor(agents={"llm": agent}, budget=budget).execute_step(the_spec)
        assert outcome.success, outcome.output
        assert server.requests[0].body["max_tokens"] == 100


async def test_fan_out_of_fifty_runs_exactly_the_twenty_that_fit(ledger: BudgetLedger) -> None:
    """50 priced steps, dollars for 20: 20 run, 30 fail budget_exhausted unsent, cost exact."""
    completion = 50
    with FakeOpenAI() as server:
        agent = make_agent(server.base_url, max_tokens=completion)
        specs = [spec(f"s{i:02d}", prompt=f"Summarise item {i:02d}.") for i in range(50)]
        estimate = agent.prompt_estimate(agent.first_messages(specs[0]), tools=False)
        # The server reports exactly the worst case, so each call costs what it held.
        cost = QWEN.cost_micros(estimate, completion)
        server.script(*[reply("done", prompt_tokens=estimate, completion_tokens=completion)] * 50)
        limit = 20 * cost + QWEN.cost_micros(estimate, 1) - 1  # a 21st call cannot fit
        budget = WorkflowBudget(
            limit_usd=micros_to_usd(limit), ledger=ledger, workflow_id=f"wf-{uuid.uuid4()}"
        )
        executor = LocalExecutor(agents={"llm": agent}, budget=budget, max_concurrency=8)
        peaks: list[Decimal] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                snap = await budget.snapshot()
                peaks.append(snap.consumed_usd + snap.reserved_usd)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            outcomes = await execute_steps_parallel(executor, specs)
        finally:
            done.set()
            await watcher
        assert len(server.requests) == 20

    ran = [o for o in outcomes if o.success]
    refused = [o for o in outcomes if not o.success]
    assert len(ran) == 20 and len(refused) == 30
    assert {o.error for o in refused} == {"budget_exhausted"}, [
        o.output for o in refused if o.error != "budget_exhausted"
    ][:2]
    assert all("dollar budget" in o.output for o in refused)
    snapshot = await budget.snapshot()
    assert snapshot.consumed_usd == sum((o.cost_usd or Decimal(0) for o in ran), Decimal(0))
    assert snapshot.consumed_usd == micros_to_usd(20 * cost)
    assert snapshot.consumed_usd <= micros_to_usd(limit) and snapshot.reserved_usd == 0
    assert max(peaks) <= micros_to_usd(limit)
    assert snapshot.is_exhausted is False and snapshot.remaining_usd == micros_to_usd(
        limit - 20 * cost
    )


def test_cost_shows_in_step_finished_events() -> None:
    """step_finished carries the step's cost next to its tokens."""
    from fleet.events import StepFinished, parse_event
    from fleet.spec import StepOutcome

    outcome = StepOutcome(
        task_id="t", session_id="s", agent="a", output="o", success=True, cost_usd=Decimal("0.25")
    )
    event = StepFinished.of(outcome)
    assert event.cost_usd == Decimal("0.25")
    assert parse_event(event.model_dump_json()).cost_usd == Decimal("0.25")
    assert StepOutcome.from_json(outcome.model_dump_json()).cost_usd == Decimal("0.25")


@pytest.mark.parametrize("model", ["gpt-4o-mini", "unpriced-m"])
def test_demo_summary_prints_the_cost_when_its_model_is_priced(model: str) -> None:
    """`fleet demo --llm` prints the run's cost when the model has a price, and none otherwise."""
    import json
    import subprocess
    import sys

    finding = {"line": 1, "rule": "LLM1", "message": "found", "fixable": False}
    with FakeOpenAI() as server:
        server.script(*[reply(json.dumps({"findings": [finding]})) for _ in range(20)])
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "demo", "--llm", server.base_url, "--model", model],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert len(server.requests) == 20
    assert result.returncode == 0, result.stderr
    price = price_model(model, base_url=server.base_url)
    if price is None:
        assert "cost $" not in result.stdout
    else:
        each = price.cost_micros(10, 5)  # the fake's default usage per call
        assert f"cost ${micros_to_usd(20 * each)};" in result.stdout


@pytest.mark.redis
def test_fleet_run_with_budget_usd_and_account(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """`fleet run --budget-usd --account` charges the run and its team; status shows dollars."""
    completion = 30
    shared = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": key_prefix}
    flow = tmp_path / "ask.py"
    flow.write_text(
        textwrap.dedent(
            """
            from fleet import AgentStepSpec

            async def main(workflow):
                specs = [AgentStepSpec(task_id=f"q{i}", agent="llm", description="d",
                                       prompt="Same question.") for i in range(3)]
                outcomes = await workflow.phase("ask", specs)
                return {"ok": sum(o.success for o in outcomes)}
            """
        )
    )
    with FakeOpenAI() as server:
        path = agents_file(
            tmp_path,
            f"""
            [prices."house-model"]
            input_per_mtok = 0.25
            output_per_mtok = 2.00

            [agents.llm]
            kind = "openai"
            base_url = "{server.base_url}"
            model = "house-model"
            max_tokens = {completion}
            """,
        )
        agent = load_agents(path)["llm"].run
        assert isinstance(agent, OpenAIAgent) and agent.price is not None
        estimate = agent.prompt_estimate(
            agent.first_messages(spec(prompt="Same question.")), tools=False
        )
        cost = agent.price.cost_micros(estimate, completion)
        server.script(*[reply("ok", prompt_tokens=estimate, completion_tokens=completion)] * 3)
        made = run_fleet(
            tmp_path, "budget", "set", "team:cli", "--usd", "1", "--store", redis_url, **shared
        )
        assert made.returncode == 0, made.stdout + made.stderr
        common = ("--agents", str(path), "--store", redis_url, "--root-id", "money-run")
        ghost = run_fleet(
            tmp_path, "run", f"{flow}:main", *common, "--account", "team:ghost", **shared
        )
        assert ghost.returncode == 2 and "'team:ghost'" in ghost.stderr + ghost.stdout
        assert server.requests == []
        bad = run_fleet(tmp_path, "run", f"{flow}:main", *common, "--budget-usd", "-2", **shared)
        assert bad.returncode == 2 and "non-negative" in bad.stderr + bad.stdout
        done = run_fleet(
            tmp_path, "run", f"{flow}:main", *common, "--budget-usd", "5", "--account", "team:cli",
            **shared,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(server.requests) == 3
    total = micros_to_usd(3 * cost)
    assert "budget $5.000000, account team:cli" in done.stdout
    # The summary names what is limited (dollars), not "N / uncapped" tokens.
    assert f"budget ${total} / $5.000000" in done.stdout and "uncapped" not in done.stdout
    team = run_fleet(tmp_path, "budget", "show", "team:cli", "--store", redis_url, **shared)
    assert "money-run" in team.stdout and str(total) in team.stdout
    status = run_fleet(tmp_path, "status", "money-run", "--store", redis_url, **shared)
    assert f"${total} consumed + $0.000000 reserved of $5.000000" in status.stdout, status.stdout
