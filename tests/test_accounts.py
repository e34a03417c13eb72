"""Dollars in the ledger and shared accounts above workflows: one suite over both ledgers."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet import BudgetSnapshot, WorkflowBudget
from fleet.accounts import set_account
from fleet.errors import BudgetError, BudgetExhaustedError
from fleet.ledgers import BudgetLedger, ChildUsage, MemoryLedger, RedisLedger, SQLiteLedger


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def ledger(
    request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> AsyncIterator[BudgetLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    if request.param == "sqlite":
        in_file = SQLiteLedger(tmp_path / "ledger.db")
        yield in_file
        await in_file.close()
        return
    made = RedisLedger(request.getfixturevalue("redis_url"), key_prefix=key_prefix)
    yield made
    await made.close()


def wid() -> str:
    return f"wf-{uuid.uuid4().hex[:8]}"


async def test_dollars_reserved_and_settled_exactly(ledger: BudgetLedger) -> None:
    """Micro-dollars are held and charged exactly beside tokens; the snapshot shows Decimals."""
    budget = WorkflowBudget(1000, limit_usd="0.50", ledger=ledger, workflow_id=wid())
    first = await budget.reserve(100, holder="a", micros=200_000)
    second = await budget.reserve(0, holder="b", micros=250_000)
    snap = await budget.snapshot()
    assert (snap.reserved_tokens, snap.reserved_usd) == (100, Decimal("0.45"))
    assert snap.remaining_usd == Decimal("0.05") and snap.limit_usd == Decimal("0.5")
    await first.settle(80, used_micros=123_457)
    await second.settle(0, used_micros=1)
    await second.settle(0, used_micros=999_999)  # once per id
    snap = await budget.snapshot()
    assert snap == BudgetSnapshot(
        consumed_tokens=80,
        limit_tokens=1000,
        consumed_usd=Decimal("0.123458"),
        limit_usd=Decimal("0.5"),
    )
    assert snap.remaining_usd == Decimal("0.376542") and str(snap.consumed_usd) == "0.123458"
    assert '"consumed_usd":"0.123458"' in snap.model_dump_json()


async def test_dollar_limit_refuses_waits_and_exhausts(ledger: BudgetLedger) -> None:
    """consumed + request > limit is refused at once; in-flight holds only make it wait."""
    budget = WorkflowBudget(limit_usd=1, ledger=ledger, workflow_id=wid())
    held = await budget.reserve(0, holder="a", micros=700_000)
    waiter = asyncio.create_task(budget.reserve(0, holder="b", micros=500_000))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await held.settle(0, used_micros=600_000)
    with pytest.raises(BudgetExhaustedError) as refused:
        await waiter
    assert refused.value.unit == "usd" and refused.value.account == budget.workflow_id
    assert "dollar budget exhausted ($0.600000 / $1.000000)" in str(refused.value)
    await (await budget.reserve(0, holder="c", micros=400_000)).settle(0, used_micros=400_000)
    assert (await budget.snapshot()).is_exhausted
    with pytest.raises(BudgetExhaustedError):
        await budget.reserve(1, holder="tokens only")  # a spent dollar budget stops everything


async def test_reservation_is_taken_from_every_ancestor(ledger: BudgetLedger) -> None:
    """A workflow under team under org holds and charges all three; children are listed."""
    await set_account(ledger, "org:acme", limit_usd=10)
    await set_account(ledger, "team:research", limit_usd=2, limit_tokens=500, parents=["org:acme"])
    one = WorkflowBudget(limit_usd=5, parents=["team:research"], ledger=ledger, workflow_id=wid())
    two = WorkflowBudget(parents=["team:research"], ledger=ledger, workflow_id=wid())
    assert await one.ancestors() == ("team:research", "org:acme")
    hold = await one.reserve(100, holder="a", micros=1_500_000)
    team = await ledger.state("team:research")
    org = await ledger.state("org:acme")
    assert (team.reserved, team.reserved_micros, org.reserved_micros) == (100, 1_500_000, 1_500_000)
    waiter = asyncio.create_task(two.reserve(0, holder="b", micros=600_000))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # 1.5 held + 0.6 > the team's 2: waits for the hold
    await hold.settle(90, used_micros=1_250_000)
    second = await asyncio.wait_for(waiter, 5)  # 1.25 charged + 0.6 fits
    await second.settle(0, used_micros=600_000)
    team = await ledger.state("team:research")
    org = await ledger.state("org:acme")
    assert (team.consumed, team.consumed_micros, team.reserved_micros) == (90, 1_850_000, 0)
    assert (org.consumed, org.consumed_micros, org.reserved_micros) == (90, 1_850_000, 0)
    assert (await one.snapshot()).consumed_usd == Decimal("1.25")
    assert (await two.snapshot()).consumed_usd == Decimal("0.6")
    assert {c.workflow_id: c.micros for c in await ledger.children("org:acme")} == {
        one.workflow_id: 1_250_000,
        two.workflow_id: 600_000,
    }


async def test_ancestor_refusal_names_the_account(ledger: BudgetLedger) -> None:
    """A sibling's spending refuses the next workflow with the account's name and figures."""
    await set_account(ledger, "team:research", limit_usd=2)
    one = WorkflowBudget(parents=["team:research"], ledger=ledger, workflow_id="wf-one")
    two = WorkflowBudget(
        limit_usd=5, parents=["team:research"], ledger=ledger, workflow_id="wf-two"
    )
    await (await one.reserve(100, holder="a", micros=1_500_000)).settle(90, used_micros=1_250_000)
    await (await two.reserve(10, holder="b", micros=100_000)).settle(10, used_micros=50_000)
    with pytest.raises(BudgetExhaustedError) as refused:
        await two.reserve(0, holder="c", micros=800_000)
    assert refused.value.account == "team:research" and refused.value.unit == "usd"
    assert "account 'team:research' dollar budget exhausted ($1.300000 / $2.000000)" in str(
        refused.value
    )
    team = await ledger.state("team:research")
    assert (team.consumed, team.consumed_micros, team.reserved_micros) == (100, 1_300_000, 0)
    assert await ledger.children("team:research") == [
        ChildUsage("wf-one", 90, 1_250_000),
        ChildUsage("wf-two", 10, 50_000),
    ]
    assert (await two.snapshot()).consumed_usd == Decimal("0.05")


async def test_ancestor_token_limit_and_waiting(ledger: BudgetLedger) -> None:
    """An ancestor's token limit binds too; a request blocked by siblings' holds waits."""
    await set_account(ledger, "team:t", limit_tokens=100)
    one = WorkflowBudget(parents=["team:t"], ledger=ledger, workflow_id=wid())
    two = WorkflowBudget(parents=["team:t"], ledger=ledger, workflow_id=wid())
    held = await one.reserve(70, holder="a")
    waiter = asyncio.create_task(two.reserve(40, holder="b"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await held.settle(50)
    granted = await asyncio.wait_for(waiter, 5)
    assert granted.tokens == 40
    await granted.settle(40)  # the team has consumed 90 of 100
    with pytest.raises(BudgetExhaustedError) as refused:
        await two.reserve(11, holder="c")
    assert refused.value.account == "team:t" and refused.value.unit == "tokens"


async def test_ancestor_lease_expiry_returns_the_hold(ledger: BudgetLedger) -> None:
    """A dead holder's hold returns to the workflow and to every ancestor."""
    await set_account(ledger, "team:lease", limit_usd=1)
    budget = WorkflowBudget(parents=["team:lease"], ledger=ledger, workflow_id=wid(), lease_s=0.2)
    await budget.reserve(5, holder="dies", micros=900_000)
    assert (await ledger.state("team:lease")).reserved_micros == 900_000
    await asyncio.sleep(0.35)
    assert (await ledger.state("team:lease")).reserved_micros == 0
    assert (await ledger.reservations("team:lease")) == []
    other = WorkflowBudget(parents=["team:lease"], ledger=ledger, workflow_id=wid())
    assert (await other.reserve(0, holder="b", micros=1_000_000)).micros == 1_000_000


