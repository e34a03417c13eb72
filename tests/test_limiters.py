"""Provider limiters: one contract suite over the memory and the Redis limiter, and admission."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet.agents import AgentContext
from fleet.errors import AgentError
from fleet.events import RateLimited, parse_event
from fleet.limiters import (
    AdmitStatus,
    LimitState,
    MemoryRateLimiter,
    ProviderLimit,
    RateLimiter,
    RedisRateLimiter,
    admit,
)
from fleet.limiters.dispatch import DispatchGate, sendable
from fleet.redis_server import RedisServer
from fleet.spec import AgentStepSpec
from tests.celery_support import until


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[RateLimiter]:
    """The same tests run against the in-process and the fleet-wide limiter."""
    if request.param == "memory":
        yield MemoryRateLimiter()
        return
    redis_limiter = RedisRateLimiter(redis_url, key_prefix=f"fleet-test-{uuid.uuid4().hex[:10]}")
    yield redis_limiter
    await redis_limiter.close()


def _limit(**fields: object) -> ProviderLimit:
    values: dict[str, object] = {"name": f"l-{uuid.uuid4().hex[:6]}", "requests": 3}
    values.update({"tokens": 1000, "window_s": 60.0, **fields})
    return ProviderLimit(**values)  # type: ignore[arg-type]


async def _ask(limiter: RateLimiter, limit: ProviderLimit, tokens: int = 10) -> AdmitStatus:
    result = await limiter.try_admit(limit, uuid.uuid4().hex, tokens, lease_s=30)
    return result.status


async def test_requests_per_window(limiter: RateLimiter) -> None:
    """At most `requests` calls are admitted in one window; the next one is told to wait it out."""
    limit = _limit(requests=3, window_s=30)
    assert [await _ask(limiter, limit) for _ in range(3)] == [AdmitStatus.ADMITTED] * 3
    refused = await limiter.try_admit(limit, "x", 10, lease_s=30)
    assert refused.status is AdmitStatus.WAIT
    assert 29 < refused.wait_s <= 30.6
    state = await limiter.state(limit)
    assert (state.requests, state.tokens) == (3, 30)


def test_one_limiter_serves_two_event_loops(limiter: RateLimiter) -> None:
    """One limiter object works from successive asyncio.run() calls and counts across them."""
    limit = _limit(requests=3, window_s=30)
    assert asyncio.run(_ask(limiter, limit)) is AdmitStatus.ADMITTED
    assert asyncio.run(_ask(limiter, limit)) is AdmitStatus.ADMITTED
    assert asyncio.run(limiter.state(limit)).requests == 2


async def test_tokens_per_window(limiter: RateLimiter) -> None:
    """Token weights count: a call that would overrun the tokens waits though requests are free."""
    limit = _limit(requests=100, tokens=1000)
    assert await _ask(limiter, limit, 600) is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit, 300) is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit, 200) is AdmitStatus.WAIT
    assert await _ask(limiter, limit, 100) is AdmitStatus.ADMITTED
    assert (await limiter.state(limit)).tokens == 1000


async def test_a_limit_of_requests_only_counts_no_tokens(limiter: RateLimiter) -> None:
    """Without `tokens`, any call size fits; only the requests are capped."""
    limit = _limit(requests=2, tokens=None)
    assert await _ask(limiter, limit, 10**9) is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit, 10**9) is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit, 1) is AdmitStatus.WAIT
    assert sendable(limit, await limiter.state(limit), ahead=2) == 2


async def test_a_limit_of_tokens_only_counts_no_requests(limiter: RateLimiter) -> None:
    """Without `requests`, any number of calls fits the tokens; a call too large never does."""
    limit = _limit(requests=None, tokens=1000)
    assert [await _ask(limiter, limit, 10) for _ in range(50)] == [AdmitStatus.ADMITTED] * 50
    assert await _ask(limiter, limit, 600) is AdmitStatus.WAIT
    assert await _ask(limiter, limit, 1001) is AdmitStatus.TOO_LARGE
    assert sendable(limit, LimitState(50, 500, 0, 0.0), ahead=2) > 50


async def test_call_larger_than_window(limiter: RateLimiter) -> None:
    """A call needing more tokens than a whole window allows can never fit."""
    assert await _ask(limiter, _limit(tokens=100), 101) is AdmitStatus.TOO_LARGE


async def test_window_slides(limiter: RateLimiter) -> None:
    """Admissions leave the window after window_s (plus its small guard)."""
    limit = _limit(requests=2, window_s=0.5)
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED
    await asyncio.sleep(0.3)
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED
    waiting = await limiter.try_admit(limit, "w", 10, lease_s=30)
    assert waiting.status is AdmitStatus.WAIT and waiting.wait_s <= 0.25
    await asyncio.sleep(waiting.wait_s + 0.02)
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED
    assert (await limiter.state(limit)).requests == 2


async def test_reconcile_below_estimate_frees_room(limiter: RateLimiter) -> None:
    """A call that spent less than its estimate leaves room for more calls in the same window."""
    limit = _limit(requests=100, tokens=1000)
    first = uuid.uuid4().hex
    assert (await limiter.try_admit(limit, first, 900, lease_s=30)).status is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit, 500) is AdmitStatus.WAIT
    await limiter.reconcile(limit, first, 100)
    assert await _ask(limiter, limit, 500) is AdmitStatus.ADMITTED
    assert (await limiter.state(limit)).tokens == 600


async def test_reconcile_above_estimate_is_charged(limiter: RateLimiter) -> None:
    """A call that spent more than its estimate is charged what it spent."""
    limit = _limit(requests=100, tokens=1000)
    first = uuid.uuid4().hex
    await limiter.try_admit(limit, first, 100, lease_s=30)
    await limiter.reconcile(limit, first, 950)
    assert (await limiter.state(limit)).tokens == 950
    assert await _ask(limiter, limit, 100) is AdmitStatus.WAIT


async def test_pause_stops_admissions(limiter: RateLimiter) -> None:
    """A provider pause admits nothing until it ends; a shorter pause does not shorten it."""
    limit = _limit(requests=100)
    assert await limiter.pause(limit, 0.6) == pytest.approx(0.6, abs=0.05)
    await limiter.pause(limit, 0.1)
    paused = await limiter.try_admit(limit, "p", 10, lease_s=30)
    assert paused.status is AdmitStatus.WAIT and 0.4 < paused.wait_s <= 0.6
    assert (await limiter.state(limit)).paused_s > 0.4
    await asyncio.sleep(paused.wait_s + 0.02)
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED


async def test_max_concurrent_with_leases(limiter: RateLimiter) -> None:
    """In-flight calls are capped; a settled call frees its slot, a lapsed lease frees it too."""
    limit = _limit(requests=100, max_concurrent=2)
    done, crashed = uuid.uuid4().hex, uuid.uuid4().hex
    assert (await limiter.try_admit(limit, done, 10, lease_s=30)).status is AdmitStatus.ADMITTED
    assert (await limiter.try_admit(limit, crashed, 10, lease_s=0.3)).status is (
        AdmitStatus.ADMITTED
    )
    assert await _ask(limiter, limit) is AdmitStatus.WAIT
    await limiter.reconcile(limit, done, 10)
    assert (await limiter.state(limit)).in_flight == 1
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED
    assert await _ask(limiter, limit) is AdmitStatus.WAIT
    await asyncio.sleep(0.35)  # the "crashed" holder never settles: its lease lapses
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED
    assert (await limiter.state(limit)).in_flight == 2


_RACER = """
import asyncio, sys
from fleet.limiters import AdmitStatus, ProviderLimit, RedisRateLimiter

