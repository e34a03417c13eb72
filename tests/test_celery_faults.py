"""Faults on the fleet: a worker killed mid-round, duplicated and lost messages, a host restart.

Every step here is ``count_where``: it appends the worker's node name to
``<counter dir>/<task id>``, so a test sees exactly how many times each step ran and where.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet import AgentStepSpec, StepOutcome, execute_pipeline, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.events import StepFinished
from fleet.redis.keys import Keys
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import RedisCheckpointStore
from tests import pipeline_stages
from tests.celery_support import (
    REPO,
    BrokerLog,
    CeleryWorkers,
    broker_holds,
    check_resent_at_first_check_after_lapse,
    fleet_settings,
    running_workers,
    step_ids,
    until,
)
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
        await execute_steps_parallel_resumable(executor, specs(8, "r"), "wf-reattach", store)

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


def hung(counter_dir: Path, prefix: str) -> set[str]:
    """Steps stuck on a worker marked to hang (see ``tests.agents.count_where``)."""
    return {p.name[len("~hung-") :] for p in counter_dir.glob(f"~hung-{prefix}*")}


async def test_worker_killed_mid_round(doomed_workers: CeleryWorkers, counter_dir: Path) -> None:
    """SIGKILL a worker holding unfinished steps: they re-run elsewhere, nothing else does.

    The victim completes steps, then its next steps stay in flight until it is killed
    (``~hang-<node>``), so the kill is always mid-step. The round completes; steps that
    had completed never run again; only the victim's unfinished steps run a second time,
    on the survivor, each re-sent at the host's first check after its lease lapsed.
    """
    workers = doomed_workers
    executor = workers.executor()
    victim = workers.workers["worker2"].node
    survivor = workers.workers["worker1"].node
    hang = counter_dir / f"~hang-{victim}"
    finished: dict[str, str | None] = {}

    def sink(event: Any) -> None:
        if isinstance(event, StepFinished):
            finished[event.task_id] = event.worker

    try:
        with BrokerLog(workers.settings.redis_url) as log:
            round_ = asyncio.create_task(
                execute_steps_parallel(executor, specs(24, "k"), events=sink)
            )
            await until(lambda: victim in finished.values(), what="a step done on the victim")
            hang.touch()
            await until(lambda: bool(hung(counter_dir, "k")), what="a step stuck on the victim")
            finished_before_kill = set(finished)
            await asyncio.to_thread(workers.kill, "worker2")
            dead_at = time.time()  # the victim is reaped: nothing of it runs after this
            started_on_victim = {
                t for t, runs in where_ran(counter_dir, "k").items() if victim in runs
            }
            outcomes: list[StepOutcome] = await asyncio.wait_for(round_, timeout=60)
    finally:
        hang.unlink(missing_ok=True)
        await executor.aclose()

    assert [o.output for o in outcomes] == [f"p{i}" for i in range(24)]
    assert all(o.success for o in outcomes)
    ran = where_ran(counter_dir, "k")
    assert set(ran) == {f"k{i}" for i in range(24)}  # no step lost
    for task in finished_before_kill:
        assert len(ran[task]) == 1, f"{task} completed before the kill but ran again"
    in_flight = started_on_victim - finished_before_kill
    twice = {task for task, runs in ran.items() if len(runs) > 1}
    assert hung(counter_dir, "k") <= twice  # every step stuck on the victim ran again
    assert 1 <= len(twice) <= 3 and twice <= in_flight  # the victim ran three at a time
    tids = step_ids(log, workers.settings.queue)
    for task in twice:
        assert ran[task] == [victim, survivor]
        assert outcomes[int(task[1:])].worker == survivor
        print(
            task,
            check_resent_at_first_check_after_lapse(log, workers.settings, tids[task], dead_at),
        )


async def test_worker_killed_mid_pipeline(doomed_workers: CeleryWorkers, counter_dir: Path) -> None:
    """SIGKILL a worker holding an unfinished link: every chain finishes, no link is lost.

    Only links in flight on the victim run twice, and at least one does (the kill is
    always mid-step, as in the round test).
    """
    workers = doomed_workers
    executor = workers.executor()
    victim = workers.workers["worker2"].node
    survivor = workers.workers["worker1"].node
    hang = counter_dir / f"~hang-{victim}"
    items = [f"x{i}" for i in range(12)]
    try:
        run = asyncio.create_task(
            execute_pipeline(executor, items, [pipeline_stages.counted, pipeline_stages.counted])
        )
        await until(lambda: any(victim in runs for runs in where_ran(counter_dir, "c").values()))
        hang.touch()
        await until(lambda: bool(hung(counter_dir, "c")), what="a link stuck on the victim")
        await asyncio.to_thread(workers.kill, "worker2")
        on_victim = {t for t, runs in where_ran(counter_dir, "c").items() if victim in runs}
        outcomes = await asyncio.wait_for(run, timeout=60)
    finally:
        hang.unlink(missing_ok=True)
        await executor.aclose()
    assert [o.output if o else None for o in outcomes] == [f"{item}/2" for item in items]
    ran = where_ran(counter_dir, "c")
    assert set(ran) == {f"c{stage}-{item}" for item in items for stage in (1, 2)}
    twice = {task for task, runs in ran.items() if len(runs) > 1}
    stuck = hung(counter_dir, "c")
    assert stuck and stuck <= twice  # every link stuck on the victim ran again
    assert twice <= on_victim  # only links the victim had started
    assert all(ran[task] == [victim, survivor] for task in twice), {t: ran[t] for t in twice}


async def test_duplicated_message_runs_the_agent_once(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """Every task message is delivered twice: each agent runs once, each copy is refused."""

    class Duplicating(CeleryExecutor):
        async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
            await super()._send(signatures, as_group=as_group)
            await super()._send([s.clone() for s in signatures], as_group=as_group)

    executor = Duplicating(settings=workers.settings)
    logs_before = {w.name: len(w.log_text()) for w in workers.workers.values()}
    try:
        with BrokerLog(workers.settings.redis_url) as log:
            outcomes = await execute_steps_parallel(executor, specs(10, "d"))
            tids = step_ids(log, workers.settings.queue)
            await until(
                lambda: not broker_holds(workers.settings, set(tids.values())),
                what="every copy to be delivered and acknowledged",
            )
    finally:
        await executor.aclose()
    assert all(o.success for o in outcomes)
    sends = log.sends(workers.settings.queue)
    assert {task: len(sends[tid]) for task, tid in tids.items()} == {f"d{i}": 2 for i in range(10)}
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "d").items()} == {
        f"d{i}": 1 for i in range(10)
    }
    # The second copy of each step reached a worker and was refused (recorded result,
    # or the lease of the run still going).
    logs = "".join(w.log_text()[logs_before[w.name] :] for w in workers.workers.values())
    refused = re.findall(r"step (d\d+) \(task \S+\) (?:already ran|is running elsewhere)", logs)
    assert sorted(refused) == sorted(f"d{i}" for i in range(10)), logs[-3000:]


async def test_lost_message_is_resent_after_the_claim_timeout(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """A message that never reaches a worker is re-sent under the same id and runs once.

    On Redis's clock: the host looks at the step only once the claim timeout has run, and
    re-sends it on that first look.
    """
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
        with BrokerLog(workers.settings.redis_url) as log:
            outcomes = await asyncio.wait_for(
                execute_steps_parallel(executor, specs(3, "l")), timeout=CLAIM_TIMEOUT_S * 20
            )
    finally:
        await executor.aclose()
    assert dropped and all(o.success for o in outcomes)
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "l").items()} == {
        "l0": 1,
        "l1": 1,
        "l2": 1,
    }
    sends = log.sends(workers.settings.queue)
    (resent,) = sends[dropped[0]]  # the first copy never reached Redis
    batch_sent = min(min(sends[tid]) for tid in sends if tid != dropped[0])
    looks = log.lease_checks(workers.settings.key_prefix, dropped[0])
    assert looks and looks[0] <= resent, "re-sent without looking at the step first"
    # The host set the step's send time just before the batch reached Redis.
    assert looks[0] - batch_sent >= CLAIM_TIMEOUT_S / 2, "looked long before the claim timeout"
    assert len([at for at in looks if at <= resent]) == 1, "did not re-send on its first look"


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
    """A resumed host re-attaches to steps running or done: it sends none of them again.

    The first host, a child process, is SIGKILLed mid-round (the workers keep going; a
    cancelled host task would instead be a cancel, which stops its steps). The new host
    resumes once some of its steps are done (a done-marker, nothing journaled: the first
    host never heard) and others still run (a lease); it must wait for the running ones
    and take the done ones as they are. The messages pushed onto the queue are counted at
    Redis: the workers' de-duplication would hide a re-send from the run counters alone.
    """
    settings = workers.settings
    store = RedisCheckpointStore(settings.redis_url, key_prefix=key_prefix)
    round_specs = specs(8, "r")  # two workers x three threads: a second wave of two
    client = redis.Redis.from_url(settings.redis_url)

    def states() -> dict[str, str]:
        tids = step_ids(log, settings.queue)
        found = {}
        for task, tid in tids.items():
            if client.hexists(Keys(settings.key_prefix).steps("wf-reattach"), f"done:{tid}"):
                found[task] = "done"
            elif client.exists(f"{settings.key_prefix}:lease:{tid}"):
                found[task] = "running"
        return found

    try:
        with BrokerLog(settings.redis_url) as log:
            first = start_first_host(workers, key_prefix)
            try:
                # Six running, and all eight sent (the last two wait for a free thread).
                await until(
                    lambda: (
                        len(where_ran(counter_dir, "r")) >= 6
                        and len(step_ids(log, settings.queue)) == 8
                    )
                )
            finally:
                os.killpg(first.pid, signal.SIGKILL)  # the host goes; the workers keep going
                first.wait(timeout=10)
            await until(
                lambda: {"done", "running"} <= set(states().values()),
                what="steps both done and running",
            )
            resumed_at = time.time()
            attached = states()
            second = workers.executor()
            try:
                outcomes = await execute_steps_parallel_resumable(
                    second, round_specs, "wf-reattach", store
                )
            finally:
                await second.aclose()
    finally:
        await store.close()
        client.close()
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(8)]
    assert {task: len(runs) for task, runs in where_ran(counter_dir, "r").items()} == {
        f"r{i}": 1 for i in range(8)
    }
    tids, sends = step_ids(log, settings.queue), log.sends(settings.queue)
    resent = {task for task in attached if any(at > resumed_at for at in sends[tids[task]])}
    assert not resent, f"the resumed host sent steps again that were {attached}: {resent}"
