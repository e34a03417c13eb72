"""What the durable-wait tests share: a workflow that asks, and where its runs go.

``backend`` (a fixture) is the embedded default (local executor, SQLite journal) or a
fleet (Celery executor, one real worker process, Redis journal); :class:`Backend` starts
``fleet run`` and ``fleet`` commands against it and reads the step counters and the ask.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.asks import AskRecord, open_ask_book, read
from fleet.config import FleetSettings
from fleet.processes import settings_env
from fleet.runs import open_run_registry
from tests.celery_support import AGENTS_FILE, REPO, fleet_settings, running_workers

FLOW = """
import asyncio, json, os, time
from pathlib import Path

from pydantic import BaseModel, field_validator

from fleet import AgentStepSpec


class Approval(BaseModel):
    approved: bool
    note: str = ""

    @field_validator("note")
    @classmethod
    def _written(cls, note):  # the JSON Schema cannot say this: only the program checks it
        if note.strip() == "TODO":
            raise ValueError("write the note itself, not TODO")
        return note


def spec(workflow, name):
    return AgentStepSpec(
        task_id=f"{workflow.root_id}-{name}", agent="count_and_echo", description=name, prompt=name
    )


async def main(workflow):
    gate = Path(os.environ.get("FLOW_GATE", "/nonexistent"))
    while gate.exists():
        await asyncio.sleep(0.05)
    await workflow.phase("draft", [spec(workflow, f"draft{i}") for i in range(3)])
    decision = await workflow.ask(
        "publish",
        question="Publish the 3 drafts?",
        schema=Approval,
        timeout_s=float(os.environ.get("FLOW_TIMEOUT_S", "600")),
        default=Approval(approved=False, note="nobody answered"),
    )
    out = {"woke": time.time(), **decision.model_dump()}
    Path(os.environ["FLOW_OUT"]).write_text(json.dumps(out))
    if decision.approved:
        await workflow.phase("publish", [spec(workflow, f"publish{i}") for i in range(2)])
    return decision.model_dump()
"""


@dataclass
class Backend:
    """Where a test's runs go: settings, the run options, the step counters."""

    name: str
    settings: FleetSettings
    run_options: list[str]
    counters: Path
    directory: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(settings_env(self.settings))
        env.update(
            PYTHONPATH=str(REPO),
            FLEET_TEST_COUNTER_DIR=str(self.counters),
            FLOW_OUT=str(self.directory / "out.json"),
        )
        env.update(extra)
        return env

    def fleet(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleet", *args],
            cwd=REPO,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self, root: str, target: str = "", **extra: str) -> subprocess.Popen[str]:
        if not target:
            flow = self.directory / "flow.py"
            flow.write_text(FLOW)
            target = f"{flow}:main"
        command = [sys.executable, "-m", "fleet", "run", target, "--root-id", root]
        return subprocess.Popen(
            command + self.run_options,
            cwd=REPO,
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def runs(self, root: str, name: str) -> int:
        path = self.counters / f"{root}-{name}"
        return len(path.read_text()) if path.exists() else 0

    def out(self) -> dict[str, object]:
        return dict(json.loads((self.directory / "out.json").read_text()))

    def ask(self, root: str) -> AskRecord | None:
        async def look() -> AskRecord | None:
            async with open_ask_book(self.settings.store, key_prefix=prefix(self)) as book:
                return await read(book, root, "publish")

        return asyncio.run(look())

    def started(self, root: str) -> bool:
        redis = self.settings.redis_url if self.name == "fleet" else None
        board = open_run_registry(self.settings.store, redis_url=redis, key_prefix=prefix(self))

        async def look() -> bool:
            try:
                return await board.record(root) is not None
            finally:
                await board.close()

        return asyncio.run(look())


def prefix(backend: Backend) -> str:
    return backend.settings.key_prefix


@pytest.fixture(scope="module")
def fleet_backend(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FleetSettings, Path]]:
    """One worker process for the module's fleet runs (2 threads), counting in one folder."""
    directory = tmp_path_factory.mktemp("asks-fleet")
    counters = directory / "counters"
    counters.mkdir()
    settings = fleet_settings(redis_url, store=redis_url, run_index=directory / "runs.db")
    env = {"FLEET_TEST_COUNTER_DIR": str(counters)}
    with running_workers(settings, directory, "w1", concurrency=2, env=env):
        yield settings, counters


@pytest.fixture(params=["local", "fleet"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Backend:
    if request.param == "fleet":
        settings, counters = request.getfixturevalue("fleet_backend")
        return Backend("fleet", settings, ["--executor", "celery"], counters, tmp_path)
    return local_backend(tmp_path, redis_url)


def local_backend(directory: Path, redis_url: str) -> Backend:
    """The embedded default: local executor, the SQLite journal in ``directory``."""
    counters = directory / "counters"
    counters.mkdir()
    settings = FleetSettings(
        store=f"sqlite:{directory / 'journal.db'}",
        redis_url=redis_url,
        key_prefix=f"fleet-test-{uuid.uuid4().hex[:10]}",
        agents_file=AGENTS_FILE,
        run_index=directory / "runs.db",
    )
    return Backend("local", settings, [], counters, directory)


def wait(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 90
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"fleet run exited before {what}: {process.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def waiting_for_answer(backend: Backend, root: str) -> Callable[[], bool]:
    def check() -> bool:
        record = backend.ask(root)
        return record is not None and record.is_open

    return check
