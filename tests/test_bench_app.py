"""The raw Celery tasks the benchmarks measure fleet against live in their own app only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from celery import group

from bench.celery_app import BENCH_APP, BENCH_NOOP_TASK, BENCH_SLEEP_TASK
from fleet import AgentStepSpec, StepOutcome
from fleet.celery import STAGE_TASK, STEP_TASK, CeleryExecutor, configure_app
from tests.celery_support import CeleryWorkers, fleet_settings

pytestmark = [pytest.mark.redis, pytest.mark.celery]


def test_the_production_worker_registers_no_bench_task(redis_url: str) -> None:
    """``celery -A workers.app worker`` runs fleet's tasks and nothing a benchmark needs."""
    from workers.app import create_app

    app = create_app(fleet_settings(redis_url))
    try:
        assert {STEP_TASK, STAGE_TASK} <= set(app.tasks)
        assert sorted(name for name in app.tasks if name.startswith("bench.")) == []
    finally:
        app.close()


async def _one_step(executor: CeleryExecutor) -> StepOutcome:
    try:
        spec = AgentStepSpec(task_id="s1", agent="noop", description="d", prompt="")
        return await executor.execute_step(spec)
    finally:
        await executor.aclose()


def test_the_bench_app_runs_fleet_steps_and_the_raw_tasks(redis_url: str, tmp_path: Path) -> None:
    """A worker of ``bench.celery_app`` runs ``bench.noop``, ``bench.sleep`` and fleet steps."""
    settings = fleet_settings(redis_url)
    workers = CeleryWorkers(settings, tmp_path, concurrency=2, app=BENCH_APP)
    app = configure_app(settings)
    try:
        workers.start("bench1")
        noop = app.signature(BENCH_NOOP_TASK, args=(7,), queue=settings.queue)
        sleep = app.signature(BENCH_SLEEP_TASK, args=(0.01,), queue=settings.queue)
        assert group([noop, sleep]).apply_async().get(timeout=60) == [7, None]
        outcome = asyncio.run(_one_step(workers.executor()))
        assert outcome.success, outcome.error
    finally:
        app.close()
        workers.stop()