async def race():
    limiter = RedisRateLimiter(sys.argv[1], key_prefix=sys.argv[2])
    limit = ProviderLimit(name=sys.argv[3], requests=37, tokens=10**6)
    answers = await asyncio.gather(
        *(limiter.try_admit(limit, f"{sys.argv[4]}-{i}", 10, lease_s=30) for i in range(25))
    )
    await limiter.close()
    print(sum(a.status is AdmitStatus.ADMITTED for a in answers))

asyncio.run(race())
"""


async def test_redis_admission_is_atomic_across_processes(redis_url: str) -> None:
    """Four processes racing 25 calls each for one limit of 37: exactly 37 admitted."""
    prefix = f"fleet-test-{uuid.uuid4().hex[:10]}"
    limit = _limit(requests=37, tokens=10**6)
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RACER, redis_url, prefix, limit.name, str(n),
            stdout=asyncio.subprocess.PIPE,
        )
        for n in range(4)
    ]  # fmt: skip
    outputs = [await racer.communicate() for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert sum(int(out) for out, _ in outputs) == 37
    state = await RedisRateLimiter(redis_url, key_prefix=prefix).state(limit)
    assert state.requests == 37


def _ctx(**fields: object) -> AgentContext:
    spec = AgentStepSpec(task_id="t1", agent="writer", description="d", prompt="p")
    return AgentContext(spec=spec, **fields)  # type: ignore[arg-type]


async def test_admit_waits_and_reports() -> None:
    """A call that must wait, waits for room, then is admitted with a rate_limited event."""
    limiter, limit = MemoryRateLimiter(), _limit(requests=1, window_s=0.4)
    events: list[object] = []
    ctx = _ctx(limit=limit, limiter=limiter, events=events.append)
    first = await ctx.admit_call(10)
    started = time.monotonic()
    second = await ctx.admit_call(10)
    assert time.monotonic() - started >= 0.35
    assert first.waited_s < 0.05 and second.waited_s >= 0.35
    assert len(events) == 1 and isinstance(events[0], RateLimited)
    assert events[0].limit == limit.name and events[0].wait_s >= 0.35
    assert parse_event(events[0].model_dump_json()) == events[0]


async def test_admit_past_the_deadline_times_out() -> None:
    """A call with no room before the step's deadline waits until then and fails `timeout`."""
    limiter, limit = MemoryRateLimiter(), _limit(requests=1, window_s=30)
    ctx = _ctx(limit=limit, limiter=limiter, deadline=time.monotonic() + 1.5)
    await ctx.admit_call(10)
    with pytest.raises(AgentError) as caught:
        await ctx.admit_call(10)
    assert caught.value.kind == "timeout"
    assert limit.name in str(caught.value) and "1/1 requests" in str(caught.value)
    assert time.monotonic() < ctx.deadline  # type: ignore[operator]
    assert (await limiter.state(limit)).requests == 1


