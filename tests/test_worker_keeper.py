"""The worker's one lease thread: step leases, token holds, cancel markers, lapses."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from fleet import WorkflowBudget
from fleet.keeper import Held
from fleet.ledgers import RedisLedger
from fleet.runs import cancel_marker_key
from tests.celery_support import until
from workers.keeper import LeaseKeeper

pytestmark = [pytest.mark.redis]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


async def test_cancel_markers_are_seen_within_2_s_whatever_the_phase(
    redis_url: str, key_prefix: str, client: redis.Redis
) -> None:
    """docs/CANCEL.md: a running step's cancel marker is acted on within 2 s (8 samples)."""
    keeper = LeaseKeeper(redis_url, 10.0, key_prefix)
    keeper.hold(f"{key_prefix}:lease:s", "me")  # starts the thread
    delays = []
    try:
        await watch_markers(keeper, key_prefix, client, delays)
    finally:
        keeper.stop()
    assert max(delays) <= 2.0, f"markers seen after {[round(d, 2) for d in delays]} s"


async def watch_markers(
    keeper: LeaseKeeper, key_prefix: str, client: redis.Redis, delays: list[float]
) -> None:
    """Leave 8 markers at random phases of the thread's turns; note how soon each is seen."""
    for attempt in range(8):
        seen = threading.Event()
        marker = f"m{attempt}"
        keeper.markers.watch(f"step{attempt}", [marker], lambda reason, seen=seen: seen.set())
        await asyncio.sleep(random.uniform(0.0, 0.5))  # any phase of the thread's turns
        client.set(cancel_marker_key(marker, key_prefix=key_prefix), '{"reason": "r"}')
        left = time.monotonic()
        assert await asyncio.to_thread(seen.wait, 10.0)
        delays.append(time.monotonic() - left)


async def test_a_cancel_that_cannot_reach_its_step_leaves_the_thread_serving_the_others(
    redis_url: str, key_prefix: str, client: redis.Redis
) -> None:
    """One step's stop raising (its loop already closed) does not end the lease thread.

    Every lease and cancel marker of the process depends on that one thread: if it died,
    every other running step would stop seeing its cancel and lose its lease.
    """
    key = f"{key_prefix}:lease:kept"
    client.set(key, "me", px=600)
    keeper = LeaseKeeper(redis_url, 0.6, key_prefix)
    held = keeper.hold(key, "me")
    closed = asyncio.new_event_loop()
    closed.close()
    # Both steps watch the same marker: the first one's stop raises RuntimeError.
    keeper.markers.watch("ended", ["run"], functools.partial(closed.call_soon_threadsafe, print))
    seen = threading.Event()
    keeper.markers.watch("running", ["run"], lambda reason: seen.set())
    try:
        client.set(cancel_marker_key("run", key_prefix=key_prefix), '{"reason": "stop"}')
        assert await asyncio.to_thread(seen.wait, 5.0), "the other step's cancel was lost"
        # And its leases are still renewed: a later marker is seen, the lease outlives 0.6 s.
        later = threading.Event()
        keeper.markers.watch("later", ["later"], lambda reason: later.set())
        renewed_at = held.expires_at
        client.set(cancel_marker_key("later", key_prefix=key_prefix), '{"reason": "stop"}')
        assert await asyncio.to_thread(later.wait, 5.0), "the lease thread died"
        await until(lambda: held.expires_at > renewed_at + 0.6, 5.0, "two more renewals")
        assert not held.lapsed and client.get(key) == b"me"
    finally:
        keeper.stop()


async def test_a_step_lease_taken_by_another_owner_is_reported_lapsed(
    redis_url: str, key_prefix: str, client: redis.Redis
) -> None:
    """Redis no longer holds the lease for us: the hook runs once and renewals stop."""
    key = f"{key_prefix}:lease:t"
    client.set(key, "me", px=600)
    keeper = LeaseKeeper(redis_url, 0.6, key_prefix)
    lapses: list[Held] = []
    held = keeper.hold(key, "me", on_lapse=lapses.append)
    try:
        await asyncio.sleep(0.9)  # renewed past its first 0.6 s
        assert client.pttl(key) > 0
        client.set(key, "someone-else", px=60_000)
        await until(lambda: held.lapsed, 5.0, "the lapse")
    finally:
        keeper.stop()
    assert lapses == [held] and keeper.held() == 0
    assert client.get(key) == b"someone-else"


async def test_the_thread_renews_a_ledger_reservation_until_it_is_dropped(
    redis_url: str, key_prefix: str
) -> None:
    """A token hold kept by the worker's thread outlives several leases, and lapses once dropped."""
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    keeper = LeaseKeeper(redis_url, 10.0, key_prefix)
    budget = WorkflowBudget(
        1000, ledger=ledger, workflow_id=f"wf-{uuid.uuid4().hex[:8]}", lease_s=0.3, keeper=keeper
    )
    try:
        reservation = await budget.reserve(70, holder="step")
        async with reservation.kept_alive() as held:
            await asyncio.sleep(1.2)  # four leases: only the thread's renewals keep it
            assert (await budget.snapshot()).reserved_tokens == 70
        assert not held.lapsed and keeper.held() == 0
        for _ in range(100):  # it lapses one lease after the drop
            if (await budget.snapshot()).reserved_tokens == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the dropped hold never lapsed")
    finally:
        keeper.stop()
        await ledger.close()
