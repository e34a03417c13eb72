"""Faults on the fleet: a worker killed mid-round, duplicated and lost messages, a host restart.

Every step here is ``count_where``: it appends the worker's node name to
``<counter dir>/<task id>``, so a test sees exactly how many times each step ran and where.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, StepOutcome, execute_pipeline, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.events import StepFinished
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import RedisCheckpointStore
from tests import pipeline_stages
from tests.celery_support import REPO, CeleryWorkers, fleet_settings, running_workers, until
from tests.faults.support import process_env

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults]

STEP_SLEEP_S = 0.4
CLAIM_TIMEOUT_S = 1.5
STEP_LEASE_S = 1.0


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


def start(redis_url: str, directory: Path, counter_dir: Path) -> Any:
    settings = fleet_settings(
        redis_url, claim_timeout_s=CLAIM_TIMEOUT_S, step_lease_s=STEP_LEASE_S, max_in_flight=8
    )
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), "FLEET_TEST_STEP_SLEEP": str(STEP_SLEEP_S)}
    return running_workers(settings, directory, "worker1", "worker2", concurrency=3, env=env)


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, counter_dir: Path
) -> Iterator[CeleryWorkers]:
    """Two workers shared by the tests that do not kill one."""
    with start(redis_url, tmp_path_factory.mktemp("workers"), counter_dir) as fleet:
        yield fleet


@pytest.fixture
def doomed_workers(redis_url: str, tmp_path: Path, counter_dir: Path) -> Iterator[CeleryWorkers]:
    """Two workers of this test's own: it kills one."""
    with start(redis_url, tmp_path, counter_dir) as fleet:
        yield fleet


FIRST_HOST = """
import asyncio, sys
from fleet.celery import CeleryExecutor
from fleet.config import load_settings
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import RedisCheckpointStore
from tests.test_celery_faults import specs

async def main():
    settings = load_settings()
    store = RedisCheckpointStore(settings.redis_url, key_prefix=sys.argv[1])
    async with CeleryExecutor(settings=settings) as executor:
        await execute_steps_parallel_resumable(executor, specs(6, "r"), "wf-reattach", store)

asyncio.run(main())
"""
"""The first host of the re-attach test, run as a child process that the test kills."""


def start_first_host(workers: CeleryWorkers, key_prefix: str) -> subprocess.Popen[bytes]:
    """Start :data:`FIRST_HOST` (in its own process group, for the kill)."""
    return subprocess.Popen(
        [sys.executable, "-c", FIRST_HOST, key_prefix],
        cwd=REPO,
        env=process_env(workers.settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def where_ran(counter_dir: Path, prefix: str) -> dict[str, list[str]]:
    """Task id -> the node of every run, in order (steps whose id starts with ``prefix``)."""
    return {
        p.name: p.read_text().splitlines()
        for p in counter_dir.iterdir()
        if p.name.startswith(prefix)
    }


def specs(n: int, prefix: str = "s") -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{prefix}{i}", agent="count_where", description="counted", prompt=f"p{i}"
        )
        for i in range(n)
    ]


def recovery_bound_s(executor: CeleryExecutor) -> float:
    """The documented bound (docs/CELERY.md) on how long a dead worker's steps stay stuck."""
    settings = executor.settings
    return max(settings.claim_timeout_s, settings.step_lease_s) + executor.check_interval_s


async def test_worker_killed_mid_round(doomed_workers: CeleryWorkers, counter_dir: Path) -> None:
    """SIGKILL a worker mid-round: nothing lost, only its in-flight steps run twice.

    The round completes; steps that had completed never run again.
    """
    workers = doomed_workers
    executor = workers.executor()
    victim = workers.workers["worker2"].node
    finished_before_kill: set[str] = set()
    finished: set[str] = set()

    def sink(event: Any) -> None:
        if isinstance(event, StepFinished):
            finished.add(event.task_id)

    round_ = asyncio.create_task(execute_steps_parallel(executor, specs(24, "k"), events=sink))
    # Wait until the victim is mid-step and some steps have already completed.
    await until(
        lambda: (
            len(finished) >= 3
            and any(victim in runs for runs in where_ran(counter_dir, "k").values())
        )
    )
    finished_before_kill = set(finished)
    killed_at = time.monotonic()
    await asyncio.to_thread(workers.kill, "worker2")
    # Nothing runs on the victim any more: these are the steps it took down with it.
    on_victim = {t for t, runs in where_ran(counter_dir, "k").items() if runs == [victim]}

    # The broker alone would restore the lost messages only after its visibility timeout
    # (900 s here); the host must recover on its own, within the documented bound plus
    # the time the survivor needs to run what is left.
    left = 24 - len(finished_before_kill)
    budget_s = recovery_bound_s(executor) + left * STEP_SLEEP_S + 20
    outcomes: list[StepOutcome] = await asyncio.wait_for(round_, timeout=budget_s)
    recovered_in = time.monotonic() - killed_at
    await executor.aclose()

    assert [o.output for o in outcomes] == [f"p{i}" for i in range(24)]
    assert all(o.success for o in outcomes)
    ran = where_ran(counter_dir, "k")
    assert set(ran) == {f"k{i}" for i in range(24)}  # no step lost
    for task in finished_before_kill:
        assert len(ran[task]) == 1, f"{task} completed before the kill but ran again"
    twice = {task for task, runs in ran.items() if len(runs) > 1}
    assert twice <= on_victim - finished_before_kill  # only what was in flight on the victim
    assert len(twice) <= 3  # the victim ran three steps at a time
    survivor = workers.workers["worker1"].node
    for task in twice:
        assert ran[task] == [victim, survivor]
        assert outcomes[int(task[1:])].worker == survivor
    assert recovered_in < budget_s


