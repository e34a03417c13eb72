"""Keepers renew leases for their holders; a holder's exit never waits on a renewal."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet import WorkflowBudget
from fleet.keeper import Held, LoopKeeper, renewal_timeout
from fleet.ledgers import BudgetLedger, MemoryLedger, RedisLedger
from fleet.redis_server import RedisServer
from tests.celery_support import until

EXIT_BOUND_S = 1.0
"""A step's exit returns within this long of its body (issue 25)."""


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[BudgetLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    ledger = RedisLedger(request.getfixturevalue("redis_url"), key_prefix=key_prefix)
    yield ledger
    await ledger.close()


def budget_of(ledger: BudgetLedger, **options: float) -> WorkflowBudget:
    return WorkflowBudget(10**9, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex[:8]}", **options)


async def test_leaving_kept_alive_never_waits_on_a_renewal_in_flight(ledger: BudgetLedger) -> None:
    """200 exits while renewals are in flight (every 10 ms) each return within 1 s; 0 reserved."""
    budget = budget_of(ledger, lease_s=0.3)
    loop = asyncio.get_running_loop()

    async def step() -> float:
        reservation = await budget.reserve(10, holder="step")
        async with reservation.kept_alive(every_s=0.01):
            await asyncio.sleep(random.uniform(0.010, 0.013))
            body_ended = loop.time()
        left = loop.time() - body_ended
        await reservation.settle(1)
        return left

    for attempt in range(200):
        task = asyncio.create_task(step())
        done, _ = await asyncio.wait({task}, timeout=EXIT_BOUND_S + 2.0)
        assert done, f"exit {attempt + 1} of 200 did not return (a renewal outlived its step)"
        assert task.result() <= EXIT_BOUND_S
    snapshot = await budget.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (200, 0)
    keeper = budget.keeper()
    assert isinstance(keeper, LoopKeeper) and len(keeper) == 0


async def test_a_reservation_the_ledger_no_longer_holds_is_reported_lapsed(
    ledger: BudgetLedger,
) -> None:
    """Settled elsewhere while kept: the keeper marks it lapsed, stops, and calls the hook once."""
    budget = budget_of(ledger, lease_s=0.3)
    reservation = await budget.reserve(10, holder="step")
    lapses: list[Held] = []
    async with reservation.kept_alive(on_lapse=lapses.append) as held:
        await budget.reservation(reservation.id, 10).settle(3)  # another holder of the same id
        await until(lambda: held.lapsed, 5.0, "the lapse")
        await asyncio.sleep(0.2)  # two more renewal periods: nothing more is reported
    assert lapses == [held]
    assert "no longer holds it" in held.lapse_reason
    assert (await budget.snapshot()).consumed_tokens == 3


async def test_a_reservation_settled_by_its_holder_is_not_a_lapse(ledger: BudgetLedger) -> None:
    """Settling inside the block is the normal end: nothing is reported lapsed."""
    budget = budget_of(ledger, lease_s=0.3)
    reservation = await budget.reserve(10, holder="step")
    lapses: list[Held] = []
    async with reservation.kept_alive(every_s=0.02, on_lapse=lapses.append) as held:
        await reservation.settle(4)
        await asyncio.sleep(0.3)
    assert lapses == [] and not held.lapsed


async def test_kept_alive_exits_at_once_and_reports_the_lapse_when_redis_hangs(
    tmp_path: Path,
) -> None:
    """Redis stopped (SIGSTOP) mid-renewal: the exit is immediate, the lapse is reported in time."""
    server = RedisServer(tmp_path).start()
    ledger = RedisLedger(server.url, key_prefix="hang")
    try:
        budget = budget_of(ledger, lease_s=0.6)
        reservation = await budget.reserve(10, holder="step")
        loop = asyncio.get_running_loop()
        async with reservation.kept_alive(every_s=0.05) as held:
            await asyncio.sleep(0.2)  # renewed a few times
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            stopped_at = loop.time()
            await until(lambda: held.lapsed, 5.0, "the lapse")
            noticed = loop.time() - stopped_at
            body_ended = loop.time()
        assert loop.time() - body_ended <= EXIT_BOUND_S
        # The documented bound (fleet/keeper.py): lease + renewal interval + one
        # renewal's timeout after the last renewal that got through.
        assert noticed <= 0.6 + 0.05 + renewal_timeout(0.6)
        assert "not renewed within its 0.6 s lease" in held.lapse_reason
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        await ledger.close()
        server.stop()
