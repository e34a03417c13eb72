"""Provider limits under load: fleet's shared limit vs every worker retrying 429s on its own.

Workers (``--workers`` x ``--threads``) run ``--steps`` steps of an OpenAI-compatible
agent against ``bench/provider.py`` in its own process, which enforces
``--requests`` and ``--tokens`` per ``--window-s`` sliding window and answers after
``--latency-s``. The same load runs twice on the same Redis and workers' code:

* ``fleet limit``: the agent names a ``[limits.NAME]`` at the provider's numbers;
* ``no limit``: no fleet limit; each call retries 429s with backoff (``Retry-After``
  honoured) as before this feature.

Reported per run: provider 429s, failed steps, wall time, achieved request rate over
the limit (calls the provider served in the ``k`` whole windows from the first call,
over ``k * requests``; the 0.25 s window guard alone costs 2.5 % of a 10 s window), and
the provider's busiest sliding window. Admission latency (p50/p99 of one admission that
did not wait: one Lua script round trip) is measured separately, from ``--workers``
processes x ``--threads`` concurrent callers admitting against a limit with room, with
the script's own time on the Redis server (``INFO commandstats``).

    python -m bench.rate_limits                      # the issue's numbers
    python -m bench.rate_limits --steps 200 --requests 40   # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench._common import percentile, table, write
from bench.provider import ProviderProcess
from fleet import AgentStepSpec, execute_steps_parallel
from fleet.redis_server import RedisServer
from tests.celery_support import CeleryWorkers, fleet_settings

_AGENTS = """
[limits.provider]
requests = {requests}
tokens = {tokens}
window_s = {window_s}

[agents.limited]
kind = "openai"
base_url = "{base_url}"
model = "bench"
max_tokens = {max_tokens}
limit = "provider"