async def test_parents_are_remembered_for_a_resumed_workflow(ledger: BudgetLedger) -> None:
    """A budget without parents for a workflow that had some continues under them."""
    await set_account(ledger, "team:r", limit_tokens=1000)
    workflow_id = wid()
    await (
        await WorkflowBudget(parents=["team:r"], ledger=ledger, workflow_id=workflow_id).reserve(
            10, holder="a"
        )
    ).settle(10)
    resumed = WorkflowBudget(ledger=ledger, workflow_id=workflow_id)
    assert await resumed.ancestors() == ("team:r",)
    await (await resumed.reserve(5, holder="b")).settle(5)
    assert (await ledger.state("team:r")).consumed == 15


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"limit_tokens": -1}, "limit_tokens must be a non-negative integer"),
        ({"limit_tokens": 1.5}, "limit_tokens must be a non-negative integer"),
        ({"limit_tokens": math.inf}, "limit_tokens must be a non-negative integer"),
        ({"limit_usd": -5}, "finite, non-negative"),
        ({"limit_usd": math.nan}, "finite, non-negative"),
        ({"limit_usd": math.inf}, "finite, non-negative"),
        ({"limit_usd": Decimal("Infinity")}, "finite, non-negative"),
        ({"limit_usd": "lots"}, "must be a number of US dollars"),
        ({"limit_usd": True}, "must be a number of US dollars"),
        ({"limit_usd": "0.0000001"}, "finer than a micro-dollar"),
        ({"parents": ["team research"]}, "account name 'team research' is not allowed"),
        ({"parents": ["team/x"]}, "account name 'team/x' is not allowed"),
        ({"parents": [""]}, "account name '' is not allowed"),
        ({"parents": "team:x"}, "parents must be a list"),
        ({"lease_s": 0}, "lease_s must be a positive number"),
    ],
)
def test_bad_budget_input_is_a_budget_error(options: dict[str, Any], problem: str) -> None:
    """Negative or non-finite limits and forbidden account names fail with the bad value."""
    with pytest.raises(BudgetError) as raised:
        WorkflowBudget(**options)
    assert problem in str(raised.value)


