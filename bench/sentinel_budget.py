"""The budget benchmark on Sentinel: what ``WAIT 1`` after each ledger write costs.

One client, sequential ``reserve`` + ``settle`` (each one EVALSHA round trip) on:

* a single ``redis://`` node (no replica, no WAIT): the floor;
* a Sentinel group (master + 1 replica + 3 sentinels on loopback) through its
  ``sentinel://`` URL with WAIT 1 after every write (what fleet does on Sentinel);
* the same group with the WAIT switched off (``ledger.replicated = False``), to separate
  the cost of WAIT from the cost of the sentinel-managed client.

Median and p99 of one reserve+settle cycle, and cycles/s.

    python -m bench.sentinel_budget [--ops 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench._common import median, percentile, table, write
from fleet import WorkflowBudget
from fleet.ledgers import RedisLedger
from fleet.redis_ha import SentinelGroup
from fleet.redis_server import RedisServer


async def _cycles(url: str, ops: int, *, wait: bool) -> dict[str, float]:
    ledger = RedisLedger(url, key_prefix=f"bench-{uuid.uuid4().hex[:8]}")
    ledger.replicated = ledger.replicated and wait
    budget = WorkflowBudget(10**12, ledger=ledger, workflow_id="bench")
    for _ in range(50):  # warm up: scripts loaded, connections open
        await (await budget.reserve(100, holder="b")).settle(60)
    times = []
    started = time.perf_counter()
    for _ in range(ops):
        t0 = time.perf_counter()
        reservation = await budget.reserve(100, holder="b")
        await reservation.settle(60)
        times.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    unacked = ledger.unreplicated_writes
    await ledger.close()
    return {
        "median_ms": median(times),
        "p99_ms": percentile(times, 99),
        "cycles_per_s": ops / elapsed,
        "unreplicated_writes": unacked,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the three sides, print the table, write ``bench/results/sentinel_budget.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with RedisServer(Path(tmp) / "single", appendonly=True) as single:
            result = asyncio.run(_cycles(single.url, args.ops, wait=False))
            rows.append({"setup": "single redis:// node", **result})
        with SentinelGroup(Path(tmp) / "ha") as group:
            result = asyncio.run(_cycles(group.url, args.ops, wait=True))
            rows.append({"setup": "sentinel://, WAIT 1 after writes (fleet)", **result})
            result = asyncio.run(_cycles(group.url, args.ops, wait=False))
            rows.append({"setup": "sentinel://, no WAIT", **result})
    print(table(rows))
    command = "python -m bench.sentinel_budget " + " ".join(argv or sys.argv[1:])
    print(write("sentinel_budget", command.strip(), rows))


if __name__ == "__main__":
    main()