[agents.unlimited]
kind = "openai"
base_url = "{base_url}"
model = "bench"
max_tokens = {max_tokens}
"""


def served(log: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """``(arrival, tokens)`` of every call the provider admitted (``bench.provider``'s log)."""
    return sorted((e["mono"], e["total_tokens"]) for e in log if e.get("admitted"))


def window_peaks(log: list[dict[str, Any]], window_s: float) -> tuple[int, int]:
    """The most requests and the most tokens any sliding window of ``window_s`` held."""
    calls = served(log)
    peak_requests = peak_tokens = tokens = start = 0
    for end, (at, cost) in enumerate(calls):
        tokens += cost
        while calls[start][0] <= at - window_s:
            tokens -= calls[start][1]
            start += 1
        peak_requests = max(peak_requests, end - start + 1)
        peak_tokens = max(peak_tokens, tokens)
    return peak_requests, peak_tokens


def wait_for_requests(provider: ProviderProcess, count: int, timeout_s: float = 30.0) -> bool:
    """Block until the provider has received ``count`` requests (``False`` on timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if provider.stats(log=False)["requests"] >= count:
            return True
        time.sleep(0.02)
    return False


def _specs(agent: str, n: int, timeout_s: float) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{agent}-{i}", agent=agent, description="bench", prompt=f"item {i}",
            timeout_s=timeout_s,
        )
        for i in range(n)
    ]  # fmt: skip


async def _run(
    workers: CeleryWorkers, provider: ProviderProcess, agent: str, args: argparse.Namespace
) -> dict[str, Any]:
    provider.reset()
    started = time.monotonic()
    async with workers.executor(max_in_flight=args.steps) as host:
        outcomes = await execute_steps_parallel(
            host, _specs(agent, args.steps, args.step_timeout_s)
        )
    wall = time.monotonic() - started
    stats = provider.stats()
    log = stats["log"]
    arrivals = [at for at, _ in served(log)]
    windows = max(int((arrivals[-1] - arrivals[0]) // args.window_s), 1) if arrivals else 1
    in_windows = sum(t < arrivals[0] + windows * args.window_s for t in arrivals)
    peak_requests, peak_tokens = window_peaks(log, args.window_s)
    failed = [o for o in outcomes if not o.success]
    if args.timeline:
        first = log[0]["mono"] if log else 0.0
        print(" ".join(f"{e['mono'] - first:.2f}{'' if e.get('admitted') else '!'}" for e in log))
    return {
        "run": "fleet limit" if agent == "limited" else "no limit",
        "steps": args.steps,
        "failed": len(failed),
        "failed_kinds": ",".join(sorted({o.error or "" for o in failed})) or "-",
        "provider_429": stats["rate_limited"],
        "served": len(arrivals),
        "wall_s": round(wall, 1),
        "rate_over_limit": round(in_windows / (windows * args.requests), 3),
        "peak_requests": f"{peak_requests}/{args.requests}",
        "peak_tokens": f"{peak_tokens}/{args.tokens}",
    }


_LATENCY = """
import asyncio, sys, time, uuid, json
from fleet.limiters import ProviderLimit, RedisRateLimiter

async def main():
    url, prefix, callers, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    limiter = RedisRateLimiter(url, key_prefix=prefix)
    limit = ProviderLimit(name="latency", requests=10**9, tokens=10**12, window_s=10)
    times = []
    async def caller():
        for _ in range(calls):
            t = time.perf_counter()
            result = await limiter.try_admit(limit, uuid.uuid4().hex, 100, lease_s=60)
            times.append(time.perf_counter() - t)
            assert result.status.name == "ADMITTED"
            await asyncio.sleep(0.01)
    await asyncio.gather(*(caller() for _ in range(callers)))
    await limiter.close()
    print(json.dumps(times))

asyncio.run(main())
"""


def _admission_latency(redis_url: str, processes: int, callers: int, calls: int) -> dict[str, Any]:
    prefix = f"bench-latency-{time.time_ns()}"
    client = redis.Redis.from_url(redis_url)
    client.config_resetstat()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LATENCY, redis_url, prefix, str(callers), str(calls)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        )
        for _ in range(processes)
    ]  # fmt: skip
    times: list[float] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        times += json.loads(out)
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    client.close()
    return {
        "admissions": len(times),
        "callers": f"{processes}x{callers}",
        "p50_ms": round(percentile(times, 50) * 1000, 3),
        "p99_ms": round(percentile(times, 99) * 1000, 3),
        "goal_p99_ms": 2.0,
        "server_us_per_script": stats.get("usec_per_call"),
    }


async def main() -> None:
    """Run both cases and the latency probe; print the tables, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=3600)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--latency-s", type=float, default=1.0)
    parser.add_argument("--completion-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--step-timeout-s", type=float, default=180.0)
    parser.add_argument("--skip-unlimited", action="store_true")
    parser.add_argument("--latency-only", action="store_true", help="only the latency probe")
    parser.add_argument("--timeline", action="store_true", help="print provider arrivals")
    args = parser.parse_args()
    provider = ProviderProcess(
        latency_s=args.latency_s,
        completion_tokens=args.completion_tokens,
        requests_per_window=args.requests,
        tokens_per_window=args.tokens,
        window_s=args.window_s,
    )
    with tempfile.TemporaryDirectory() as tmp, provider:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            agents = Path(tmp) / "agents.toml"
            agents.write_text(
                _AGENTS.format(base_url=provider.base_url, **vars(args)), encoding="utf-8"
            )
            settings = fleet_settings(
                server.url, agents_file=agents, max_in_flight=args.steps, claim_timeout_s=600.0
            )
            workers = CeleryWorkers(settings, Path(tmp), concurrency=args.threads)
            try:
                rows = []
                if not args.latency_only:
                    workers.start(*(f"bench{i}" for i in range(args.workers)))
                    rows.append(await _run(workers, provider, "limited", args))
                if not args.skip_unlimited and not args.latency_only:
                    await asyncio.sleep(args.window_s)  # let the provider's window empty
                    rows.append(await _run(workers, provider, "unlimited", args))
            finally:
                workers.stop()
            latency = [
                _admission_latency(server.url, 1, 1, 500),
                _admission_latency(server.url, args.workers, args.threads, 20),
            ]
        finally:
            server.stop()
    if rows:
        print(table(rows))
        print()
    print(table(latency))
    command = "python -m bench.rate_limits " + " ".join(sys.argv[1:])
    name = "rate_limits_latency" if args.latency_only else "rate_limits"
    path = write(name, command.strip(), rows, admission_latency=latency, args=vars(args))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