async def test_unknown_parent_and_cycles_are_refused(ledger: BudgetLedger) -> None:
    """A parent that does not exist, or parents that loop, fail with a clear BudgetError."""
    budget = WorkflowBudget(parents=["team:ghost"], ledger=ledger, workflow_id=wid())
    with pytest.raises(BudgetError, match="'team:ghost' .* does not exist; create it"):
        await budget.reserve(1, holder="a")
    await set_account(ledger, "a:1")
    await set_account(ledger, "a:2", parents=["a:1"])
    with pytest.raises(BudgetError, match=r"cycle: a:1 -> a:2 -> a:1"):
        await set_account(ledger, "a:1", parents=["a:2"])
    with pytest.raises(BudgetError, match=r"cycle: a:3 -> a:3"):
        await set_account(ledger, "a:3", parents=["a:3"])
    with pytest.raises(BudgetError, match="not allowed"):
        await set_account(ledger, "bad name", limit_usd=1)
    with pytest.raises(BudgetError, match="finite"):
        await set_account(ledger, "a:4", limit_usd=-1)
    # a cycle written behind fleet's back is still caught when a workflow resolves it
    await ledger.configure("a:1", parents=["a:2"])
    looped = WorkflowBudget(parents=["a:2"], ledger=ledger, workflow_id=wid())
    with pytest.raises(BudgetError, match="cycle"):
        await looped.reserve(1, holder="a")


# -- the CLI -------------------------------------------------------------------------


def test_cli_accounts(redis_url: str, key_prefix: str) -> None:
    """`fleet budget set/show` create an account, nest it, and list its child workflows."""
    from fleet.cli import app

    runner = CliRunner()
    common = ["--redis-url", redis_url, "--key-prefix", key_prefix]
    made = runner.invoke(
        app, ["budget", "set", "team:research", "--usd", "100", "--tokens", "5000000", *common]
    )
    assert made.exit_code == 0, made.output
    assert "100" in made.output and "5000000" in made.output

    async def spend() -> None:
        ledger = RedisLedger(redis_url, key_prefix=key_prefix)
        for name, micros in (("nightly-1", 1_500_000), ("nightly-2", 250_000)):
            budget = WorkflowBudget(parents=["team:research"], ledger=ledger, workflow_id=name)
            await (await budget.reserve(10, holder="s", micros=micros)).settle(
                7, used_micros=micros
            )
        await ledger.close()

    asyncio.run(spend())
    shown = runner.invoke(app, ["budget", "show", "team:research", *common])
    assert shown.exit_code == 0, shown.output
    for expected in (
        "consumption by child workflow",
        "nightly-1",
        "1.500000",
        "nightly-2",
        "0.250000",
        "1.750000",
        "98.250000",
    ):
        assert expected in shown.output, expected
    child = runner.invoke(app, ["budget", "show", "nightly-1", *common])
    assert "parents: team:research" in child.output
    nested = runner.invoke(app, ["budget", "set", "org:x", *common])
    assert nested.exit_code == 0, nested.output
    moved = runner.invoke(app, ["budget", "set", "team:research", "--parent", "org:x", *common])
    assert moved.exit_code == 0 and "parents: org:x" in moved.output
    cycle = runner.invoke(app, ["budget", "set", "org:x", "--parent", "team:research", *common])
    assert cycle.exit_code == 2 and "cycle" in cycle.output
    bad = runner.invoke(app, ["budget", "set", "team:research", "--usd", "-1", *common])
    assert bad.exit_code == 2 and "non-negative" in bad.output
    ghost = runner.invoke(app, ["budget", "set", "team:b", "--parent", "nobody", *common])
    assert ghost.exit_code == 2 and "'nobody'" in ghost.output and "does not exist" in ghost.output


def test_accounts_work_on_the_embedded_default(tmp_path: Path) -> None:
    """`fleet budget set team:x` then `fleet run --account team:x` without Redis: it counts."""
    from tests.test_cli_run import run_fleet

    flow = tmp_path / "flow.py"
    flow.write_text(
        "from fleet import AgentStepSpec, Workflow\n\n"
        "async def main(workflow: Workflow) -> None:\n"
        "    await workflow.phase('p', [AgentStepSpec(task_id=f's{i}', agent='echo',\n"
        "        description='', prompt='x' * 40) for i in range(4)])\n",
        encoding="utf-8",
    )
    made = run_fleet(tmp_path, "budget", "set", "team:x", "--usd", "1", "--tokens", "1000")
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / "ledger.db").exists()  # beside the journal, FLEET_STORE's directory
    run = run_fleet(tmp_path, "run", f"{flow}:main", "--root-id", "acct", "--account", "team:x")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 steps run (0 failed)" in run.stdout
    shown = run_fleet(tmp_path, "budget", "show", "team:x")
    assert shown.returncode == 0, shown.stderr
    assert "acct" in shown.stdout and "80" in shown.stdout  # 4 echo steps of 20 tokens
    ghost = run_fleet(tmp_path, "run", f"{flow}:main", "--account", "team:ghost")
    assert ghost.returncode == 2 and "'team:ghost'" in ghost.stderr + ghost.stdout
