"""Cancel on a real fleet: 2 worker processes x 16 threads, Redis, a slow loopback model server.

100 steps of 60 s model calls; the workflow is cancelled 1 s in. Only the 32 steps the
workers had taken ever reach the model server; every one of their requests is closed by
the client; the 68 queued messages are dropped unrun; the ledger holds nothing; every
outcome is ``cancelled``; and running the root id again runs only what did not complete.

The calls last a minute, as real ones can, because the cancel is a second process: on a
busy machine ``fleet cancel`` can take several seconds just to start, and a call that
ended on its own before the cancel arrived would prove nothing (and fail the count of
closed requests). The cancel's own bound is measured from when it was recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, WorkflowBudget, execute_pipeline, execute_steps_parallel
from fleet.cancel import Cancellation, use_cancellation
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.events import StepStarted
from fleet.ledgers import RedisLedger
from fleet.processes import settings_env
from fleet.runs import RedisRunRegistry
from tests import pipeline_stages
from tests.celery_support import (
    REPO,
    CeleryWorkers,
    fleet_settings,
    running_workers,
    until,
    until_async,
)
from tests.fake_openai import FakeOpenAI, Reply, reply

pytestmark = pytest.mark.timeout(240)

STEPS = 100
WARMUP = 10
SLOTS = 2 * 16
SLOW_S = 60.0

FLOW = """
import json, os
from pathlib import Path

from fleet import AgentStepSpec


def spec(task_id):
    return AgentStepSpec(task_id=task_id, agent="llm", description="d", prompt=task_id)


def stage(_previous, item):
    return spec(f"item{item}")


async def main(workflow):
    warm = await workflow.phase("warmup", [spec(f"warm{i}") for i in range({warmup})])
    if os.environ["FLOW_SHAPE"] == "pipeline":
        results = await workflow.pipeline(range({steps}), [stage])
    else:
        results = await workflow.phase("slow", [spec(f"step{i}") for i in range({steps})])
    errors = [None if r is None else r.error for r in warm + results]
    Path(os.environ["FLOW_OUT"]).write_text(json.dumps(errors))
    return sum(r is not None and r.success for r in results)
