"""Dollars on the fleet: Celery workers reserve each model call in the workflow and its team."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleet import AgentStepSpec, WorkflowBudget, execute_steps_parallel, load_agents
from fleet.accounts import set_account
from fleet.agents import OpenAIAgent
from fleet.ledgers import RedisLedger
from fleet.pricing import micros_to_usd
from tests.celery_support import fleet_settings, running_workers
from tests.fake_openai import FakeOpenAI, reply

pytestmark = [pytest.mark.redis, pytest.mark.celery]


async def test_workers_never_overspend_the_team_account(
    redis_url: str, tmp_path: Path, key_prefix: str
) -> None:
    """8 priced steps on 2 workers, a team account with dollars for 3: exactly 3 requests."""
    completion = 40
    with FakeOpenAI() as server:
        agents_file = tmp_path / "agents.toml"
        agents_file.write_text(
            textwrap.dedent(
                f"""
                [prices."house-model"]
                input_per_mtok = 0.30
                output_per_mtok = 1.20

                [agents.llm]
                kind = "openai"
                base_url = "{server.base_url}"
                model = "house-model"
                max_tokens = {completion}
                """
            ),
            encoding="utf-8",
        )
        agent = load_agents(agents_file)["llm"].run
        assert isinstance(agent, OpenAIAgent) and agent.price is not None
        specs = [
            AgentStepSpec(task_id=f"s{i}", agent="llm", description="d", prompt=f"Item {i}.")
            for i in range(8)
        ]
        estimate = agent.prompt_estimate(agent.first_messages(specs[0]), tools=False)
        cost = agent.price.cost_micros(estimate, completion)
        server.script(*[reply("ok", prompt_tokens=estimate, completion_tokens=completion)] * 8)
        settings = fleet_settings(redis_url, agents_file=agents_file)
        ledger = RedisLedger(redis_url, key_prefix=settings.key_prefix)
        await set_account(ledger, "team:fleet", limit_usd=micros_to_usd(3 * cost))
        budget = WorkflowBudget(
            limit_usd=1, parents=["team:fleet"], ledger=ledger, workflow_id=f"{key_prefix}-wf"
        )
        (tmp_path / "w").mkdir()
        with running_workers(settings, tmp_path / "w", "worker1", "worker2", concurrency=2) as w:
            executor = w.executor(budget=budget)
            try:
                outcomes = await execute_steps_parallel(executor, specs)
            finally:
                await executor.aclose()
        requests = len(server.requests)
        team = await ledger.state("team:fleet")
        snapshot = await budget.snapshot()
        await ledger.close()

    assert requests == 3
    assert sum(o.success for o in outcomes) == 3
    assert {o.error for o in outcomes if not o.success} == {"budget_exhausted"}
    assert team.consumed_micros == 3 * cost and team.reserved_micros == 0
    assert snapshot.consumed_usd == micros_to_usd(3 * cost) and snapshot.reserved_usd == 0
    assert sum(o.cost_usd or 0 for o in outcomes) == micros_to_usd(3 * cost)
    assert all(o.worker and o.worker.startswith("worker") for o in outcomes if o.success)


async def test_workers_run_an_unpriced_model_under_a_token_budget(
    redis_url: str, tmp_path: Path, key_prefix: str
) -> None:
    """A token-only budget on the fleet runs a model without a price; its tokens are charged."""
    with FakeOpenAI() as server:
        agents_file = tmp_path / "agents.toml"
        agents_file.write_text(
            textwrap.dedent(
                f"""
                [agents.llm]
                kind = "openai"
                base_url = "{server.base_url}"
                model = "local-gguf-without-a-price"
                max_tokens = 40
                """
            ),
            encoding="utf-8",
        )
        specs = [
            AgentStepSpec(task_id=f"s{i}", agent="llm", description="d", prompt=f"Item {i}.")
            for i in range(2)
        ]
        server.script(*[reply("ok", prompt_tokens=10, completion_tokens=5)] * 2)
        settings = fleet_settings(redis_url, agents_file=agents_file)
        ledger = RedisLedger(redis_url, key_prefix=settings.key_prefix)
        budget = WorkflowBudget(5000, ledger=ledger, workflow_id=f"{key_prefix}-tokens")
        (tmp_path / "w").mkdir()
        with running_workers(settings, tmp_path / "w", "worker1", concurrency=2) as w:
            executor = w.executor(budget=budget)
            try:
                outcomes = await execute_steps_parallel(executor, specs)
            finally:
                await executor.aclose()
        requests = len(server.requests)
        snapshot = await budget.snapshot()
        await ledger.close()

    assert [o.error for o in outcomes] == [None, None], [o.output for o in outcomes]
    assert requests == 2
    assert snapshot.consumed_tokens == 30 and snapshot.reserved_tokens == 0
