"""Flower (started by a LocalFleet) shows fleet's tasks by name and summary, never the prompt."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import AgentStepSpec, StepOutcome
from fleet.celery import CeleryExecutor
from fleet.combinators import run_round
from fleet.config import load_settings
from fleet.localfleet import LocalFleet

pytestmark = [pytest.mark.celery, pytest.mark.slow]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    agents = tmp_path_factory.mktemp("flower") / "agents.toml"
    agents.write_text('[agents.slow_echo]\nkind = "python"\ntarget = "tests.agents:slow_echo"\n')
    settings = load_settings(
        agents_file=agents,
        key_prefix=f"fleet-test-{uuid.uuid4().hex[:12]}",
        flower_password="flower-test-pw",
    )
    with LocalFleet(workers=1, concurrency=2, settings=settings) as fleet:
        yield fleet


async def celery_round(
    local: LocalFleet, specs: list[AgentStepSpec], workflow_id: str
) -> list[StepOutcome]:
    async with CeleryExecutor(settings=local.settings) as executor:
        return await run_round(executor, specs, workflow_id=workflow_id)


def flower_tasks(local: LocalFleet, wanted: int) -> tuple[dict[str, Any], str]:
    """Flower's /api/tasks once it has seen ``wanted`` finished tasks (events are async)."""
    assert local.flower_url is not None
    auth = (local.flower_user, local.flower_password)
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=local.flower_url, auth=auth, timeout=5) as client:
        while True:
            response = client.get("/api/tasks")
            assert response.status_code == 200, response.text
            tasks = response.json()
            done = [task for task in tasks.values() if task.get("state") == "SUCCESS"]
            if len(done) >= wanted or time.monotonic() > deadline:
                return tasks, response.text
            time.sleep(0.3)


def test_flower_lists_steps_by_name_and_summary_without_prompt(local: LocalFleet) -> None:
    """/api/tasks shows fleet.run_step with 'workflow task agent' args; no prompt anywhere."""
    secret = f"secret-prompt-{uuid.uuid4().hex}"
    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    specs = [
        AgentStepSpec(
            task_id=f"step-{i}", agent="slow_echo", description="d", prompt=f"{secret}{i}"
        )
        for i in range(3)
    ]
    outcomes = asyncio.run(celery_round(local, specs, workflow_id))
    assert [outcome.output for outcome in outcomes] == [f"{secret}{i}" for i in range(3)]

    tasks, raw = flower_tasks(local, wanted=3)

    ours = [task for task in tasks.values() if workflow_id in (task.get("args") or "")]
    assert len(ours) == 3, json.dumps(tasks, indent=1)[:2000]
    for task in ours:
        assert task["name"] == "fleet.run_step"
        assert task["state"] == "SUCCESS"
        assert task["worker"] in local.worker_names
        assert "slow_echo" in task["args"]
    assert sorted(next(i for i in range(3) if f"step-{i}" in task["args"]) for task in ours) == [
        0,
        1,
        2,
    ]
    assert secret not in raw  # not in args, kwargs, result or anything else Flower shows


def test_flower_refuses_requests_without_the_password(local: LocalFleet) -> None:
    """No credentials or a wrong password: 401 from the API and the UI."""
    assert local.flower_url is not None
    with httpx.Client(base_url=local.flower_url, timeout=5) as client:
        assert client.get("/api/tasks").status_code == 401
        assert client.get("/api/workers").status_code == 401
        assert client.get("/tasks").status_code == 401
        wrong = client.get("/api/tasks", auth=(local.flower_user, "not-the-password"))
        assert wrong.status_code == 401
        right = client.get("/api/tasks", auth=(local.flower_user, "flower-test-pw"))
        assert right.status_code == 200


def test_the_password_is_not_on_any_command_line(local: LocalFleet) -> None:
    """Flower's credentials travel in its environment, not in argv that `ps` shows."""
    for process in local.processes:
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"flower-test-pw" not in argv, process
