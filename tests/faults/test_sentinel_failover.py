"""Sentinel failover in the middle of a round: ``kill -9`` the master, the replica takes over.

A trial runs 300 steps of 200 ms on 2 workers (8 threads each) under a budget on a
Sentinel group (1 master, 1 replica, 3 sentinels, AOF on both data nodes), everything
reached through one ``sentinel://`` URL. Half-way through it SIGKILLs the master. What
must hold:

* the round completes and every step succeeds (no step is lost);
* no step that had completed before the kill runs again, counted per task id by the
  agent itself (outside Redis); only steps in flight at the kill, or finished in the
  replication window just before it, may run twice;
* the budget ledger never shows ``consumed`` above its limit, and nothing stays reserved;
* the time from the kill to the sentinels' promotion and to the round's completion is
  reported (not asserted).

The second scenario starts with the first sentinel of the URL down (celery#5538).
``FLEET_FAILOVER_TRIALS`` sets the number of trials (1 by default, so the suite stays short;
``bench/failover.py`` runs 3 and writes the table).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from fleet import StepOutcome, WorkflowBudget, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.config import mask_url
from fleet.events import StepFinished
from fleet.ledgers import RedisLedger
from fleet.redis_ha import SentinelGroup
from tests.celery_support import sockets_to, until
from tests.faults.support import attempts, fresh_workers, run_trials, specs, trial_settings

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults, pytest.mark.slow]

STEPS = 300
STEP_SLEEP_S = 0.2
CONCURRENCY = 8
CLAIM_TIMEOUT_S = 3.0
STEP_LEASE_S = 10.0
"""Longer than a failover (promotion took 3.1-3.6 s here): with fencing a worker stops a
step whose lease lapses, and a step stopped mid-run is charged again when it re-runs."""
DOWN_AFTER_MS = 1000
"""The sentinels call the master down after 1 s of silence (Redis's default is 30 s)."""
TOKENS_PER_STEP = 10
LIMIT = STEPS * TOKENS_PER_STEP + 50
TRIALS = int(os.environ.get("FLEET_FAILOVER_TRIALS", "1"))


async def one_trial(directory: Path, *, first_sentinel_down: bool) -> dict[str, float | int]:
    """Run one failover trial; return its measurements (asserting what must hold)."""
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {
        "FLEET_TEST_COUNTER_DIR": str(counter_dir),
        "FLEET_TEST_STEP_SLEEP": str(STEP_SLEEP_S),
        "FLEET_TEST_STEP_TOKENS": str(TOKENS_PER_STEP),
    }
    group = SentinelGroup(
        directory / "ha", password="failover-pw", down_after_ms=DOWN_AFTER_MS,
        failover_timeout_ms=5000,
    )  # fmt: skip
    with group:
        if first_sentinel_down:
            group.sentinels[0].kill()
        url = group.url
        assert "failover-pw" not in mask_url(url)
        settings = trial_settings(
            url,
            claim_timeout_s=CLAIM_TIMEOUT_S,
            step_lease_s=STEP_LEASE_S,
            max_in_flight=2 * CONCURRENCY * 2,
        )
        ledger = RedisLedger(url, key_prefix=settings.key_prefix)
        budget = WorkflowBudget(LIMIT, ledger=ledger, workflow_id="failover")
        peak = 0
        names = ["worker1", "worker2"]
        with fresh_workers(settings, directory, names, concurrency=CONCURRENCY, env=env) as fleet:
            executor = CeleryExecutor(settings=settings, budget=budget)
            finished: dict[str, float] = {}

            def sink(event: object) -> None:
                if isinstance(event, StepFinished):
                    finished[event.task_id] = time.time()

            round_specs = [
                spec.model_copy(update={"max_tokens": TOKENS_PER_STEP})
                for spec in specs(STEPS, "f", agent="attempt_charged")
            ]
            round_ = asyncio.create_task(execute_steps_parallel(executor, round_specs, events=sink))
            try:
                await until(lambda: len(finished) >= STEPS // 2, 120, "half the round")
                old = group.master()
                killed_at = time.time()
                old.kill()
                watch = asyncio.create_task(
                    asyncio.to_thread(group.wait_for_new_master, old.port, 60)
                )
                while not watch.done():
                    snap = await budget.snapshot()
                    peak = max(peak, snap.consumed_tokens)
                    await asyncio.sleep(0.2)
                await watch
                promoted_at = time.time()
                try:
                    outcomes: list[StepOutcome] = await asyncio.wait_for(round_, timeout=120)
                except TimeoutError:
                    open_steps = sorted({f"f{i}" for i in range(STEPS)} - set(finished))
                    logs = {w.name: w.log_text()[-2000:] for w in fleet.workers.values()}
                    raise AssertionError(
                        f"the round did not finish 120 s after the failover; open: "
                        f"{open_steps[:20]}, logs: {logs}"
                    ) from None
                ended_at = time.time()
            finally:
                if not round_.done():
                    round_.cancel()
                    await asyncio.gather(round_, return_exceptions=True)
                await executor.aclose()
            alive = [w.name for w in fleet.workers.values() if w.process.poll() is None]
        snap = await budget.snapshot()
        await ledger.close()
        # Everything this host opened across the failover is closed, not left to the GC.
        ports = [node.port for node in group.nodes] + [s.port for s in group.sentinels]
        left = {port: sockets_to(port) for port in ports}
        assert not any(left.values()), f"connections left open (port: count): {left}"

    failed = [(o.task_id, o.error, o.output[:200]) for o in outcomes if not o.success]
    assert not failed, f"steps failed across the failover: {failed[:5]}"
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(STEPS)]
    assert alive == names, f"workers died across the failover (alive: {alive})"
    ran = attempts(counter_dir)
    assert set(ran) == {f"f{i}" for i in range(STEPS)}, "a step never ran"
    too_many = {task: len(runs) for task, runs in ran.items() if len(runs) > 2}
    assert not too_many, f"steps ran more than twice: {too_many}"
    twice = {task for task, runs in ran.items() if len(runs) == 2}
    # Completed well before the kill (its outcome reached the host more than a replication
    # window plus a step earlier): must never run again.
    done_before = {t for t, at in finished.items() if at < killed_at - 1.0 - STEP_SLEEP_S}
    rerun_done = sorted(twice & done_before)
    assert not rerun_done, f"steps completed before the kill ran again: {rerun_done}"
    peak = max(peak, snap.consumed_tokens)
    assert peak <= LIMIT and snap.consumed_tokens <= LIMIT, (peak, snap)
    assert snap.reserved_tokens == 0, snap
    # The ledger's drift: tokens charged beyond the one charge per step the round made.
    drift = snap.consumed_tokens - STEPS * TOKENS_PER_STEP
    return {
        "promote_s": promoted_at - killed_at,
        "complete_s": ended_at - killed_at,
        "in_flight": sum(1 for t, at in finished.items() if at > killed_at),
        "twice": len(twice),
        "drift": drift,
    }


def note(result: dict[str, float | int]) -> str:
    """The one-line summary of a trial."""
    return (
        f"master killed: promoted in {result['promote_s']:.2f} s, round done "
        f"{result['complete_s']:.2f} s after the kill, {result['in_flight']} steps finished "
        f"after it, {result['twice']} step(s) ran twice, ledger drift {result['drift']} tokens"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("first_down", [False, True], ids=["all_sentinels", "first_sentinel_down"])
async def test_master_killed_mid_round(first_down: bool, tmp_path: Path) -> None:
    """Kill -9 the master half-way: the round completes, nothing completed runs again."""
    scenario = "sentinel_failover" + ("_first_sentinel_down" if first_down else "")

    async def trial(n: int, directory: Path) -> str:
        return note(await one_trial(directory, first_sentinel_down=first_down))

    await run_trials(scenario, TRIALS, tmp_path, trial)
