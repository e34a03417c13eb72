"""The load a Celery host must hold: many callers, many items, many hosts; none may fail.

Real Redis, real worker processes (``--pool threads``), ``echo`` steps. Every step must
succeed, and each host process's Redis connections (``CLIENT LIST``, by the
``fleet-host-{pid}`` client name) must stay within
:data:`fleet.celery.dispatch.HOST_CONNECTIONS` however many steps its callers await.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fleet import (
    AgentStepSpec,
    MemoryCheckpointStore,
    StepOutcome,
    Workflow,
    execute_pipeline,
    execute_steps_parallel,
)
from fleet.celery import CeleryExecutor
from fleet.celery.dispatch import HOST_CONNECTIONS
from tests import pipeline_stages
from tests.celery_support import REPO, CeleryWorkers, fleet_settings, running_workers
from tests.load.support import HOST_NAME_PREFIX, sampling

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.load, pytest.mark.slow]

HOST = f"{HOST_NAME_PREFIX}{os.getpid()}"
T = TypeVar("T")
STALLED_S = 240.0
"""A run still going after this has a stalled step (a normal run takes well under a minute)."""


def specs(prefix: str, n: int) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"{prefix}{i}", agent="echo", description="load", prompt=f"p{i}")
        for i in range(n)
    ]


def echo_stage(task: str, suffix: str = "") -> Callable[[StepOutcome | None, int], AgentStepSpec]:
    """A closure stage (so the pipeline is host-driven): echo the item, then append ``suffix``."""

    def stage(prev: StepOutcome | None, item: int) -> AgentStepSpec:
        prompt = f"{item}" if prev is None else f"{prev.output}{suffix}"
        return AgentStepSpec(task_id=f"{task}{item}", agent="echo", description="d", prompt=prompt)

    return stage


def all_echoed(outcomes: list[StepOutcome]) -> None:
    failed = [o for o in outcomes if not o.success]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, first: {failed[0].output}"
    assert [o.output for o in outcomes] == [f"p{i}" for i in range(len(outcomes))]


async def under_load(redis_url: str, executor: CeleryExecutor, run: Awaitable[T]) -> T:
    """Await ``run``, then close ``executor``; its peak connections stay within the bound."""
    try:
        with sampling(redis_url) as peaks:
            result = await run
    finally:
        await executor.aclose()
    assert 0 < peaks.peak[HOST] <= HOST_CONNECTIONS, peaks.peak
    return result


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorkers]:
    """One worker, 32 threads, as a user would start it; generous timeouts (no re-sends)."""
    settings = fleet_settings(redis_url, claim_timeout_s=60.0, step_lease_s=10.0, max_in_flight=64)
    with running_workers(
        settings, tmp_path_factory.mktemp("load"), "load1", concurrency=32
    ) as fleet:
        yield fleet


@pytest.mark.timeout(300)
async def test_thousand_concurrent_execute_step_calls_all_succeed(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """1,000 callers await execute_step on one executor: they wait for slots, none fails."""
    executor = workers.executor()
    calls = asyncio.gather(*(executor.execute_step(s) for s in specs("c", 1000)))
    all_echoed(list(await under_load(redis_url, executor, calls)))


@pytest.mark.timeout(300)
async def test_host_driven_pipeline_of_a_thousand_items(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """1,000 items x 3 closure stages (host-driven): every chain reaches its last stage."""
    executor = workers.executor()
    stages = [echo_stage("a"), echo_stage("b", "/b"), echo_stage("c", "/c")]
    run = execute_pipeline(executor, list(range(1000)), stages)
    outcomes = await under_load(redis_url, executor, run)
    assert [o.output if o else None for o in outcomes] == [f"{i}/b/c" for i in range(1000)]
    assert all(o is not None and o.success for o in outcomes)


@contextlib.contextmanager
def busy_loop(loop: asyncio.AbstractEventLoop, every_s: float = 0.02) -> Iterator[None]:
    """Block ``loop`` for ``every_s`` out of every ``2 * every_s`` (a host on a loaded machine)."""
    handle: asyncio.TimerHandle | None = None

    def hog() -> None:
        nonlocal handle
        time.sleep(every_s)
        handle = loop.call_later(every_s, hog)

    handle = loop.call_later(every_s, hog)
    try:
        yield
    finally:
        handle.cancel()


class CountingExecutor(CeleryExecutor):
    """Counts the messages (steps, or whole chains) it sends, re-sends included."""

    sent = 0

    async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
        self.sent += len(signatures)
        await super()._send(signatures, as_group=as_group)


@pytest.mark.timeout(300)
async def test_registered_stage_pipeline_of_a_thousand_items_sends_each_chain_once(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """1,000 items x 3 registered no-op stages (Celery chains): no chain stalls or is re-sent.

    The host's loop is kept busy (as on a loaded machine), so notices pile up and a
    link's notice often arrives before the host has heard that the previous link finished.
    """
    # No recovery can hide a dropped notice: a chain waiting on one would wait an hour.
    executor = CountingExecutor(settings=workers.settings, claim_timeout_s=3600.0)
    items = [f"i{i}" for i in range(1000)]
    run = execute_pipeline(executor, items, [pipeline_stages.bench_noop] * 3)
    with busy_loop(asyncio.get_running_loop()):
        outcomes = await under_load(redis_url, executor, asyncio.wait_for(run, STALLED_S))
    assert [o.task_id if o else None for o in outcomes] == [f"{item}-3" for item in items]
    assert all(o is not None and o.success for o in outcomes)
    assert executor.sent == 1000


@pytest.mark.timeout(300)
async def test_twenty_workflows_at_once_on_one_executor(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """20 journaled workflows run phases and pipelines at once on one executor; all succeed."""
    executor = workers.executor()

    async def one(w: int) -> list[StepOutcome]:
        builder = Workflow.builder(executor).with_store(MemoryCheckpointStore())
        async with builder.with_root_id(f"load-wf-{w}").build() as workflow:
            first = await workflow.phase("fan", specs(f"w{w}-", 50))
            chained = await workflow.pipeline(
                list(range(20)), [echo_stage(f"w{w}-x"), echo_stage(f"w{w}-y", "/y")]
            )
        assert [o.output if o else None for o in chained] == [f"{i}/y" for i in range(20)]
        return first

    rounds = await under_load(redis_url, executor, asyncio.gather(*(one(w) for w in range(20))))
    for outcomes in rounds:
        all_echoed(outcomes)


@pytest.mark.timeout(600)
async def test_ten_thousand_step_round(workers: CeleryWorkers, redis_url: str) -> None:
    """One round of 10,000 steps: every step succeeds, in input order."""
    executor = workers.executor()
    run = execute_steps_parallel(executor, specs("t", 10_000))
    all_echoed(await under_load(redis_url, executor, run))


@pytest.mark.timeout(600)
def test_four_host_processes_share_two_workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """4 host processes (each 300 concurrent calls, then a 300-step round) on 2 workers."""
    settings = fleet_settings(redis_url, claim_timeout_s=60.0, step_lease_s=10.0, max_in_flight=64)
    directory: Path = tmp_path_factory.mktemp("hosts")
    with running_workers(settings, directory, "share1", "share2", concurrency=16):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        args = [sys.executable, "-m", "tests.load.host_process", settings.model_dump_json(), "300"]
        with sampling(redis_url) as peaks:
            hosts = [
                subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(4)
            ]
            try:
                reports = [json.loads(h.communicate(timeout=500)[0]) for h in hosts]
            finally:
                for host in hosts:
                    if host.poll() is None:
                        host.kill()
                        host.wait(timeout=10)
    assert [h.returncode for h in hosts] == [0, 0, 0, 0]
    assert [(r["steps"], r["succeeded"], r["echoed"]) for r in reports] == [(600, 600, 600)] * 4
    for report in reports:
        peak = peaks.peak[f"{HOST_NAME_PREFIX}{report['pid']}"]
        assert 0 < peak <= HOST_CONNECTIONS, peaks.peak
