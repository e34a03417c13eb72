"""Race test on real Redis: many processes hammering one ledger never overspend it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fleet import WorkflowBudget
from fleet.errors import BudgetExhaustedError
from fleet.ledgers import RedisLedger

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 8
CYCLES = 500
CONCURRENCY = 16
LIMIT = 100_000


async def _hammer(url: str, prefix: str, workflow_id: str, seed: int, start_at: float) -> dict:
    """One process: CYCLES reserve/settle cycles, CONCURRENCY at a time, random sizes."""
    rng = random.Random(seed)
    ledger = RedisLedger(url, key_prefix=prefix)
    budget = WorkflowBudget(LIMIT, ledger=ledger, workflow_id=workflow_id)
    totals = {"settled": 0, "granted": 0, "refused": 0, "cycles": 0}
    remaining = CYCLES

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            size = rng.randint(1, 200)
            used = size if rng.random() < 0.3 else rng.randint(0, size)
            try:
                reservation = await budget.reserve(size, holder=f"p{seed}")
            except BudgetExhaustedError:
                totals["refused"] += 1
            else:
                await asyncio.sleep(rng.random() * 0.002)
                await reservation.settle(used)
                if rng.random() < 0.1:  # a retried settle must not charge twice
                    await reservation.settle(used)
                totals["granted"] += 1
                totals["settled"] += used
            totals["cycles"] += 1

    await asyncio.sleep(max(start_at - time.time(), 0))
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(worker())
    finally:
        await ledger.close()
    return totals


def main(argv: list[str]) -> None:
    """Child process entry point: print this process's totals as JSON."""
    url, prefix, workflow_id, seed, start_at = argv
    totals = asyncio.run(_hammer(url, prefix, workflow_id, int(seed), float(start_at)))
    print(json.dumps(totals), flush=True)


def _spawn(
    url: str, prefix: str, workflow_id: str, seed: int, start_at: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.test_budget_race import main; main(sys.argv[1:])",
            url,
            prefix,
            workflow_id,
            str(seed),
            str(start_at),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_eight_processes_never_overspend_and_charge_exactly(
    redis_url: str, key_prefix: str
) -> None:
    """8 processes x 500 reserve/settle cycles: never above the limit, charges add up exactly."""
    workflow_id = "race"
    start_at = time.time() + 2.0  # all children start hammering at the same moment
    children = [
        _spawn(redis_url, key_prefix, workflow_id, seed, start_at) for seed in range(PROCESSES)
    ]
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    budget = WorkflowBudget(LIMIT, ledger=ledger, workflow_id=workflow_id)
    peak = 0
    try:
        # Watch the account while the children run: held + charged never passes the limit.
        while any(child.poll() is None for child in children):
            snap = await budget.snapshot()
            peak = max(peak, snap.consumed_tokens + snap.reserved_tokens)
            assert snap.consumed_tokens + snap.reserved_tokens <= LIMIT
            await asyncio.sleep(0.005)
        outputs = [child.communicate(timeout=30)[0] for child in children]
        assert [child.returncode for child in children] == [0] * PROCESSES
        totals = [json.loads(out) for out in outputs]
        snap = await budget.snapshot()
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
        await ledger.close()

    assert sum(t["cycles"] for t in totals) == PROCESSES * CYCLES
    settled = sum(t["settled"] for t in totals)
    assert snap.consumed_tokens == settled
    assert snap.consumed_tokens <= LIMIT and snap.reserved_tokens == 0
    assert peak <= LIMIT
    # The limit was really contended: some requests were refused, most were granted.
    assert sum(t["refused"] for t in totals) > 0
    assert sum(t["granted"] for t in totals) > PROCESSES * CYCLES // 4
    # Refusals only happen near the limit: what is left is less than the largest request.
    assert LIMIT - snap.consumed_tokens < 200
