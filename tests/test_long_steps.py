"""Budgeted steps that last: many renewals meet many step ends, and 10-20 s steps finish.

Real model calls take 5-60 s; a budgeted step's reservation and lease are renewed many
times while it runs. These run on real Celery workers (2 x 16 threads) with a Redis ledger.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, execute_steps_parallel
from fleet.budget import WorkflowBudget
from fleet.cancel import Cancellation, use_cancellation
from fleet.config import FleetSettings
from fleet.events import StepFinished
from fleet.ledgers import RedisLedger
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import RedisCheckpointStore
from tests.celery_support import (
    REPO,
    BrokerLog,
    CeleryWorkers,
    check_resent_at_first_check_after_lapse,
    fleet_settings,
    running_workers,
    step_ids,
    until,
)
from tests.faults.support import process_env

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def spec(task_id: str, seconds: float, tokens: int) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id,
        agent="long_step",
        description="d",
        prompt=f"{seconds:.3f} {tokens}",
        max_tokens=100,
    )


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, counter_dir: Path
) -> Iterator[CeleryWorkers]:
    settings = fleet_settings(redis_url, max_in_flight=32)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    with running_workers(
        settings, tmp_path_factory.mktemp("w"), "worker1", "worker2", concurrency=16, env=env
    ) as fleet:
        yield fleet


@pytest.fixture
async def ledger(workers: CeleryWorkers) -> AsyncIterator[RedisLedger]:
    ledger = RedisLedger(workers.settings.redis_url, key_prefix=workers.settings.key_prefix)
    yield ledger
    await ledger.close()


def runs(counter_dir: Path, task_id: str) -> list[str]:
    """The worker of each run of ``task_id``, in order."""
    return [worker for worker, _ in starts(counter_dir, task_id)]


def starts(counter_dir: Path, task_id: str) -> list[tuple[str, float]]:
    """``(worker, time.time())`` of each run of ``task_id`` as its agent started."""
    path = counter_dir / task_id
    lines = path.read_text().splitlines() if path.exists() else []
    return [(worker, float(at)) for worker, at in (line.rsplit(" ", 1) for line in lines)]


def failures(outcomes: list[Any]) -> list[tuple[str, str | None, str]]:
    return [(o.task_id, o.error, o.output[:160]) for o in outcomes if not o.success]


@pytest.mark.timeout(240)
async def test_200_budgeted_short_steps_with_a_0_3_s_lease_all_succeed(
    workers: CeleryWorkers, ledger: RedisLedger, key_prefix: str
) -> None:
    """200 steps of 20-400 ms renewing a 0.3 s lease: every one succeeds, 0 reserved after.

    Renewals come every 0.1 s, so most steps end while one is in flight: the case where a
    cancelled renewal used to swallow its cancellation and keep the step from returning.
    """
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=f"{key_prefix}-short", lease_s=0.3)
    rng = random.Random(25)
    specs = [spec(f"{key_prefix}-s{i}", rng.uniform(0.02, 0.4), 7) for i in range(200)]
    executor = workers.executor(budget=budget)
    try:
        began = time.monotonic()
        outcomes = await asyncio.wait_for(execute_steps_parallel(executor, specs), 180)
        print(f"200 budgeted steps of 20-400 ms, lease 0.3 s: {time.monotonic() - began:.1f} s")
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
    assert failures(outcomes) == []
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (7 * 200, 0)


@pytest.mark.timeout(240)
async def test_eight_budgeted_steps_of_10_to_20_s_finish_within_60_s(
    workers: CeleryWorkers, ledger: RedisLedger, key_prefix: str, counter_dir: Path
) -> None:
    """Steps of 10 and 20 s under the default 30 s budget lease: all finish, run and sent once.

    With the default lease the reservation is renewed every 10 s: exactly when these steps
    end, which is how `fleet up --budget` with 10 s steps never finished (issue 25). The
    1 s step lease is renewed all along: a lapse would make the host send a step again
    (counted at Redis).
    """
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=f"{key_prefix}-long")
    specs = [spec(f"{key_prefix}-l{i}", 10.0 if i % 2 else 20.0, 11) for i in range(8)]
    executor = workers.executor(budget=budget)
    started = time.monotonic()
    try:
        with BrokerLog(workers.settings.redis_url) as log:
            outcomes = await asyncio.wait_for(execute_steps_parallel(executor, specs), 90.0)
            took = time.monotonic() - started
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
    assert failures(outcomes) == []
    print(f"8 budgeted steps of 10 and 20 s: {took:.1f} s")
    assert took <= 60.0, f"8 steps of 10-20 s took {took:.1f} s"
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (8 * 11, 0)
    assert {s.task_id: len(runs(counter_dir, s.task_id)) for s in specs} == {
        s.task_id: 1 for s in specs
    }
    sends = log.sends(workers.settings.queue)
    assert sorted(len(times) for times in sends.values()) == [1] * 8, "a step was sent again"


@pytest.mark.timeout(240)
async def test_a_budgeted_round_cancelled_after_its_10_s_steps_ended_stops_its_30_s_ones(
    workers: CeleryWorkers, ledger: RedisLedger, key_prefix: str, counter_dir: Path
) -> None:
    """10 s and 30 s budgeted steps, cancelled once the 10 s ones ended: 30 s ones stop in 2 s.

    16 steps of each length run under the default budget lease; the 10 s ones succeed,
    the 30 s ones end ``cancelled`` within 2 s of the cancel, and 0 stays reserved.
    docs/CANCEL.md: running steps are interrupted within 2 s of the cancel; every
    outcome of a stopped step is ``cancelled``; nothing stays reserved. The 10 s steps end
    just as their reservation's first renewal is due (the default 30 s lease renews every
    10 s), which used to keep steps from ever returning, and their tokens reserved.
    """
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=f"{key_prefix}-cancel")
    short = [spec(f"{key_prefix}-c{i}", 10.0, 5) for i in range(16)]
    long = [spec(f"{key_prefix}-C{i}", 30.0, 5) for i in range(16)]
    executor = workers.executor(budget=budget)
    cancellation = Cancellation()
    ended: set[str] = set()

    def sink(event: object) -> None:
        if isinstance(event, StepFinished):
            ended.add(event.task_id)

    try:
        with use_cancellation(cancellation):
            round_ = asyncio.create_task(
                execute_steps_parallel(executor, short + long, events=sink)
            )
        await until(lambda: {s.task_id for s in short} <= ended, 60.0, "every 10 s step ended")
        cancelled_at = time.time()
        cancellation.cancel("enough")
        outcomes = await asyncio.wait_for(round_, 60.0)
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
    assert failures(outcomes[:16]) == []
    assert [o.error for o in outcomes[16:]] == ["cancelled"] * 16, failures(outcomes[16:])
    nodes = {w.node for w in workers.workers.values()}
    # Stopped by their workers (a step the host gives up on after CANCEL_GRACE_S has none).
    assert all(o.worker in nodes for o in outcomes[16:]), [o.worker for o in outcomes[16:]]
    assert all(len(runs(counter_dir, s.task_id)) == 1 for s in short + long)
    stopped = {
        o.task_id: starts(counter_dir, o.task_id)[-1][1] + o.duration_s - cancelled_at
        for o in outcomes[16:]
    }
    late = {task: round(after, 2) for task, after in stopped.items() if after > 2.0}
    assert not late, f"steps stopped more than 2 s after the cancel: {late}"
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (16 * 5, 0)


@pytest.fixture
def doomed_workers(redis_url: str, tmp_path: Path, counter_dir: Path) -> Iterator[CeleryWorkers]:
    """Two workers of this test's own (it kills one), four threads each.

    Named apart from the module's workers, which are still up: a ping to ``worker1@host``
    would be answered by those, and the steps sent before these two were ready.
    """
    settings = fleet_settings(redis_url, claim_timeout_s=1.5, step_lease_s=1.0)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    with running_workers(settings, tmp_path, "doomed1", "doomed2", concurrency=4, env=env) as fleet:
        yield fleet


def renewed_leases(log: BrokerLog, key_prefix: str) -> set[bytes]:
    """Step lease keys a worker renewed (``PEXPIRE`` run by ``renew_lease.lua``)."""
    lease = f"{key_prefix}:lease:".encode()
    return {
        c.args[1]
        for c in list(log.commands)
        if c.client == "lua" and c.name == "PEXPIRE" and c.args[1].startswith(lease)
    }


@pytest.mark.timeout(240)
async def test_a_worker_killed_after_renewing_its_budgeted_steps_leases(
    doomed_workers: CeleryWorkers, key_prefix: str, counter_dir: Path
) -> None:
    """SIGKILL a worker once it has renewed the leases of its 10 s budgeted steps.

    Its steps run again on the survivor, each re-sent within the documented bound of the
    death (docs/CELERY.md: ``max(step_lease_s, claim_timeout_s) + check_interval``, on
    Redis's clock); the others run once; every token is settled once, 0 reserved.
    """
    workers = doomed_workers
    settings = workers.settings
    ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=f"{key_prefix}-kill")
    specs = [spec(f"{key_prefix}-k{i}", 10.0, 13) for i in range(4)]
    victim, survivor = workers.workers["doomed2"].node, workers.workers["doomed1"].node
    executor = workers.executor(budget=budget)
    try:
        with BrokerLog(settings.redis_url) as log:
            round_ = asyncio.create_task(execute_steps_parallel(executor, specs))

            def on_victim() -> set[str]:
                return {s.task_id for s in specs if victim in runs(counter_dir, s.task_id)}

            await until(
                lambda: bool(on_victim()) and all(runs(counter_dir, s.task_id) for s in specs),
                30.0,
                "every step running, one at least on the victim",
            )
            tids = step_ids(log, settings.queue)
            leases = {f"{settings.key_prefix}:lease:{tids[t]}".encode() for t in on_victim()}
            await until(
                lambda: leases <= renewed_leases(log, settings.key_prefix),
                10.0,
                "a renewal of the victim's leases",
            )
            killed = on_victim()
            await asyncio.to_thread(workers.kill, "doomed2")
            dead_at = time.time()
            outcomes = await asyncio.wait_for(round_, 90.0)
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
        await ledger.close()
    assert failures(outcomes) == []
    assert {s.task_id: runs(counter_dir, s.task_id) for s in specs} == {
        s.task_id: [victim, survivor] if s.task_id in killed else [survivor] for s in specs
    }
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (4 * 13, 0)
    for task in killed:
        print(task, check_resent_at_first_check_after_lapse(log, settings, tids[task], dead_at))


FIRST_HOST = """
import asyncio, sys
from fleet.budget import WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.config import load_settings
from fleet.ledgers import RedisLedger
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import RedisCheckpointStore
from tests.test_long_steps import resumed_specs

async def main():
    settings = load_settings()
    store = RedisCheckpointStore(settings.redis_url, key_prefix=sys.argv[1])
    ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=sys.argv[2])
    async with CeleryExecutor(settings=settings, budget=budget) as executor:
        await execute_steps_parallel_resumable(
            executor, resumed_specs(sys.argv[2]), sys.argv[2], store
        )

