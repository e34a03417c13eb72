"""Provider limits on a real fleet: worker processes, Redis, and a provider enforcing its own limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.provider import ProviderProcess
from bench.rate_limits import served, wait_for_requests, window_peaks
from fleet import AgentStepSpec, LocalExecutor, execute_steps_parallel, load_agents
from fleet.cli import app
from fleet.events import RateLimited, StepStarted
from fleet.limiters import ProviderLimit, RedisRateLimiter
from tests.celery_support import (
    BrokerLog,
    fleet_settings,
    running_workers,
    until,
    until_async,
)
from tests.fake_openai import FakeOpenAI, error, reply


def _agents_file(
    tmp_path: Path,
    base_url: str,
    *,
    requests: int,
    tokens: int,
    window_s: float,
    max_tokens: int = 60,
) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(
        f"""
[limits.provider]
requests = {requests}
tokens = {tokens}
window_s = {window_s}

[agents.writer]
kind = "openai"
base_url = "{base_url}"
model = "m"
max_tokens = {max_tokens}
limit = "provider"
max_concurrent = 64
""",
        encoding="utf-8",
    )
    return path


def _specs(count: int, *, timeout_s: float = 90.0, tag: str = "s") -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{tag}{i}", agent="writer", description="d", prompt=f"write {i}",
            timeout_s=timeout_s,
        )
        for i in range(count)
    ]  # fmt: skip


async def _paused(limiter: RedisRateLimiter, limit: ProviderLimit) -> bool:
    return (await limiter.state(limit)).paused_s > 0


def _provider(**settings: object) -> ProviderProcess:
    """The loopback provider in its own process (off this test's GIL), enforcing its limits."""
    return ProviderProcess(**settings)


async def test_fleet_never_overruns_the_provider_window(redis_url: str, tmp_path: Path) -> None:
    """2 workers x 16 threads, more steps than fit in two windows: no 429, every step succeeds."""
    window_s, requests, tokens = 3.0, 8, 600
    with _provider(
        latency_s=0.5,
        completion_tokens=40,
        requests_per_window=requests,
        tokens_per_window=tokens,
        window_s=window_s,
    ) as provider:
        agents = _agents_file(
            tmp_path, provider.base_url, requests=requests, tokens=tokens, window_s=window_s
        )
        settings = fleet_settings(redis_url, agents_file=agents, max_in_flight=64)
        with running_workers(settings, tmp_path, "w1", "w2", concurrency=16) as fleet:
            events: list[object] = []
            async with fleet.executor() as host:
                outcomes = await execute_steps_parallel(host, _specs(30), events=events.append)
            logs = fleet.workers["w1"].log_text() + fleet.workers["w2"].log_text()
        stats = provider.stats()
    assert [o.output for o in outcomes if not o.success] == []
    assert stats["rate_limited"] == 0 and stats["requests"] == 30, "no call refused and retried"
    peak_requests, peak_tokens = window_peaks(stats["log"], window_s)
    assert peak_requests <= requests and peak_tokens <= tokens
    assert sum(tokens for _, tokens in served(stats["log"])) > 2 * tokens, "tokens were binding"
    assert "admitted under limit 'provider' after waiting" in logs
    assert "requests" in logs and "in the last 3 s" in logs
    waits = [e for e in events if isinstance(e, RateLimited)]
    assert waits and all(e.limit == "provider" and e.wait_s >= 0.1 for e in waits)
    assert {e.task_id for e in waits} <= {f"s{i}" for i in range(30)}


async def test_a_429_pauses_the_limit_for_the_whole_fleet(redis_url: str, tmp_path: Path) -> None:
    """After one 429 with Retry-After: 2, no worker sends a call under that limit for 2 s."""
    with FakeOpenAI() as server:
        server.script(error(429, "slow down", headers={"Retry-After": "2"}))
        server.script(*(reply("ok") for _ in range(13)))
        agents = _agents_file(tmp_path, server.base_url, requests=1000, tokens=10**7, window_s=60)
        limit = load_agents(agents)["writer"].limit
        assert limit is not None
        settings = fleet_settings(redis_url, agents_file=agents, max_in_flight=64)
        limiter = RedisRateLimiter(redis_url, key_prefix=settings.key_prefix)
        with running_workers(settings, tmp_path, "w1", "w2", concurrency=8) as fleet:
            async with fleet.executor() as host:
                first = asyncio.create_task(host.execute_step(_specs(1, tag="first")[0]))
                assert await asyncio.to_thread(server.wait_for, lambda s: len(s.requests) >= 1)
                # The 429 reaches the worker, which pauses the limit in Redis for everyone.
                await until_async(
                    lambda: _paused(limiter, limit), 10.0, "the 429 to pause limit 'provider'"
                )
                outcomes = await execute_steps_parallel(host, _specs(12, tag="then"))
                outcomes.append(await first)
        await limiter.close()
    assert all(o.success for o in outcomes), [o.output for o in outcomes if not o.success]
    refused, *later = server.requests
    assert len(later) == 13 and server.pending == 0
    assert min(r.at for r in later) - refused.at >= 2.0 - 0.02


async def test_reconciled_usage_lets_more_calls_through(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Usage far below the estimate: more calls in one window than the estimate alone allows."""
    with (
        _provider(
            requests_per_window=100, tokens_per_window=1000, window_s=30, completion_tokens=5
        ) as provider,
        FakeOpenAI() as fake,
    ):
        limiter = RedisRateLimiter(redis_url, key_prefix=key_prefix)
        path = tmp_path / "agents.toml"
        path.write_text(
            f"""
[limits.provider]
requests = 100
tokens = 1000
window_s = 30

[agents.writer]
kind = "openai"
base_url = "{provider.base_url}"
model = "m"
max_tokens = 400
limit = "provider"

[agents.greedy]
kind = "openai"
base_url = "{fake.base_url}"
model = "m"
max_tokens = 50
limit = "provider"
""",
            encoding="utf-8",
        )
        try:
            host = LocalExecutor(agents=load_agents(path), limiter=limiter, max_concurrency=1)
            started = time.monotonic()
            outcomes = await execute_steps_parallel(host, _specs(8, timeout_s=10))
            elapsed = time.monotonic() - started
            assert all(o.success for o in outcomes), [o.output for o in outcomes]
            # Each call is admitted with ~405 tokens (2 fit in 1000) but spends ~10.
            assert elapsed < 5 and provider.stats(log=False)["requests"] == 8
            limit = load_agents(path)["writer"].limit
            assert limit is not None
            before = (await limiter.state(limit)).tokens
            assert before == sum(t for _, t in served(provider.stats()["log"])) < 200
            fake.script(reply("big", prompt_tokens=500, completion_tokens=400))
            greedy = AgentStepSpec(task_id="g", agent="greedy", description="d", prompt="p")
            assert (await host.execute_step(greedy)).success
            assert (await limiter.state(limit)).tokens == before + 900  # above its estimate
        finally:
            await limiter.close()


async def test_local_host_waits_and_reports_rate_limited(tmp_path: Path) -> None:
    """The embedded host enforces the same limit in memory and emits rate_limited on waits."""
    with _provider(requests_per_window=2, tokens_per_window=10**6, window_s=1.0) as provider:
        agents = load_agents(
            _agents_file(tmp_path, provider.base_url, requests=2, tokens=10**6, window_s=1.0)
        )
        events: list[object] = []
        outcomes = await execute_steps_parallel(
            LocalExecutor(agents=agents), _specs(5, timeout_s=10), events=events.append
        )
        stats = provider.stats()
    assert all(o.success for o in outcomes)
    assert stats["rate_limited"] == 0
    assert window_peaks(stats["log"], 1.0)[0] <= 2
    waits = [e for e in events if isinstance(e, RateLimited)]
    assert len(waits) >= 3 and {e.limit for e in waits} == {"provider"}


@pytest.mark.parametrize("timeout_s", [1.5])
async def test_step_that_cannot_be_admitted_before_its_deadline_fails_timeout(
    tmp_path: Path, timeout_s: float
) -> None:
    """A call whose room opens after the step's deadline fails the step `timeout`, never silently."""
    with _provider(requests_per_window=1, tokens_per_window=10**6, window_s=30) as provider:
        agents = load_agents(
            _agents_file(tmp_path, provider.base_url, requests=1, tokens=10**6, window_s=30)
        )
        outcomes = await execute_steps_parallel(
            LocalExecutor(agents=agents), _specs(3, timeout_s=timeout_s)
        )
        stats = provider.stats(log=False)
    assert sum(o.success for o in outcomes) == 1
    failed = [o for o in outcomes if not o.success]
    assert {o.error for o in failed} == {"timeout"}
    assert all("limit 'provider'" in o.output for o in failed)
    assert stats["requests"] == 1


async def test_limit_reset_while_steps_wait(redis_url: str, tmp_path: Path) -> None:
    """`fleet limits reset` while steps wait for a full window: they go on at once, all succeed."""
    with _provider(requests_per_window=100, tokens_per_window=10**7, window_s=60) as provider:
        agents = _agents_file(tmp_path, provider.base_url, requests=3, tokens=10**6, window_s=60)
        limit = load_agents(agents)["writer"].limit
        assert limit is not None
        settings = fleet_settings(redis_url, agents_file=agents, max_in_flight=64)
        limiter = RedisRateLimiter(redis_url, key_prefix=settings.key_prefix)
        env = {
            "FLEET_REDIS_URL": redis_url,
            "FLEET_KEY_PREFIX": settings.key_prefix,
            "FLEET_AGENTS_FILE": str(agents),
        }
        with running_workers(settings, tmp_path, "w1", concurrency=8) as fleet:
            async with fleet.executor() as host:
                started = time.monotonic()
                with BrokerLog(redis_url) as log:
                    run = asyncio.create_task(execute_steps_parallel(host, _specs(6, timeout_s=50)))
                    assert await asyncio.to_thread(wait_for_requests, provider, 3)
                    # The other three reached a worker and asked the limiter for room.
                    await until(lambda: len(log.admissions()) >= 6, 30.0, "all six to ask")
                    assert (await limiter.state(limit)).requests == 3, "three were admitted"
                    assert provider.stats(log=False)["requests"] == 3, "three steps wait"
                result = await asyncio.to_thread(
                    CliRunner().invoke, app, ["limits", "reset", "provider"], env=env
                )
                assert result.exit_code == 0, result.output
                outcomes = await run
        await limiter.close()
        stats = provider.stats(log=False)
    assert all(o.success for o in outcomes), [o.output for o in outcomes if not o.success]
    assert stats["requests"] == 6 and time.monotonic() - started < 15


async def test_host_does_not_flood_workers_with_steps_of_a_saturated_limit(
    redis_url: str, tmp_path: Path
) -> None:
    """A full window holds steps back at the host: workers get the window's room + `ahead`."""
    with _provider(requests_per_window=6, tokens_per_window=10**7, window_s=2.0) as provider:
        agents = _agents_file(tmp_path, provider.base_url, requests=6, tokens=10**6, window_s=2.0)
        settings = fleet_settings(redis_url, agents_file=agents, max_in_flight=64)
        with running_workers(settings, tmp_path, "w1", concurrency=24) as fleet:
            started: list[float] = []

            def on_event(event: object) -> None:
                if isinstance(event, StepStarted):
                    started.append(time.monotonic())

            async with fleet.executor() as host:
                with BrokerLog(redis_url) as log:
                    run = asyncio.create_task(
                        execute_steps_parallel(host, _specs(24, timeout_s=60), events=on_event)
                    )
                    assert await asyncio.to_thread(wait_for_requests, provider, 6)
                    # Every step the host sent while the window is full (until ~2.2 s) has
                    # reached a worker and asked for room: the host has stopped sending.
                    await until(
                        lambda: len(log.admissions()) >= max(len(log.sends(settings.queue)), 6 + 8),
                        30.0,
                        "every step sent to ask the limiter for room",
                    )
                    early = len(log.sends(settings.queue))
                    outcomes = await run
        stats = provider.stats(log=False)
    assert all(o.success for o in outcomes), [o.output for o in outcomes if not o.success]
    assert early <= 6 + 8, f"{early} steps were sent while the window was full"
    assert len(started) == 24 and stats["requests"] == 24
