"""kill -9 the host process half-way through a resumable workflow; resume from a new one.

Each trial: its own redis-server and two workers. A child process runs
``execute_steps_parallel_resumable`` on a ``CeleryExecutor`` with a
``RedisCheckpointStore``; once half the steps are journaled it is SIGKILLed while steps are
still running on the workers. A second process resumes the same workflow id. Every step
must run exactly once: journaled steps are served from the journal, steps that were
running are re-attached to (their lease, then their done-marker) instead of being sent
again, and the rest run. What the hosts send is counted at Redis (a MONITOR connection,
``tests.celery_support.BrokerLog``): the workers' de-duplication would hide a re-sent step
from the run counters, so the trial asserts that no step in flight at the kill was sent
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fleet import StepOutcome
from fleet.config import FleetSettings
from fleet.redis.keys import Keys
from fleet.stores import RedisCheckpointStore
from tests.celery_support import REPO, BrokerLog, step_ids, until
from tests.faults.support import (
    attempts,
    fresh_redis,
    fresh_workers,
    process_env,
    run_trials,
    trial_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults, pytest.mark.slow]

TRIALS = 3
STEPS = 40
STEP_SLEEP_S = 0.3
CONCURRENCY = 3


@contextlib.contextmanager
def host_process(
    settings: FleetSettings, workflow_id: str, out: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child host running the resumable round (stopped by PID on exit if still running)."""
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faults.resumable_host",
                workflow_id,
                str(STEPS),
                str(out),
            ],
            cwd=REPO,
            env=process_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def step_states(
    url: str, settings: FleetSettings, workflow_id: str, tids: dict[str, str]
) -> dict[str, str]:
    """Step task id -> ``done`` (its done-marker is set) or ``running`` (a lease is held)."""
    client = redis.Redis.from_url(url)
    record = Keys(settings.key_prefix).steps(workflow_id)
    try:
        states = {}
        for task, tid in tids.items():
            if client.hexists(record, f"done:{tid}"):
                states[task] = "done"
            elif client.exists(f"{settings.key_prefix}:lease:{tid}"):
                states[task] = "running"
        return states
    finally:
        client.close()


async def journaled(store: RedisCheckpointStore, workflow_id: str) -> set[str]:
    checkpoint = await store.load(workflow_id)
    return set() if checkpoint is None else set(checkpoint.completed())


async def one_trial(directory: Path) -> str:
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), "FLEET_TEST_STEP_SLEEP": str(STEP_SLEEP_S)}
    workflow_id = f"wf-{directory.name}"
    first_out, second_out = directory / "first.json", directory / "second.json"
    with fresh_redis(directory) as server, BrokerLog(server.url) as log:
        # A lease long enough that a worker starved of CPU keeps its steps: a lapsed
        # lease would (rightly) be re-sent, which is not what this trial is about.
        settings = trial_settings(server.url, claim_timeout_s=2.0, step_lease_s=5.0)
        store = RedisCheckpointStore(settings.redis_url, key_prefix=settings.key_prefix)
        names = ["worker1", "worker2"]
        try:
            with fresh_workers(settings, directory, names, concurrency=CONCURRENCY, env=env):
                with host_process(settings, workflow_id, first_out, directory / "host1.log") as h1:
                    done: set[str] = set()

                    async def half_journaled() -> bool:
                        done.update(await journaled(store, workflow_id))
                        return len(done) >= STEPS // 2

                    deadline = time.monotonic() + 60
                    while not await half_journaled():
                        assert h1.poll() is None, (directory / "host1.log").read_text()[-3000:]
                        assert time.monotonic() < deadline, "the first host never got half-way"
                        await asyncio.sleep(0.02)
                    os.killpg(h1.pid, signal.SIGKILL)
                    h1.wait(timeout=10)
                    killed_at = time.time()
                journal_at_kill = await journaled(store, workflow_id)
                started_at_kill = set(attempts(counter_dir))
                # Started but not journaled: running, or finished unheard by the dead host.
                in_flight = started_at_kill - journal_at_kill
                assert not first_out.exists(), "the first host finished before it was killed"
                at_resume = step_states(
                    server.url, settings, workflow_id, step_ids(log, settings.queue)
                )
                with host_process(settings, workflow_id, second_out, directory / "host2.log") as h2:
                    await until(lambda: h2.poll() is not None, 60, "the resumed host to finish")
                    assert h2.returncode == 0, (directory / "host2.log").read_text()[-3000:]
                    resumed_done_at = time.time()
                    resumed_in = resumed_done_at - killed_at
                left_journal = await journaled(store, workflow_id)
        finally:
            await store.close()

    outcomes = [StepOutcome.from_dict(o) for o in json.loads(second_out.read_text())]
    assert all(o.success for o in outcomes), [o for o in outcomes if not o.success][:3]
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(STEPS)]
    assert in_flight, "no step was in flight when the host died (the trial proves nothing)"
    runs = {task: len(r) for task, r in attempts(counter_dir).items()}
    assert runs == {f"h{i}": 1 for i in range(STEPS)}, {t: n for t, n in runs.items() if n != 1}
    tids, sends = step_ids(log, settings.queue), log.sends(settings.queue)
    resent = {
        task: at_resume.get(task, "queued")
        for task in in_flight
        if any(killed_at < at < resumed_done_at for at in sends[tids[task]])
    }
    assert not resent, f"the resumed host sent steps in flight at the kill again: {resent}"
    assert not left_journal, "the journal outlived a fully successful round"
    return (
        f"killed with {len(journal_at_kill)} journaled and {len(in_flight)} started but not "
        f"journaled; "
        f"resumed round done {resumed_in:.2f} s after the kill, every step ran once"
    )


@pytest.mark.timeout(300)
async def test_host_killed_and_resumed(tmp_path: Path) -> None:
    """SIGKILL the host mid-workflow; a new process resumes it: every step runs once."""
    await run_trials("host_kill", TRIALS, tmp_path, lambda n, d: one_trial(d))