asyncio.run(main())
"""
"""The first host of the resume test, a child process the test SIGKILLs."""


def start_first_host(
    settings: FleetSettings, key_prefix: str, root: str
) -> subprocess.Popen[bytes]:
    """Start :data:`FIRST_HOST` in its own process group (for the kill)."""
    return subprocess.Popen(
        [sys.executable, "-c", FIRST_HOST, key_prefix, root],
        cwd=REPO,
        env=process_env(settings),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def resumed_specs(prefix: str) -> list[AgentStepSpec]:
    """Six budgeted steps of 10 s (under the default 30 s lease: renewed as they end)."""
    return [spec(f"{prefix}-r{i}", 10.0, 17) for i in range(6)]


@pytest.mark.timeout(240)
async def test_a_resumed_host_reattaches_to_running_budgeted_steps(
    workers: CeleryWorkers, ledger: RedisLedger, key_prefix: str, counter_dir: Path
) -> None:
    """SIGKILL the host of a budgeted round mid-step; the resumed host sends nothing again.

    A budgeted round sends one step per batch, so re-attach must work for single-step
    batches: the resumed host finds every step still running (its lease), waits for it,
    and the ledger ends with each step charged once and 0 reserved. Sends are counted at
    Redis.
    """
    settings = workers.settings
    root = f"{key_prefix}-resume"
    specs = resumed_specs(root)
    store = RedisCheckpointStore(settings.redis_url, key_prefix=key_prefix)
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=root)
    try:
        with BrokerLog(settings.redis_url) as log:
            first = start_first_host(settings, key_prefix, root)
            try:
                await until(
                    lambda: all(runs(counter_dir, s.task_id) for s in specs),
                    60.0,
                    "every step running",
                )
            finally:
                os.killpg(first.pid, signal.SIGKILL)  # the host goes; the workers keep going
                first.wait(timeout=10)
            resumed_at = time.time()
            second = workers.executor(budget=budget)
            try:
                outcomes = await asyncio.wait_for(
                    execute_steps_parallel_resumable(second, specs, root, store), 90.0
                )
            finally:
                await second.aclose()
        snapshot = await budget.snapshot()
    finally:
        await store.close()
    assert failures(outcomes) == []
    assert {s.task_id: len(runs(counter_dir, s.task_id)) for s in specs} == {
        s.task_id: 1 for s in specs
    }
    tids, sends = step_ids(log, settings.queue), log.sends(settings.queue)
    resent = {t for t in tids if any(at > resumed_at for at in sends[tids[t]])}
    assert not resent, f"the resumed host sent running steps again: {sorted(resent)}"
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (6 * 17, 0)
