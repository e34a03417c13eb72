"""Durable waits end to end: `fleet run` asks, `fleet answer` answers, a killed host resumes.

Every test runs twice: on the embedded default (local executor, SQLite journal) and on a
fleet (Celery executor, real worker processes, Redis journal). Steps count their runs in
files (tests.agents:count_and_echo), so a test sees that what completed before the ask ran
exactly once across the kill and the re-run.
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

from fleet.asks import AskRecord, give_answer, open_ask_book, read
from fleet.cancel import open_cancel_board
from fleet.config import FleetSettings
from fleet.localfleet import settings_env
from tests.celery_support import AGENTS_FILE, REPO, fleet_settings, running_workers

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

FLOW = """
import asyncio, json, os, time
from pathlib import Path

from pydantic import BaseModel

from fleet import AgentStepSpec


class Approval(BaseModel):
    approved: bool
    note: str = ""


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

    def start(self, root: str, **extra: str) -> subprocess.Popen[str]:
        flow = self.directory / "flow.py"
        flow.write_text(FLOW)
        command = [sys.executable, "-m", "fleet", "run", f"{flow}:main", "--root-id", root]
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
        board = open_cancel_board(self.settings.store, redis_url=redis, key_prefix=prefix(self))

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
    counters = tmp_path / "counters"
    counters.mkdir()
    settings = FleetSettings(
        store=f"sqlite:{tmp_path / 'journal.db'}",
        redis_url=redis_url,
        key_prefix=f"fleet-test-{uuid.uuid4().hex[:10]}",
        agents_file=AGENTS_FILE,
        run_index=tmp_path / "runs.db",
    )
    return Backend("local", settings, [], counters, tmp_path)


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


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused `fleet answer` prints (no traceback anywhere)."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_host_killed_while_waiting_resumes_with_the_answer(backend: Backend) -> None:
    """SIGKILLed while waiting, answered with `fleet answer`: the re-run goes straight on."""
    root = f"kill-{backend.name}"
    run = backend.start(root)
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
        status = backend.fleet("status", root)
        assert status.returncode == 0, status.stderr
        assert "ask publish: WAITING since" in status.stdout
        assert "Publish the 3 drafts?" in status.stdout
        listing = backend.fleet("asks")
        assert listing.returncode == 0, listing.stderr
        assert f"{root}  publish  asked " in listing.stdout
        assert listing.stdout.rstrip().endswith("Publish the 3 drafts?")
        wrong = backend.fleet("answer", root, "publish", "--json", '{"approved": "yes"}')
        assert "field approved" in one_line(wrong)
        assert run.poll() is None  # the refused answer changed nothing: still waiting
    finally:
        run.kill()  # SIGKILL, by PID
        run.communicate()
    assert [backend.runs(root, f"draft{i}") for i in range(3)] == [1, 1, 1]
    assert backend.runs(root, "publish0") == 0

    given = backend.fleet(
        "answer",
        root,
        "publish",
        "--json",
        '{"approved": true, "note": "ship it"}',
        "--by",
        "alice",
    )
    assert given.returncode == 0, given.stdout + given.stderr
    assert "answered 'publish'" in given.stdout
    again = backend.fleet("answer", root, "publish", "--json", '{"approved": false}')
    assert "already answered (by alice" in one_line(again)

    rerun = backend.start(root)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout + stderr
    assert "'publish' answered by alice" in stdout
    assert "waiting for an answer" not in stdout
    assert backend.out()["approved"] is True and backend.out()["note"] == "ship it"
    assert [backend.runs(root, f"draft{i}") for i in range(3)] == [1, 1, 1]
    assert [backend.runs(root, f"publish{i}") for i in range(2)] == [1, 1]
    assert backend.ask(root) is None  # finished: its asks are cleared


def test_a_waiting_host_wakes_within_a_second_of_the_answer(backend: Backend) -> None:
    """The host polls its ask: an answer is seen within the documented second."""
    root = f"wake-{backend.name}"
    run = backend.start(root)
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
        time.sleep(1.0)  # well into the wait

        async def answer() -> AskRecord:
            async with open_ask_book(backend.settings.store, key_prefix=prefix(backend)) as book:
                return await give_answer(book, root, "publish", {"approved": False}, by="bot")

        taken = asyncio.run(answer())
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert taken.answered_at is not None
    assert float(str(backend.out()["woke"])) - taken.answered_at < 1.0
    assert backend.out()["approved"] is False
    assert backend.runs(root, "publish0") == 0


@pytest.mark.parametrize("fits", [True, False])
def test_an_early_answer_is_kept(backend: Backend, fits: bool) -> None:
    """Answered while earlier phases run: taken when asked, or the ask stays open and says why."""
    root = f"early-{backend.name}-{fits}"
    gate = backend.directory / "gate"
    gate.touch()
    run = backend.start(root, FLOW_GATE=str(gate))
    try:
        wait(lambda: backend.started(root), run, "the run to start")
        answer = '{"approved": true}' if fits else '{"approved": "later"}'
        given = backend.fleet("answer", root, "publish", "--json", answer, "--by", "early-bird")
        assert given.returncode == 0, given.stdout + given.stderr
        assert "has not asked it yet" in given.stdout
        gate.unlink()
        if not fits:
            wait(waiting_for_answer(backend, root), run, "the ask")
            status = backend.fleet("status", root)
            assert "ask publish: WAITING since" in status.stdout
            assert "note: an answer given early by early-bird" in status.stdout
            assert "field approved" in status.stdout
            later = backend.fleet("answer", root, "publish", "--json", '{"approved": true}')
            assert later.returncode == 0, later.stdout + later.stderr
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert ("waiting for an answer" in stdout) is not fits
    assert backend.out()["approved"] is True
    assert [backend.runs(root, f"publish{i}") for i in range(2)] == [1, 1]


def test_a_deadline_returns_the_default_and_holds_on_a_rerun(backend: Backend) -> None:
    """Killed while waiting, re-run after the deadline: the default at once, answers refused."""
    root = f"deadline-{backend.name}"
    run = backend.start(root, FLOW_TIMEOUT_S="4")
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
    finally:
        run.kill()
        run.communicate()
    record = backend.ask(root)
    assert record is not None and record.deadline is not None
    time.sleep(max(record.deadline - time.time(), 0) + 0.1)
    late = backend.fleet("answer", root, "publish", "--json", '{"approved": true}')
    assert "past its deadline" in one_line(late)

    rerun = backend.start(root, FLOW_TIMEOUT_S="600")  # the journaled deadline holds
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout + stderr
    assert "nobody answered 'publish' before its deadline; using its default" in stdout
    assert "waiting for an answer" not in stdout
    assert backend.out()["approved"] is False and backend.out()["note"] == "nobody answered"
    assert [backend.runs(root, f"draft{i}") for i in range(3)] == [1, 1, 1]
    assert backend.runs(root, "publish0") == 0


def test_answering_an_unknown_workflow_exits_1_with_one_line(backend: Backend) -> None:
    """No such workflow: one line naming it, exit 1, no traceback."""
    done = backend.fleet("answer", "no-such-run", "publish", "--json", "true")
    assert "no workflow 'no-such-run' found" in one_line(done)
    bad = backend.fleet("answer", "no-such-run", "publish", "--json", "{not json")
    assert "not JSON" in one_line(bad)
