"""Redis (AOF on, ``appendfsync everysec``) restarted in the middle of a round.

What can be lost, and the bound this scenario proves with per-step run counters:

* **SIGTERM** (a clean restart): Redis rewrites nothing away; it fsyncs the AOF on
  shutdown, so no acknowledged write is lost. A step whose worker tried to record its
  outcome while Redis was down cannot record it; its lease lapses and the host re-sends
  it, so it runs a second time.
* **SIGKILL** (a crash): everything written in the last second or so before the kill may
  be lost (``everysec`` fsyncs once a second; Redis documents up to 2 s in the worst
  case): task messages (the host re-sends a step nobody claims within
  ``claim_timeout_s``), queue pops (a message comes back: its lease or recorded result
  stops a second run), leases and recorded outcomes (a step that had just finished
  may run once more) and reply notices (the host finds the recorded outcome, or re-sends).
* The bound: every step ends successfully, no step runs more than **twice**, and only a
  step whose first run was in flight during the outage or started within the AOF loss
  window (2 s plus one step before a SIGKILL; one step before a SIGTERM) runs twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fleet import StepOutcome, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.events import StepFinished
from fleet.redis_server import RedisServer
from tests.celery_support import until
from tests.faults.support import (
    attempts,
    fresh_redis,
    fresh_workers,
    run_trials,
    specs,
    trial_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults, pytest.mark.slow]

STEPS = 120
STEP_SLEEP_S = 0.2
CONCURRENCY = 4
CLAIM_TIMEOUT_S = 2.0
STEP_LEASE_S = 1.5
DOWNTIME_S = 0.5
AOF_LOSS_WINDOW_S = 2.0
"""Redis documents that ``appendfsync everysec`` may lose up to 2 s of writes on a crash."""


def restart(server: RedisServer, how: str) -> tuple[float, float]:
    """Stop the server (``SIGKILL`` or ``SIGTERM``), wait, start it again: same port and dir."""
    down_at = time.time()
    if how == "SIGKILL":
        server.kill()
    else:
        server.stop()
    time.sleep(DOWNTIME_S)
    server.start()
    return down_at, time.time()


async def one_trial(how: str, directory: Path) -> str:
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), "FLEET_TEST_STEP_SLEEP": str(STEP_SLEEP_S)}
    with fresh_redis(directory, appendonly=True) as server:
        settings = trial_settings(
            server.url,
            claim_timeout_s=CLAIM_TIMEOUT_S,
            step_lease_s=STEP_LEASE_S,
            max_in_flight=2 * CONCURRENCY * 2,
        )
        names = ["worker1", "worker2"]
        with fresh_workers(settings, directory, names, concurrency=CONCURRENCY, env=env) as fleet:
            executor = CeleryExecutor(settings=settings)
            finished: dict[str, float] = {}

            def sink(event: object) -> None:
                if isinstance(event, StepFinished):
                    finished[event.task_id] = time.time()

            round_ = asyncio.create_task(
                execute_steps_parallel(executor, specs(STEPS, "r"), events=sink)
            )
            try:
                await until(lambda: len(finished) >= STEPS // 3, 60, "a third of the round")
                down_at, up_at = await asyncio.to_thread(restart, server, how)
                try:
                    outcomes: list[StepOutcome] = await asyncio.wait_for(round_, timeout=90)
                except TimeoutError:
                    open_steps = sorted({f"r{i}" for i in range(STEPS)} - set(finished))
                    logs = {w.name: w.log_text()[-1500:] for w in fleet.workers.values()}
                    alive = {w.name: w.process.poll() is None for w in fleet.workers.values()}
                    raise AssertionError(
                        f"the round did not finish 90 s after the restart; open: {open_steps}, "
                        f"ran: { {t: len(attempts(counter_dir).get(t, [])) for t in open_steps} }"
                        f", workers alive: {alive}, logs: {logs}"
                    ) from None
                ended_at = time.time()
            finally:
                if not round_.done():
                    round_.cancel()
                    await asyncio.gather(round_, return_exceptions=True)
                await executor.aclose()
            alive = [w.name for w in fleet.workers.values() if w.process.poll() is None]
            dead_logs = {
                w.name: w.log_text()[-3000:]
                for w in fleet.workers.values()
                if w.process.poll() is not None
            }

    failed = [(o.task_id, o.error, o.output[:200]) for o in outcomes if not o.success]
    assert not failed, f"steps failed after the Redis restart: {failed[:5]}"
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(STEPS)]
    assert alive == names, f"workers died (alive: {alive}): {dead_logs}"
    ran = attempts(counter_dir)
    assert set(ran) == {f"r{i}" for i in range(STEPS)}
    too_many = {task: len(runs) for task, runs in ran.items() if len(runs) > 2}
    assert not too_many, f"steps ran more than twice: {too_many}"
    twice = {task for task, runs in ran.items() if len(runs) == 2}
    window = (AOF_LOSS_WINDOW_S if how == "SIGKILL" else 0.0) + STEP_SLEEP_S + 0.1
    early = {
        task: down_at - ran[task][0].at for task in twice if ran[task][0].at < down_at - window
    }
    assert not early, f"steps that had finished well before the outage ran again: {early}"
    late = {task for task in twice if ran[task][0].at > up_at}
    assert not late, f"steps first started after Redis was back ran twice: {late}"
    # The outage must have hit work in flight: steps a worker had started before Redis
    # went down whose outcome reached the host only after it went down.
    overlapped = {t for t, runs in ran.items() if runs[0].at < down_at < finished[t]}
    assert overlapped, "no step was in flight when Redis went down (the trial proves nothing)"
    return (
        f"{how}: down {up_at - down_at:.2f} s with {len(overlapped)} steps in flight, round "
        f"done {ended_at - up_at:.2f} s after restart, {len(twice)} step(s) ran twice"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_redis_restart_mid_round(how: str, tmp_path: Path) -> None:
    """Restart Redis mid-round: workers and host reconnect, the round completes, ≤ 2 runs."""
    await run_trials(f"redis_restart_{how.lower()}", 3, tmp_path, lambda n, d: one_trial(how, d))
