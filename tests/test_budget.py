"""The token budget: one contract suite over the in-memory and the Redis ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet import BudgetSnapshot, WorkflowBudget
from fleet.errors import BudgetExhaustedError, SpecError
from fleet.ledgers import BudgetLedger, MemoryLedger, RedisLedger, SQLiteLedger

ROOT = Path(__file__).resolve().parent.parent

LedgerFactory = Callable[[], BudgetLedger]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def new_ledger(
    request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> AsyncIterator[LedgerFactory]:
    """Makes ledger objects that share one store (a new object = another client of it)."""
    made: list[BudgetLedger] = []
    if request.param == "memory":
        shared = MemoryLedger()

        def factory() -> BudgetLedger:
            return shared
    elif request.param == "sqlite":

        def factory() -> BudgetLedger:
            ledger = SQLiteLedger(tmp_path / "ledger.db")
            made.append(ledger)
            return ledger
    else:
        url = request.getfixturevalue("redis_url")

        def factory() -> BudgetLedger:
            ledger = RedisLedger(url, key_prefix=key_prefix)
            made.append(ledger)
            return ledger

    yield factory
    for ledger in made:
        await ledger.close()


@pytest.fixture
def ledger(new_ledger: LedgerFactory) -> BudgetLedger:
    return new_ledger()


def budget_of(ledger: BudgetLedger, limit: int | None, **options: float) -> WorkflowBudget:
    return WorkflowBudget(limit, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex[:8]}", **options)


async def test_reserve_and_settle_arithmetic(ledger: BudgetLedger) -> None:
    """Reservations hold tokens; settling charges actual usage and releases the rest."""
    budget = budget_of(ledger, 100)
    first = await budget.reserve(30, holder="a")
    second = await budget.reserve(20, holder="b")
    assert (first.tokens, second.tokens) == (30, 20)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (0, 50, 50)
    await first.settle(10)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (10, 20, 70)
    await second.settle(20)
    assert await budget.snapshot() == BudgetSnapshot(
        consumed_tokens=30,
        reserved_tokens=0,
        limit_tokens=100,
        remaining_tokens=70,
        is_exhausted=False,
    )


async def test_exhaustion_refuses_with_consumed_and_limit(ledger: BudgetLedger) -> None:
    """Once consumed + request > limit the request is refused with the numbers."""
    budget = budget_of(ledger, 100)
    await (await budget.reserve(60, holder="a")).settle(60)
    with pytest.raises(BudgetExhaustedError) as refused:
        await budget.reserve(50, holder="b")
    assert str(refused.value).startswith("workflow token budget exhausted (60 / 100 tokens)")
    assert "50" in str(refused.value)
    assert (refused.value.consumed, refused.value.limit, refused.value.requested) == (60, 100, 50)
    assert refused.value.kind == "budget_exhausted"
    await (await budget.reserve(40, holder="c")).settle(40)
    snap = await budget.snapshot()
    assert snap.is_exhausted and snap.remaining_tokens == 0
    for tokens in (1, 0):
        with pytest.raises(BudgetExhaustedError) as refused:
            await budget.reserve(tokens, holder="d")
        assert str(refused.value) == "workflow token budget exhausted (100 / 100 tokens)"


async def test_zero_limit_is_exhausted_from_the_start(ledger: BudgetLedger) -> None:
    """A limit of 0 refuses everything, even a zero-token request."""
    budget = budget_of(ledger, 0)
    snap = await budget.snapshot()
    assert snap.is_exhausted and snap.remaining_tokens == 0 and snap.limit_tokens == 0
    for tokens in (0, 1):
        with pytest.raises(BudgetExhaustedError, match=r"\(0 / 0 tokens\)"):
            await budget.reserve(tokens, holder="a")


async def test_uncapped_never_refuses_and_still_counts(ledger: BudgetLedger) -> None:
    """An uncapped budget (None) grants anything, counts usage, and reports no remaining figure."""
    budget = budget_of(ledger, None)
    big = await budget.reserve(10**15 + 7, holder="a")
    assert (await budget.snapshot()).reserved_tokens == 10**15 + 7  # counts stay exact
    await big.settle(10**15 + 3)
    await (await budget.reserve(5, holder="b")).settle(5)
    snap = await budget.snapshot()
    assert snap.consumed_tokens == 10**15 + 8 and snap.reserved_tokens == 0
    assert snap.limit_tokens is None and snap.remaining_tokens is None
    assert not snap.is_exhausted


async def test_lease_expiry_releases_a_silent_holders_tokens(ledger: BudgetLedger) -> None:
    """A holder that never settles nor renews loses its tokens when the lease lapses."""
    budget = budget_of(ledger, 100, lease_s=0.3)
    dead = await budget.reserve(80, holder="dead-host")
    assert (await budget.snapshot()).reserved_tokens == 80
    # Blocked only by the dead holder's reservation: granted once its lease lapses.
    waiter = await asyncio.wait_for(budget.reserve(50, holder="live"), timeout=10)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (0, 50)
    assert not await dead.renew()
    await waiter.settle(50)
    # A late settle of the lapsed reservation still charges what was really spent, once.
    await dead.settle(30)
    await budget.reservation(dead.id, 80).settle(30)
    assert (await budget.snapshot()).consumed_tokens == 80


async def test_kept_alive_renews_the_lease(ledger: BudgetLedger) -> None:
    """While kept alive a reservation outlives several lease periods."""
    # A 1 s lease renewed every 1/3 s lapses only if the loop stalls for a whole second,
    # which a loaded 2-core runner does not do; a 0.2 s lease lapsed on a 67 ms stall.
    budget = budget_of(ledger, 100, lease_s=1.0)
    reservation = await budget.reserve(70, holder="busy")
    async with reservation.kept_alive():
        await asyncio.sleep(3.0)
        assert (await budget.snapshot()).reserved_tokens == 70
        await reservation.settle(5)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (5, 0)


async def test_settle_twice_does_not_double_charge(new_ledger: LedgerFactory) -> None:
    """Settling a reservation again (from any client) charges nothing more."""
    budget = budget_of(new_ledger(), 100)
    reservation = await budget.reserve(30, holder="a")
    await reservation.settle(25)
    await reservation.settle(25)
    other = WorkflowBudget(100, ledger=new_ledger(), workflow_id=budget.workflow_id)
    await other.reservation(reservation.id, 30).settle(25)
    snap = await other.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (25, 0)
    # Reserving the settled id again is a re-run of the step: a new hold, settled once.
    rerun = await budget.reserve(10, holder="a", reservation_id=reservation.id)
    assert rerun.tokens == 10 and (await budget.snapshot()).reserved_tokens == 10
    await rerun.settle(7)
    await other.reservation(reservation.id, 10).settle(7)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (32, 0)


async def test_reserve_is_idempotent_per_reservation_id(ledger: BudgetLedger) -> None:
    """Reserving a live id again renews it and holds nothing more."""
    budget = budget_of(ledger, 100)
    first = await budget.reserve(30, holder="host", reservation_id="step-1")
    again = await budget.reserve(30, holder="host", reservation_id="step-1")
    assert again.id == first.id == "step-1" and again.tokens == 30
    assert (await budget.snapshot()).reserved_tokens == 30


async def test_waits_for_in_flight_reservations_then_is_granted(ledger: BudgetLedger) -> None:
    """A request blocked only by in-flight steps waits, and runs once they settle."""
    budget = budget_of(ledger, 100)
    in_flight = await budget.reserve(70, holder="a")
    waiting = asyncio.create_task(budget.reserve(50, holder="b"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await in_flight.settle(40)
    granted = await asyncio.wait_for(waiting, timeout=10)
    assert granted.tokens == 50
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (40, 50)


async def test_waiter_is_refused_once_settled_usage_leaves_no_room(ledger: BudgetLedger) -> None:
    """A waiting request is refused (not granted) when the settle used up the room."""
    budget = budget_of(ledger, 100)
    in_flight = await budget.reserve(70, holder="a")
    waiting = asyncio.create_task(budget.reserve(50, holder="b"))
    await asyncio.sleep(0.05)
    await in_flight.settle(70)
    with pytest.raises(BudgetExhaustedError, match=r"\(70 / 100 tokens\)"):
        await asyncio.wait_for(waiting, timeout=10)


async def test_refused_at_once_when_consumed_plus_request_exceeds(ledger: BudgetLedger) -> None:
    """A request with consumed + request > limit is refused at once, even with steps in flight."""
    budget = budget_of(ledger, 100)
    await (await budget.reserve(60, holder="a")).settle(60)
    in_flight = await budget.reserve(30, holder="b")
    with pytest.raises(BudgetExhaustedError):
        await asyncio.wait_for(budget.reserve(45, holder="c"), timeout=5)
    # 60 + 35 fits once the in-flight step is gone, so this one waits instead.
    waiting = asyncio.create_task(budget.reserve(35, holder="d"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await in_flight.settle(0)
    assert (await asyncio.wait_for(waiting, timeout=10)).tokens == 35


async def test_account_survives_a_new_budget_object(new_ledger: LedgerFactory) -> None:
    """A new WorkflowBudget for the same workflow id continues the same account."""
    first = budget_of(new_ledger(), 100)
    await (await first.reserve(40, holder="run-1")).settle(30)
    resumed = WorkflowBudget(500, ledger=new_ledger(), workflow_id=first.workflow_id)
    snap = await resumed.snapshot()
    assert (snap.consumed_tokens, snap.limit_tokens) == (30, 100)  # the stored limit wins
    assert resumed.limit_tokens == 100
    await (await resumed.reserve(70, holder="run-2")).settle(70)
    assert (await first.snapshot()).is_exhausted
    await resumed.set_limit(200)
    assert (await first.snapshot()).remaining_tokens == 100
    assert (await first.reserve(100, holder="run-1")).tokens == 100


def test_one_ledger_serves_two_event_loops(ledger: BudgetLedger) -> None:
    """One ledger object works from successive asyncio.run() calls: reserve, settle, read."""
    budget = budget_of(ledger, 100)
    reservation = asyncio.run(budget.reserve(40, holder="run-1"))
    assert asyncio.run(budget.snapshot()).reserved_tokens == 40
    asyncio.run(reservation.settle(30))
    snap = asyncio.run(budget.snapshot())
    assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (30, 0, 70)


async def test_invalid_amounts_are_rejected(ledger: BudgetLedger) -> None:
    """Negative limits, requests and usage are misuse, reported with the value."""
    with pytest.raises(SpecError, match="-5"):
        WorkflowBudget(-5, ledger=ledger)
    budget = budget_of(ledger, 10)
    with pytest.raises(SpecError, match="tokens"):
        await budget.reserve(-1, holder="a")
    reservation = await budget.reserve(5, holder="a")
    with pytest.raises(SpecError, match="used_tokens"):
        await reservation.settle(-3)


def test_snapshot_derives_remaining_and_exhaustion() -> None:
    """Remaining is limit - consumed - reserved (never negative); uncapped has none."""
    assert (
        BudgetSnapshot(consumed_tokens=30, reserved_tokens=20, limit_tokens=100).remaining_tokens
        == 50
    )
    over = BudgetSnapshot(consumed_tokens=120, reserved_tokens=0, limit_tokens=100)
    assert over.remaining_tokens == 0 and over.is_exhausted
    free = BudgetSnapshot(consumed_tokens=5, reserved_tokens=1)
    assert free.remaining_tokens is None and not free.is_exhausted


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_redis_account_survives_the_process(redis_url: str, key_prefix: str) -> None:
    """Tokens charged by another (finished) process are in the account a new host sees."""
    workflow_id = "resumed-run"
    child = _python(
        """
        import asyncio, sys
        from fleet import WorkflowBudget
        from fleet.ledgers import RedisLedger

        async def main():
            ledger = RedisLedger(sys.argv[1], key_prefix=sys.argv[2])
            budget = WorkflowBudget(1000, ledger=ledger, workflow_id=sys.argv[3])
            await (await budget.reserve(300, holder="first-run")).settle(250)
            await ledger.close()

        asyncio.run(main())
        """,
        redis_url,
        key_prefix,
        workflow_id,
    )
    child.communicate(timeout=60)  # waits, and closes its stdout pipe
    assert child.returncode == 0
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    try:
        budget = WorkflowBudget(1000, ledger=ledger, workflow_id=workflow_id)
        snap = await budget.snapshot()
        assert (snap.consumed_tokens, snap.reserved_tokens, snap.remaining_tokens) == (250, 0, 750)
        with pytest.raises(BudgetExhaustedError, match=r"\(250 / 1000 tokens\)"):
            await budget.reserve(800, holder="second-run")
    finally:
        await ledger.close()


async def test_redis_killed_holder_returns_its_tokens(redis_url: str, key_prefix: str) -> None:
    """A process SIGKILLed while holding tokens (renewing them) loses them one lease later."""
    workflow_id = "killed-holder"
    child = _python(
        """
        import asyncio, sys
        from fleet import WorkflowBudget
        from fleet.ledgers import RedisLedger

        async def main():
            ledger = RedisLedger(sys.argv[1], key_prefix=sys.argv[2])
            budget = WorkflowBudget(100, ledger=ledger, workflow_id=sys.argv[3], lease_s=0.5)
            reservation = await budget.reserve(80, holder="doomed")
            async with reservation.kept_alive():
                print("held", flush=True)
                await asyncio.sleep(3600)

        asyncio.run(main())
        """,
        redis_url,
        key_prefix,
        workflow_id,
    )
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.strip() == "held"
        budget = WorkflowBudget(100, ledger=ledger, workflow_id=workflow_id)
        await asyncio.sleep(1.2)  # more than two leases: the live holder keeps renewing
        held = await ledger.reservations(workflow_id)
        assert [(row.holder, row.tokens) for row in held] == [("doomed", 80)]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        granted = await asyncio.wait_for(budget.reserve(60, holder="survivor"), timeout=10)
        assert granted.tokens == 60
        assert (await budget.snapshot()).reserved_tokens == 60
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
        await ledger.close()


def test_cli_set_and_show(redis_url: str, key_prefix: str) -> None:
    """`fleet budget set` stores a limit that `fleet budget show` and a budget then see."""
    from fleet.cli import app

    runner = CliRunner()
    common = ["--redis-url", redis_url, "--key-prefix", key_prefix]
    missing = runner.invoke(app, ["budget", "show", "nightly", *common])
    assert missing.exit_code == 1 and "no budget recorded" in missing.output
    result = runner.invoke(app, ["budget", "set", "nightly", "500", *common])
    assert result.exit_code == 0, result.output
    assert "500" in result.output

    async def spend() -> None:
        ledger = RedisLedger(redis_url, key_prefix=key_prefix)
        budget = WorkflowBudget(None, ledger=ledger, workflow_id="nightly")
        await (await budget.reserve(100, holder="step-a")).settle(120)
        await budget.reserve(50, holder="step-b")  # left in flight
        await ledger.close()

    asyncio.run(spend())
    shown = runner.invoke(app, ["budget", "show", "nightly", *common])
    assert shown.exit_code == 0, shown.output
    for expected in ("500", "120", "50 (1 in flight)", "330", "step-b"):
        assert expected in shown.output
    bad = runner.invoke(app, ["budget", "set", *common, "nightly", "--", "-3"])
    assert bad.exit_code != 0 and "negative" in bad.output
    uncapped = runner.invoke(app, ["budget", "set", "nightly", "none", *common])
    assert uncapped.exit_code == 0 and "uncapped" in uncapped.output