"""


@pytest.fixture
def model_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def _settings(redis_url: str, tmp_path: Path, server: FakeOpenAI) -> FleetSettings:
    agents = tmp_path / "agents.toml"
    agents.write_text(
        f'[agents.llm]\nkind = "openai"\nbase_url = "{server.base_url}"\nmodel = "m"\n'
        "max_tokens = 50\ntimeout_s = 60\n"
        'unknown_price = "allow"\n'  # the test model has no price; tokens are still held
        "max_concurrent = 64\n"  # every worker thread in a model call at once
    )
    return fleet_settings(
        redis_url,
        agents_file=agents,
        max_in_flight=STEPS,
        claim_timeout_s=60.0,
        step_lease_s=2.0,
        store=redis_url,
    )


def _slow(count: int) -> list[Reply]:
    return [reply("slow", prompt_tokens=10, completion_tokens=40, delay_s=SLOW_S)] * count


def _quick(count: int) -> list[Reply]:
    return [reply("quick", prompt_tokens=10, completion_tokens=40)] * count


def _warm(count: int) -> list[Reply]:
    """Warmup answers that take a second, as a real server's do.

    Instant answers would make the best latency per token seen unrealistically small.
    """
    return [reply("warm", prompt_tokens=10, completion_tokens=40, delay_s=1.0)] * count


def _env(settings: FleetSettings, tmp_path: Path, shape: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings))
    env.update(PYTHONPATH=str(REPO), FLOW_SHAPE=shape, FLOW_OUT=str(tmp_path / "out.json"))
    return env


def _fleet_run(
    settings: FleetSettings, tmp_path: Path, root: str, shape: str
) -> subprocess.Popen[str]:
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW.replace("{warmup}", str(WARMUP)).replace("{steps}", str(STEPS)))
    command = [sys.executable, "-m", "fleet", "run", f"{flow}:main", "--executor", "celery"]
    command += ["--root-id", root, "--budget", "1000000"]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(settings, tmp_path, shape),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(condition: object, timeout_s: float, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if process.poll() is not None:
            raise AssertionError(f"fleet run exited early: {process.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _queue_length(settings: FleetSettings) -> int:
    from redis import Redis

    with Redis.from_url(settings.redis_url) as client:
        return int(client.llen(settings.queue))


def _wait_until(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _reserved(settings: FleetSettings, root: str) -> int:
    async def read() -> int:
        ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
        try:
            return (await ledger.state(root)).reserved
        finally:
            await ledger.close()

    return asyncio.run(read())


def _cancelled_at(settings: FleetSettings, root: str) -> float:
    """The cancel's epoch time, from the run record ``fleet cancel`` / Ctrl-C wrote."""

    async def read() -> float:
        board = RedisRunRegistry(settings.redis_url, key_prefix=settings.key_prefix)
        try:
            record = await board.record(root)
        finally:
            await board.close()
        assert record is not None and record.status == "cancelled", record
        assert record.ended_at is not None
        return record.ended_at

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("how", "shape"),
    [("fleet cancel", "round"), ("Ctrl-C", "round"), ("fleet cancel", "pipeline")],
)
def test_a_cancel_stops_the_fleet_and_a_rerun_resumes(
    redis_url: str, tmp_path: Path, model_server: FakeOpenAI, how: str, shape: str
) -> None:
    """Cancelled 1 s in: no new model request, open ones closed, 0 reserved, all cancelled."""
    settings = _settings(redis_url, tmp_path, model_server)
    root = f"cancel-{shape}"
    # Only 32 slow replies: a 33rd request would get an error and fail its step visibly.
    model_server.script(*_warm(WARMUP), *_slow(SLOTS))
    with running_workers(settings, tmp_path, "w1", "w2", concurrency=16):
        process = _fleet_run(settings, tmp_path, root, shape)
        try:
            # Every thread of both workers is in a model call, 1 s after the first one began.
            _wait(lambda: len(model_server.requests) >= WARMUP + SLOTS, 120, process)
            first_slow = model_server.requests[WARMUP].at
            _wait(lambda: time.monotonic() >= first_slow + 1.0, 10, process)
            if how == "Ctrl-C":
                process.send_signal(signal.SIGINT)
            else:
                done = subprocess.run(
                    [sys.executable, "-m", "fleet", "cancel", root, "--reason", "stop now"],
                    cwd=REPO,
                    env=_env(settings, tmp_path, shape),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == 0, done.stdout + done.stderr
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == (130 if how == "Ctrl-C" else 1), out + err
        assert "CANCELLED" in out, out + err
        # Every request the model server got was closed by the client (none completed).
        closed = model_server.wait_for(lambda s: s.disconnects == len(s.requests) - WARMUP, 10)
        assert closed, (
            f"{model_server.disconnects} of {len(model_server.requests) - WARMUP} model requests "
            f"were closed by the client; outcomes: {(tmp_path / 'out.json').read_text()[:400]}"
        )
        slow_requests = model_server.requests[WARMUP:]
        assert len(slow_requests) == SLOTS  # only the steps running at the cancel
        cancel_epoch = _cancelled_at(settings, root)
        offset = time.time() - time.monotonic()
        late = [r for r in slow_requests if r.at + offset > cancel_epoch + 0.5]
        assert late == []
        # docs/CANCEL.md: running steps are interrupted within 2 s, their requests closed.
        closed_after = max(model_server.hung_up_at) - cancel_epoch
        assert closed_after <= 2.0, f"the last model request closed {closed_after:.2f} s in"
        assert _reserved(settings, root) == 0
        errors = json.loads((tmp_path / "out.json").read_text())
        assert errors[:WARMUP] == [None] * WARMUP
        assert errors[WARMUP:] == ["cancelled"] * STEPS

        if shape == "pipeline":
            return  # a pipeline is not journaled: a re-run runs it whole
        before = len(model_server.requests)
        model_server.script(*_quick(STEPS))
        again = _fleet_run(settings, tmp_path, root, shape)
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0, out + err
        # The warmup phase came from the journal; only the cancelled steps ran.
        assert len(model_server.requests) - before == STEPS
        assert json.loads((tmp_path / "out.json").read_text()) == [None] * (WARMUP + STEPS)


def test_a_worker_dead_during_the_cancel_drops_the_queued_messages_when_it_returns(
    redis_url: str, tmp_path: Path, model_server: FakeOpenAI
) -> None:
    """Cancel while every worker is dead: the restarted worker runs none of the queued steps."""
    settings = _settings(redis_url, tmp_path, model_server)
    root = "cancel-dead-worker"
    model_server.script(*_warm(WARMUP), *_slow(16))
    workers = CeleryWorkers(settings, tmp_path, concurrency=16)
    try:
        workers.start("w1")
        process = _fleet_run(settings, tmp_path, root, "round")
        try:
            _wait(lambda: len(model_server.requests) >= WARMUP + 16, 120, process)
            workers.kill("w1")
            done = subprocess.run(
                [sys.executable, "-m", "fleet", "cancel", root],
                cwd=REPO,
                env=_env(settings, tmp_path, "round"),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            requests_before = len(model_server.requests)
            queued = _queue_length(settings)
            assert queued > 0
            workers.start("w1")
            out, err = process.communicate(timeout=90)
            _wait_until(lambda: _queue_length(settings) == 0, 60)  # it took every message
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 1, out + err
        assert len(model_server.requests) == requests_before  # nothing ran after the restart
        errors = json.loads((tmp_path / "out.json").read_text())
        assert errors[WARMUP:] == ["cancelled"] * STEPS
    finally:
        workers.stop()


# --------------------------------------------------------------------------- the executor


async def _free(executor: Any) -> None:
    """The workers are free again: a round of quick steps completes."""
    quick = [
        AgentStepSpec(task_id=f"q{i}", agent="noop", description="d", prompt="") for i in range(4)
    ]
    outcomes = await asyncio.wait_for(execute_steps_parallel(executor, quick), 30)
    assert all(o.success for o in outcomes)


async def test_cancelling_the_caller_of_a_celery_round_stops_its_steps_on_the_workers(
    redis_url: str, tmp_path: Path
) -> None:
    """A cancelled caller: running steps are interrupted, queued ones dropped, holds released."""
    settings = fleet_settings(redis_url, claim_timeout_s=60.0)
    ledger = RedisLedger(redis_url, key_prefix=settings.key_prefix)
    budget = WorkflowBudget(1_000_000, ledger=ledger, workflow_id="caller-cancel")
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="sleep_prompt", description="d", prompt="3600")
        for i in range(8)
    ]
    with running_workers(settings, tmp_path, "w1", concurrency=4):
        async with CeleryExecutor(settings=settings, budget=budget) as executor:
            started: list[str] = []
            task = asyncio.create_task(
                execute_steps_parallel(executor, specs, events=_started_into(started))
            )
            await until(lambda: len(started) == 4, 60, "4 running steps")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def released() -> bool:
                return (await ledger.state("caller-cancel")).reserved == 0

            await until_async(released, 10, "the cancelled steps' tokens to be released")
            await _free(executor)  # the 4 sleeping steps were interrupted
    await ledger.close()


async def test_a_cancelled_native_pipeline_stops_its_chains_on_the_workers(
    redis_url: str, tmp_path: Path
) -> None:
    """Registered stages (Celery chains): a cancel ends every chain cancelled, workers free."""
    settings = fleet_settings(redis_url, claim_timeout_s=60.0)
    cancellation = Cancellation(("run-under-test",))
    with running_workers(settings, tmp_path, "w1", concurrency=4):
        async with CeleryExecutor(settings=settings) as executor:
            started: list[str] = []
            with use_cancellation(cancellation):
                chains = asyncio.create_task(
                    execute_pipeline(
                        executor,
                        [f"i{i}:3600" for i in range(8)],
                        [pipeline_stages.sleepy],
                        events=_started_into(started),
                    )
                )
            await until(lambda: len(started) == 4, 60, "4 running links")
            cancellation.cancel("stop the pipeline")
            results = await asyncio.wait_for(chains, 30)
            assert all(r is not None and r.error == "cancelled" for r in results), results
            assert sum("stop the pipeline" in (r.output if r else "") for r in results) == 8
            await _free(executor)


def _started_into(started: list[str]) -> Any:
    def sink(event: Any) -> None:
        if isinstance(event, StepStarted):
            started.append(event.task_id)

    return sink
