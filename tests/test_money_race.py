"""Race on real Redis: processes spending dollars in 4 workflows under one team account."""

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
from fleet.accounts import set_account
from fleet.errors import BudgetExhaustedError
from fleet.ledgers import RedisLedger

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 8
CYCLES = 500
CONCURRENCY = 16
WORKFLOWS = [f"race-usd-{i}" for i in range(4)]
TEAM = "team:race"
TEAM_LIMIT = 400_000  # micro-dollars: $0.40
WORKFLOW_LIMIT = 150_000  # each; together more than the team's, so both limits bind


async def _hammer(url: str, prefix: str, seed: int, start_at: float) -> dict[str, dict[str, int]]:
    """One process: CYCLES reserve/settle cycles over the 4 workflows, random dollar sizes."""
    rng = random.Random(seed)
    ledger = RedisLedger(url, key_prefix=prefix)
    budgets = [
        WorkflowBudget(limit_usd="0.15", parents=[TEAM], ledger=ledger, workflow_id=name)
        for name in WORKFLOWS
    ]
    totals = {name: {"settled": 0, "granted": 0, "refused": 0, "cycles": 0} for name in WORKFLOWS}
    remaining = CYCLES

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            budget = rng.choice(budgets)
            mine = totals[budget.workflow_id]
            size = rng.randint(1, 900)
            used = size if rng.random() < 0.3 else rng.randint(0, size)
            try:
                reservation = await budget.reserve(0, holder=f"p{seed}", micros=size)
            except BudgetExhaustedError:
                mine["refused"] += 1
            else:
                await asyncio.sleep(rng.random() * 0.002)
                await reservation.settle(0, used_micros=used)
                if rng.random() < 0.1:  # a retried settle must not charge twice
                    await reservation.settle(0, used_micros=used)
                mine["granted"] += 1
                mine["settled"] += used
            mine["cycles"] += 1

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
    url, prefix, seed, start_at = argv
    print(json.dumps(asyncio.run(_hammer(url, prefix, int(seed), float(start_at)))), flush=True)


def _spawn(url: str, prefix: str, seed: int, start_at: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.test_money_race import main; main(sys.argv[1:])",
            url,
            prefix,
            str(seed),
            str(start_at),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_eight_processes_four_workflows_one_team_never_overspend(
    redis_url: str, key_prefix: str
) -> None:
    """8 processes x 500 cycles, 4 workflows, 1 team: never over a limit, charges exact."""
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    await set_account(ledger, TEAM, limit_usd="0.40")
    start_at = time.time() + 2.0  # all children start hammering at the same moment
    children = [_spawn(redis_url, key_prefix, seed, start_at) for seed in range(PROCESSES)]
    peaks = dict.fromkeys([TEAM, *WORKFLOWS], 0)
    limits = {TEAM: TEAM_LIMIT, **dict.fromkeys(WORKFLOWS, WORKFLOW_LIMIT)}
    try:
        # Watch every account while the children run: held + charged never passes its limit.
        while any(child.poll() is None for child in children):
            for name in peaks:
                state = await ledger.state(name)
                held = state.consumed_micros + state.reserved_micros
                peaks[name] = max(peaks[name], held)
                assert held <= limits[name], (name, held)
            await asyncio.sleep(0.005)
        outputs = [child.communicate(timeout=30)[0] for child in children]
        assert [child.returncode for child in children] == [0] * PROCESSES
        totals = [json.loads(out) for out in outputs]
        states = {name: await ledger.state(name) for name in peaks}
        children_usage = {c.workflow_id: c.micros for c in await ledger.children(TEAM)}
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
        await ledger.close()

    assert sum(t[w]["cycles"] for t in totals for w in WORKFLOWS) == PROCESSES * CYCLES
    settled = {w: sum(t[w]["settled"] for t in totals) for w in WORKFLOWS}
    for name in WORKFLOWS:
        assert states[name].consumed_micros == settled[name]
        assert states[name].consumed_micros <= WORKFLOW_LIMIT
        assert states[name].reserved_micros == 0
        assert children_usage.get(name, 0) == settled[name]
    team = states[TEAM]
    assert team.consumed_micros == sum(settled.values()) <= TEAM_LIMIT
    assert team.reserved_micros == 0
    assert all(peaks[name] <= limits[name] for name in peaks)
    # The limits were really contended: requests were refused, and the team ran nearly dry.
    assert sum(t[w]["refused"] for t in totals for w in WORKFLOWS) > 0
    assert TEAM_LIMIT - team.consumed_micros < 900 or all(
        WORKFLOW_LIMIT - states[w].consumed_micros < 900 for w in WORKFLOWS
    )