async def test_worker_killed_mid_pipeline(doomed_workers: CeleryWorkers, counter_dir: Path) -> None:
    """SIGKILL a worker while Celery chains run: every chain finishes, no link is lost."""
    workers = doomed_workers
    executor = workers.executor()
    victim = workers.workers["worker2"].node
    items = [f"x{i}" for i in range(12)]
    run = asyncio.create_task(
        execute_pipeline(executor, items, [pipeline_stages.counted, pipeline_stages.counted])
    )
    await until(lambda: any(victim in runs for runs in where_ran(counter_dir, "c").values()))
    await asyncio.to_thread(workers.kill, "worker2")
    on_victim = {t for t, runs in where_ran(counter_dir, "c").items() if runs == [victim]}
    outcomes = await asyncio.wait_for(run, timeout=recovery_bound_s(executor) + 60)
    await executor.aclose()
    assert [o.output if o else None for o in outcomes] == [f"{item}/2" for item in items]
    ran = where_ran(counter_dir, "c")
    assert set(ran) == {f"c{stage}-{item}" for item in items for stage in (1, 2)}
    twice = {task for task, runs in ran.items() if len(runs) > 1}
    assert twice <= on_victim
    assert all(len(runs) <= 2 for runs in ran.values())


async def test_duplicated_message_runs_the_agent_once(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """Every task message is delivered twice: each agent still runs exactly once."""

    class Duplicating(CeleryExecutor):
        async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
            await super()._send(signatures, as_group=as_group)
            await super()._send([s.clone() for s in signatures], as_group=as_group)

    executor = Duplicating(settings=workers.settings)
    try:
        outcomes = await execute_steps_parallel(executor, specs(10, "d"))
    finally:
        await executor.aclose()
    assert all(o.success for o in outcomes)
    await asyncio.sleep(STEP_SLEEP_S * 2)  # let the duplicates reach the workers
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "d").items()} == {
        f"d{i}": 1 for i in range(10)
    }


async def test_lost_message_is_resent_after_the_claim_timeout(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """A message that never reaches a worker is re-sent under the same id and runs once."""
    dropped: list[str] = []

    class Lossy(CeleryExecutor):
        async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
            kept = []
            for signature in signatures:
                if " l1 " in signature.options["argsrepr"] and not dropped:
                    dropped.append(signature.id)  # swallowed, as by a SIGKILLed consumer
                else:
                    kept.append(signature)
            await super()._send(kept, as_group=as_group)

    executor = Lossy(settings=workers.settings)
    try:
        outcomes = await asyncio.wait_for(
            execute_steps_parallel(executor, specs(3, "l")), timeout=CLAIM_TIMEOUT_S * 10
        )
    finally:
        await executor.aclose()
    assert dropped and all(o.success for o in outcomes)
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "l").items()} == {
        "l0": 1,
        "l1": 1,
        "l2": 1,
    }


async def test_two_workers_share_a_round(workers: CeleryWorkers) -> None:
    """Steps of one round are spread over both workers (the outcome's worker field says where)."""
    executor = workers.executor()
    try:
        outcomes = await execute_steps_parallel(executor, specs(12, "t"))
    finally:
        await executor.aclose()
    assert {o.worker for o in outcomes} == {w.node for w in workers.workers.values()}


async def test_resumed_host_reattaches_to_steps_in_flight(
    workers: CeleryWorkers, counter_dir: Path, key_prefix: str
) -> None:
    """A resumed host re-attaches to steps still running: every step runs exactly once.

    The first host, a child process, is SIGKILLed mid-round (the workers keep going; a
    cancelled host task would instead be a cancel, which stops its steps); a new host
    resumes the journal and waits for those steps instead of sending them again.
    """
    store = RedisCheckpointStore(workers.settings.redis_url, key_prefix=key_prefix)
    round_specs = specs(6, "r")
    first = start_first_host(workers, key_prefix)
    try:
        await until(lambda: len(where_ran(counter_dir, "r")) == 6)  # all 6 running
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the host goes away; the workers keep going
        first.wait(timeout=10)

    second = workers.executor()
    try:
        outcomes = await execute_steps_parallel_resumable(second, round_specs, "wf-reattach", store)
    finally:
        await second.aclose()
        await store.close()
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(6)]
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "r").items()} == {
        f"r{i}": 1 for i in range(6)
    }
