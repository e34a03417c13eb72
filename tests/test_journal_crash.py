"""kill -9 in the middle of a journaled round: the next process finishes it, redoing nothing."""

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

import pytest

from fleet import SQLiteCheckpointStore

pytestmark = pytest.mark.faults

STEPS = 200
CONCURRENCY = 4
WORKFLOW_ID = "crash-wf"
ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, json, sys
from fleet import AgentStepSpec, LocalExecutor, SQLiteCheckpointStore
from fleet import execute_steps_parallel_resumable

async def main():
    db, steps, concurrency, workflow_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    executor = LocalExecutor(
        agents={"count": "tests.agents:count_and_echo"}, max_concurrency=concurrency
    )
    specs = [
        AgentStepSpec(task_id=f"step-{i:03d}", agent="count", description="crash", prompt=f"p{i}")
        for i in range(steps)
    ]
    async with SQLiteCheckpointStore(db) as store:
        outcomes = await execute_steps_parallel_resumable(executor, specs, workflow_id, store)
    print(json.dumps([[o.task_id, o.success, o.output] for o in outcomes]))

asyncio.run(main())
"""


def start_child(db: Path, counters: Path, step_sleep: float) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FLEET_TEST_COUNTER_DIR": str(counters),
        "FLEET_TEST_STEP_SLEEP": str(step_sleep),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(STEPS), str(CONCURRENCY), WORKFLOW_ID],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def counts(counters: Path) -> dict[str, int]:
    return {path.name: len(path.read_text()) for path in counters.iterdir()}


async def test_sigkilled_round_resumes_without_redoing_finished_steps(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """Every step's side effect happens; a step journaled before the kill never runs again."""
    db, counters = tmp_path / "journal.db", tmp_path / "counters"
    counters.mkdir()

    first = start_child(db, counters, step_sleep=0.01)
    children.append(first)
    deadline = time.monotonic() + 60
    while len(list(counters.iterdir())) < STEPS // 3:
        assert first.poll() is None, f"first run ended early: {first.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "first run made no progress"
        await asyncio.sleep(0.005)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL

    before = counts(counters)
    assert STEPS // 3 <= len(before) < STEPS, "the kill must land midway through the round"
    async with SQLiteCheckpointStore(db) as store:
        checkpoint = await store.load(WORKFLOW_ID)
    assert checkpoint is not None
    journaled = set(checkpoint.completed())
    assert journaled and journaled <= set(before)
    # Only steps in flight at the kill ran without being journaled: one per lane at most.
    assert len(set(before) - journaled) <= CONCURRENCY

    second = start_child(db, counters, step_sleep=0.0)
    children.append(second)
    stdout, stderr = second.communicate(timeout=90)
    assert second.returncode == 0, stderr
    results = json.loads(stdout)
    assert len(results) == STEPS
    assert all(success for _task, success, _output in results)
    assert [task for task, _s, _o in results] == [f"step-{i:03d}" for i in range(STEPS)]

    after = counts(counters)
    assert sorted(after) == sorted(f"step-{i:03d}" for i in range(STEPS))
    assert all(count >= 1 for count in after.values())
    # The resume ran exactly the steps that were not journaled, each once; a journaled step
    # never ran again. (A step killed mid-write may have left an empty counter file.)
    for task, count in after.items():
        assert count == before.get(task, 0) + (0 if task in journaled else 1), task

    async with SQLiteCheckpointStore(db) as store:
        assert await store.load(WORKFLOW_ID) is None  # full success removed the journal