async def test_admit_too_large_names_the_limit() -> None:
    """One call larger than the whole window fails `rate_limit` with a fix in the message."""
    ctx = _ctx(limit=_limit(tokens=50), limiter=MemoryRateLimiter())
    with pytest.raises(AgentError) as caught:
        await ctx.admit_call(51)
    assert caught.value.kind == "rate_limit" and "max_tokens" in str(caught.value)


async def test_no_limit_admits_without_counting() -> None:
    """An agent without a limit is admitted at once and settles to nothing."""
    admission = await _ctx().admit_call(10**9)
    await admission.settle(5)
    assert admission.limiter is None and admission.waited_s == 0


async def test_redis_outage_during_admission_waits_and_never_runs_unadmitted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down while a call asks for admission: it waits, is admitted once Redis is back."""
    server = RedisServer(tmp_path / "redis").start()
    limiter = RedisRateLimiter(server.url, socket_timeout_s=0.5)
    limit = _limit(requests=5)
    try:
        await admit(limiter, limit, 10, deadline=None, lease_s=30, label="warm")
        server.stop()
        ask = asyncio.create_task(
            admit(limiter, limit, 10, deadline=time.monotonic() + 20, lease_s=30, label="x")
        )
        await until(
            lambda: "unreachable" in caplog.text and "waiting to be admitted" in caplog.text,
            10.0,
            "the admission to meet the outage",
        )
        assert not ask.done()  # no admission without the limiter: the call does not run
        server.start()
        admission = await asyncio.wait_for(ask, 15)
        assert admission.admission_id
        # The server restarted empty (no persistence): only this admission is counted.
        assert (await limiter.state(limit)).requests == 1
        server.stop()
        with pytest.raises(AgentError) as caught:
            await admit(limiter, limit, 10, deadline=time.monotonic() + 1.5, lease_s=30, label="y")
        assert caught.value.kind == "timeout" and "unreachable" in str(caught.value)
    finally:
        await limiter.close()
        server.stop()


async def test_reconcile_counts_a_call_from_when_it_left(limiter: RateLimiter) -> None:
    """A call sent late after its admission leaves the window that much later."""
    limit = _limit(requests=1, window_s=0.5)
    late = uuid.uuid4().hex
    assert (await limiter.try_admit(limit, late, 10, lease_s=30)).status is AdmitStatus.ADMITTED
    await limiter.reconcile(limit, late, 10, sent_after_s=0.3)
    await asyncio.sleep(0.56)  # past admission + window + guard, not past sending + window
    assert await _ask(limiter, limit) is AdmitStatus.WAIT
    await asyncio.sleep(0.3)
    assert await _ask(limiter, limit) is AdmitStatus.ADMITTED


def test_sendable_policy() -> None:
    """The dispatcher may send the window's free requests plus `ahead`; none while paused."""
    limit = _limit(requests=10, tokens=100, max_concurrent=4)
    assert sendable(limit, LimitState(3, 50, 1, 0.0), ahead=2) == 3 + 2
    assert sendable(limit, LimitState(8, 50, 0, 0.0), ahead=2) == 2 + 2
    assert sendable(limit, LimitState(3, 100, 0, 0.0), ahead=2) == 2
    assert sendable(limit, LimitState(0, 0, 0, 1.5), ahead=2) == 0


async def test_dispatch_gate_holds_back_steps_of_a_saturated_limit() -> None:
    """The host sends a full window's worth plus `ahead`, then waits for room, not for nothing."""
    limiter, limit = MemoryRateLimiter(), _limit(requests=3, window_s=0.6)
    gate = DispatchGate(limiter, ahead=2, recheck_s=0.05)
    assert max([await gate.turn(limit) for _ in range(5)]) < 0.05
    for _ in range(3):  # the workers admit three of them: the window is full
        await _ask(limiter, limit)
    for _ in range(5):
        gate.finished(limit)
    await asyncio.sleep(0.06)  # the gate's last read is older than recheck_s
    held = [await gate.turn(limit) for _ in range(2)]  # `ahead` may wait in workers
    assert max(held) < 0.2
    started = time.monotonic()
    assert await gate.turn(limit) >= 0.4  # the third only once the window frees
    assert time.monotonic() - started >= 0.4
    assert await gate.turn(None) == 0.0
