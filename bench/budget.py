"""Cost of the hard budget: reserve + settle on Redis versus a plain GET + SET pair.

One client on loopback Redis: median and p99 latency of ``WorkflowBudget.reserve`` +
``Reservation.settle`` (two EVALSHA round trips) holding tokens *and* dollars, for a
workflow alone and for a workflow under two ancestor accounts (team under org, every
account capped, so each script checks and updates three accounts); of the same two
ledger scripts called directly; and of a plain ``GET`` + ``SET`` pair (two round trips,
the floor). Then throughput with 8 client processes, one sequential loop each.
Target: reserve + settle ≤ 2x the plain pair, also with two ancestors.

    python -m bench.budget [--ops 5000] [--repeat 3] [--processes 8] [--redis-url URL]

Without ``--redis-url`` it starts its own redis-server on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from bench._common import median, percentile, table, write
from fleet import WorkflowBudget
from fleet.accounts import set_account
from fleet.ledgers import RedisLedger
from fleet.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PLAIN = "plain GET+SET"
FLEET = "fleet reserve+settle"
NESTED = "fleet reserve+settle, 2 ancestors"
SCRIPTS = "ledger scripts only"

Op = Callable[[], Awaitable[None]]


async def _sides(url: str, prefix: str) -> tuple[dict[str, Op], Callable[[], Awaitable[None]]]:
    """The operations to time, and a function that closes their connections."""
    client = aioredis.Redis.from_url(url)
    key = f"{prefix}:plain"
    await client.set(key, "0")
    ledger = RedisLedger(url, key_prefix=prefix)
    big = 10**12  # capped accounts (so every limit is checked) that never run out
    await set_account(ledger, "org:bench", limit_tokens=big, limit_usd=big // 10**6)
    await set_account(
        ledger, "team:bench", limit_tokens=big, limit_usd=big // 10**6, parents=["org:bench"]
    )
    budget = WorkflowBudget(
        big, limit_usd=10**6, ledger=ledger, workflow_id=f"bench-{uuid.uuid4().hex[:8]}"
    )
    nested = WorkflowBudget(
        big,
        limit_usd=10**6,
        parents=["team:bench"],
        ledger=ledger,
        workflow_id=f"bench-{uuid.uuid4().hex[:8]}",
    )
    raw_wf = f"raw-{uuid.uuid4().hex[:8]}"
    counter = iter(range(10**12))

    async def plain() -> None:
        value = await client.get(key)
        await client.set(key, value or b"0")

    async def fleet() -> None:
        reservation = await budget.reserve(100, holder="bench", micros=2500)
        await reservation.settle(60, used_micros=1234)

    async def fleet_nested() -> None:
        reservation = await nested.reserve(100, holder="bench", micros=2500)
        await reservation.settle(60, used_micros=1234)

    async def scripts() -> None:
        rid = f"r{next(counter)}"
        await ledger.reserve(raw_wf, rid, 100, holder="bench", lease_s=30.0, initial_limit=None)
        await ledger.settle(raw_wf, rid, 60)

    async def close() -> None:
        await ledger.close()
        await client.aclose()

    return {PLAIN: plain, FLEET: fleet, NESTED: fleet_nested, SCRIPTS: scripts}, close


async def latency(url: str, prefix: str, ops: int, repeat: int) -> dict[str, list[float]]:
    """Per-call latencies in microseconds, sides alternating in blocks."""
    sides, close = await _sides(url, prefix)
    samples: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for op in sides.values():  # warm up connections and script caches
            for _ in range(200):
                await op()
        for _ in range(repeat):
            for name, op in sides.items():
                gc.collect()
                bucket = samples[name]
                for _ in range(ops):
                    started = time.perf_counter()
                    await op()
                    bucket.append((time.perf_counter() - started) * 1e6)
    finally:
        await close()
    return samples


async def _child(url: str, prefix: str, side: str, ops: int, start_at: float) -> dict[str, float]:
    sides, close = await _sides(url, prefix)
    op = sides[side]
    try:
        for _ in range(100):
            await op()
        await asyncio.sleep(max(start_at - time.time(), 0))
        started = time.time()
        for _ in range(ops):
            await op()
        return {"start": started, "end": time.time(), "ops": ops}
    finally:
        await close()


def throughput(url: str, prefix: str, side: str, processes: int, ops: int) -> float:
    """Aggregate operations per second of ``processes`` clients looping ``side``."""
    start_at = time.time() + 1.5
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.budget",
                "--child",
                side,
                url,
                prefix,
                str(ops),
                str(start_at),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"benchmark child {child.pid} failed with {child.returncode}")
        results.append(json.loads(out))
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["ops"] for r in results) / elapsed


def main() -> None:
    """Measure latency and throughput of both sides and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000, help="calls per side per repetition")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, url, prefix, ops, start_at = args.child
        result = asyncio.run(_child(url, prefix, side, int(ops), float(start_at)))
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        server = None if args.redis_url else RedisServer(tmp).start()
        url = args.redis_url or server.url  # type: ignore[union-attr]
        prefix = f"fleet-bench-{uuid.uuid4().hex[:8]}"
        try:
            samples = asyncio.run(latency(url, prefix, args.ops, args.repeat))
            per_process = max(args.ops // 2, 500)
            rates = {
                side: throughput(url, prefix, side, args.processes, per_process)
                for side in (PLAIN, FLEET, NESTED)
            }
        finally:
            if server is not None:
                server.stop()

    rows = [
        {
            "side": name,
            "median_us": median(values),
            "p99_us": percentile(values, 99),
            f"throughput_{args.processes}proc_ops_s": rates.get(name),
        }
        for name, values in samples.items()
    ]
    floor = median(samples[PLAIN])
    ratio = median(samples[FLEET]) / floor
    p99_ratio = percentile(samples[FLEET], 99) / percentile(samples[PLAIN], 99)
    throughput_ratio = rates[PLAIN] / rates[FLEET]
    nested_ratio = median(samples[NESTED]) / floor
    nested_p99_ratio = percentile(samples[NESTED], 99) / percentile(samples[PLAIN], 99)
    nested_throughput_ratio = rates[PLAIN] / rates[NESTED]
    print(table(rows))
    print(
        f"\nreserve+settle / GET+SET: median {ratio:.2f}x, p99 {p99_ratio:.2f}x, "
        f"throughput cost {throughput_ratio:.2f}x (target ≤ 2x)"
        f"\nwith 2 ancestors:         median {nested_ratio:.2f}x, p99 {nested_p99_ratio:.2f}x, "
        f"throughput cost {nested_throughput_ratio:.2f}x (target ≤ 2x)"
    )
    command = (
        f"python -m bench.budget --ops {args.ops} --repeat {args.repeat} "
        f"--processes {args.processes}"
    )
    path = write(
        "budget",
        command,
        rows,
        median_ratio=ratio,
        p99_ratio=p99_ratio,
        throughput_ratio=throughput_ratio,
        nested_median_ratio=nested_ratio,
        nested_p99_ratio=nested_p99_ratio,
        nested_throughput_ratio=nested_throughput_ratio,
        target_ratio=2.0,
        samples_per_side=args.ops * args.repeat,
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
