"""kill -9 one of three workers while a 300-step round is half done.

Each trial: its own redis-server, three workers (threads pool, 4 threads each), 300 steps
of 200 ms. When half the round has finished, the victim's next steps hang (see
``agents.attempt``) and, once one does, the victim is SIGKILLed: always mid-step. The round must complete with every step successful; no step that had
completed runs again; only steps in flight on the victim run a second time (at most its
concurrency); and the host re-sends each of them as the recovery bound of docs/CELERY.md
says, checked part by part on Redis's own clock (a MONITOR connection, see
``tests.celery_support.BrokerLog``): the dead worker's lease is not renewed after its
death, the step is not re-sent while the lease lives, and it is re-sent on the host's
first look at the lapsed lease. The wall-clock time to the re-send is reported, not
asserted: on a loaded 2-core runner the host's checks come round late, which is
scheduling, not a broken bound.

    max(step_lease_s, claim_timeout_s) + check_interval
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fleet import StepOutcome, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.events import StepFinished
from tests.celery_support import (
    BrokerLog,
    check_resent_at_first_check_after_lapse,
    step_ids,
    until,
)
from tests.faults.support import (
    attempts,
    fresh_redis,
    fresh_workers,
    run_trials,
    specs,
    trial_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults, pytest.mark.slow]

TRIALS = 3
STEPS = 300
STEP_SLEEP_S = 0.2
CONCURRENCY = 4
CLAIM_TIMEOUT_S = 2.0
STEP_LEASE_S = 1.0
MAX_IN_FLIGHT = 24


def recovery_bound_s(executor: CeleryExecutor) -> float:
    """docs/CELERY.md: a dead worker's step is sent again within this after it dies."""
    settings = executor.settings
    return max(settings.step_lease_s, settings.claim_timeout_s) + executor.check_interval_s


async def one_trial(directory: Path) -> str:
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), "FLEET_TEST_STEP_SLEEP": str(STEP_SLEEP_S)}
    names = ["worker1", "worker2", "worker3"]
    with fresh_redis(directory) as server, BrokerLog(server.url) as log:
        settings = trial_settings(
            server.url,
            claim_timeout_s=CLAIM_TIMEOUT_S,
            step_lease_s=STEP_LEASE_S,
            max_in_flight=MAX_IN_FLIGHT,
        )
        with fresh_workers(settings, directory, names, concurrency=CONCURRENCY, env=env) as fleet:
            victim = fleet.workers["worker2"].node
            survivors = {fleet.workers[name].node for name in ("worker1", "worker3")}
            executor = CeleryExecutor(settings=settings)
            finished: dict[str, str] = {}

            def sink(event: object) -> None:
                if isinstance(event, StepFinished):
                    finished[event.task_id] = event.worker

            hang = counter_dir / f"~hang-{victim}"
            round_ = asyncio.create_task(
                execute_steps_parallel(executor, specs(STEPS, "w"), events=sink)
            )
            try:
                await until(lambda: len(finished) >= STEPS // 2, 90, "half the round done")
                # From now on the victim's steps stay in flight until it dies: the kill is
                # always mid-step (a victim that just finished its steps proves nothing).
                hang.touch()
                await until(
                    lambda: any(counter_dir.glob("~hung-*")), 60, "a step stuck on the victim"
                )
                finished_before = set(finished)
                killed_at = time.time()
                await asyncio.to_thread(fleet.kill, "worker2")
                dead_at = time.time()  # reaped: nothing of the victim runs after this
                # The victim is gone: every step it ever started is on disk now.
                started_on_victim = {
                    task
                    for task, runs in attempts(counter_dir).items()
                    if any(a.worker == victim for a in runs)
                }
                in_flight = started_on_victim - finished_before
                outcomes: list[StepOutcome] = await asyncio.wait_for(round_, timeout=90)
                ended_at = time.time()
            finally:
                if not round_.done():
                    round_.cancel()
                    await asyncio.gather(round_, return_exceptions=True)
                await executor.aclose()

    assert all(o.success for o in outcomes), [o for o in outcomes if not o.success][:3]
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(STEPS)]
    ran = attempts(counter_dir)
    assert set(ran) == {f"w{i}" for i in range(STEPS)}, "a step never ran"
    rerun = {task for task in finished_before if len(ran[task]) != 1}
    assert not rerun, f"steps completed before the kill ran again: {sorted(rerun)}"
    twice = {task for task, runs in ran.items() if len(runs) > 1}
    assert all(len(ran[task]) == 2 for task in twice), {t: ran[t] for t in twice}
    assert twice <= in_flight, f"re-run steps not in flight on the victim: {twice - in_flight}"
    assert 1 <= len(twice) <= CONCURRENCY, f"{len(twice)} steps ran twice: {sorted(twice)}"
    stuck = {p.name[len("~hung-") :] for p in counter_dir.glob("~hung-*")}
    assert stuck <= twice, f"steps stuck on the victim did not run again: {stuck - twice}"
    for task in twice:
        first, second = ran[task]
        assert first.worker == victim and second.worker in survivors, ran[task]
        assert outcomes[int(task[1:])].worker == second.worker
    # The documented bound, part by part on Redis's clock (see the module docstring).
    tids = step_ids(log, settings.queue)
    for task in twice:
        check_resent_at_first_check_after_lapse(log, settings, tids[task], dead_at)
    sends = log.sends(settings.queue)
    resent_after = max(sends[tids[task]][1] for task in twice) - killed_at
    rerun_started = max(ran[task][1].at for task in twice) - killed_at
    return (
        f"{len(in_flight)} in flight on the victim, {len(twice)} ran twice; last re-sent "
        f"{resent_after:.2f} s after the kill (bound {recovery_bound_s(executor):.3f} s), "
        f"re-run started {rerun_started:.2f} s after, round done {ended_at - killed_at:.2f} s after"
    )


@pytest.mark.timeout(300)
async def test_worker_killed_half_way(tmp_path: Path) -> None:
    """SIGKILL a worker half-way through 300 steps: only its in-flight steps run again."""
    await run_trials("worker_kill", TRIALS, tmp_path, lambda n, d: one_trial(d))
