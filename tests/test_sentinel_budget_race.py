"""A budget race across a Sentinel failover: 4 processes x 200 cycles, the master killed mid-way.

The processes reserve and settle on one account through a ``sentinel://`` URL while the
master is SIGKILLed and the replica promoted. Each ledger write on Sentinel waits for one
replica (``WAIT 1``), so a write a process saw acknowledged survives the failover, and a
write cut off by it is retried on the new master (reserve and settle are idempotent by
reservation id). What must hold: every cycle completes, the account is never above its
limit (watched throughout), and consumed equals what the processes settled, exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet import WorkflowBudget
from fleet.ledgers import RedisLedger
from fleet.redis_ha import SentinelGroup

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4
CYCLES = 200
LIMIT = 20_000


def _spawn(url: str, prefix: str, seed: int, start_at: float) -> subprocess.Popen[str]:
    # tests.test_budget_race's hammer, with this module's cycle count (CYCLES).
    code = (
        "import sys, tests.test_budget_race as race; "
        f"race.CYCLES = {CYCLES}; race.CONCURRENCY = 4; race.LIMIT = {LIMIT}; "
        "race.main(sys.argv[1:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, url, prefix, "race", str(seed), str(start_at)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(300)
async def test_four_processes_never_overspend_across_a_failover(
    tmp_path: Path, key_prefix: str
) -> None:
    """4 processes x 200 reserve/settle cycles, master killed mid-way: never over the limit."""
    with SentinelGroup(tmp_path / "ha", down_after_ms=1000, failover_timeout_ms=5000) as group:
        url = group.url
        start_at = time.time() + 2.0
        children = [_spawn(url, key_prefix, seed, start_at) for seed in range(PROCESSES)]
        ledger = RedisLedger(url, key_prefix=key_prefix)
        budget = WorkflowBudget(LIMIT, ledger=ledger, workflow_id="race")
        peak, killed = 0, False
        try:
            while any(child.poll() is None for child in children):
                snap = await budget.snapshot()
                peak = max(peak, snap.consumed_tokens + snap.reserved_tokens)
                assert snap.consumed_tokens + snap.reserved_tokens <= LIMIT, snap
                if not killed and snap.consumed_tokens > LIMIT // 4:
                    group.master().kill()
                    killed = True
                await asyncio.sleep(0.005)
            outputs = [child.communicate(timeout=60)[0] for child in children]
            assert [child.returncode for child in children] == [0] * PROCESSES
            totals = [json.loads(out) for out in outputs]
            snap = await budget.snapshot()
        finally:
            for child in children:
                if child.poll() is None:
                    os.kill(child.pid, signal.SIGKILL)
                    child.wait(timeout=10)
            await ledger.close()

    assert killed, "the master was never killed (the race proves nothing)"
    assert sum(t["cycles"] for t in totals) == PROCESSES * CYCLES
    settled = sum(t["settled"] for t in totals)
    drift = snap.consumed_tokens - settled
    print(f"budget race across a failover: peak {peak}/{LIMIT}, drift {drift} tokens")
    assert drift == 0, f"consumed {snap.consumed_tokens} != settled {settled}"
    assert snap.consumed_tokens <= LIMIT and snap.reserved_tokens == 0
    assert peak <= LIMIT
    assert sum(t["refused"] for t in totals) > 0, "the limit was never contended"
