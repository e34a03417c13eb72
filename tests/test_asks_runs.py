"""Durable waits end to end: `fleet run` asks, `fleet answer` answers, a killed host resumes.

Every test runs twice: on the embedded default (local executor, SQLite journal) and on a
fleet (Celery executor, real worker processes, Redis journal). Steps count their runs in
files (tests.agents:count_and_echo), so a test sees that what completed before the ask ran
exactly once across the kill and the re-run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.asks import AskRecord, give_answer, open_ask_book
from tests import asks_support
from tests.asks_support import Backend, local_backend, prefix, wait, waiting_for_answer
from tests.celery_support import REPO

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

backend = asks_support.backend  # the fixtures: each test runs locally and on a fleet
fleet_backend = asks_support.fleet_backend


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


def test_the_approval_example_runs_and_waits_for_fleet_answer(
    tmp_path: Path, redis_url: str
) -> None:
    """`fleet run examples/approval.py:main` drafts, waits, and publishes once approved."""
    local = local_backend(tmp_path, redis_url)
    run = local.start("release-1", "examples/approval.py:main")
    try:
        wait(waiting_for_answer(local, "release-1"), run, "the ask")
        asked = local.ask("release-1")
        assert asked is not None and asked.question is not None
        assert asked.question.startswith("Publish these release notes? ")
        given = local.fleet(
            "answer", "release-1", "publish", "--json", '{"approved": true, "note": "ship it"}'
        )
        assert given.returncode == 0, given.stdout + given.stderr
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert '"published": true' in stdout and '"note": "ship it"' in stdout
    assert "phase 3 publish: 1 ok, 0 failed" in stdout


def test_an_answer_to_a_name_not_asked_names_the_open_asks(tmp_path: Path, redis_url: str) -> None:
    """A mistyped ask name is kept as an early answer; the line says what the run waits on."""
    local = local_backend(tmp_path, redis_url)
    run = local.start("typo-1")
    try:
        wait(waiting_for_answer(local, "typo-1"), run, "the ask")
        done = local.fleet("answer", "typo-1", "publsh", "--json", '{"approved": true}')
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(it is waiting on: 'publish')" in done.stdout + done.stderr
        assert run.poll() is None  # the open ask is untouched
    finally:
        run.kill()  # SIGKILL, by PID
        run.communicate()


def test_after_a_cancel_status_says_nothing_waits_on_the_open_ask(
    tmp_path: Path, redis_url: str
) -> None:
    """Cancelled while waiting: the ask stays open, but `fleet status` does not say WAITING."""
    local = local_backend(tmp_path, redis_url)
    run = local.start("cancelled-1")
    try:
        wait(waiting_for_answer(local, "cancelled-1"), run, "the ask")
        cancel = local.fleet("cancel", "cancelled-1")
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        run.communicate(timeout=60)
    finally:
        run.kill()  # by PID; already gone after the cancel
    status = local.fleet("status", "cancelled-1")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ask publish: OPEN (no host waits on it now) since" in status.stdout
    assert "WAITING" not in status.stdout
    assert "the next run with --root-id cancelled-1 takes it" in status.stdout


def reopened(backend: Backend, root: str) -> Callable[[], bool]:
    """Whether the host refused the answer given and reopened its ask (with a note)."""

    def check() -> bool:
        record = backend.ask(root)
        return record is not None and record.is_open and record.note is not None

    return check


def test_an_answer_the_model_refuses_reopens_the_ask_and_says_why(backend: Backend) -> None:
    """Fits the JSON Schema, refused by the model's validator: exit 0 warns; status says why."""
    root = f"model-{backend.name}"
    run = backend.start(root)
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
        todo = '{"approved": true, "note": "TODO"}'
        given = backend.fleet("answer", root, "publish", "--json", todo, "--by", "carol")
        assert given.returncode == 0, given.stdout + given.stderr
        assert "the program checks it with its model Approval when it reads it" in given.stdout
        assert f"the ask reopens and `fleet status {root}` says why" in given.stdout
        wait(reopened(backend, root), run, "the model's refusal to reopen the ask")
        status = backend.fleet("status", root)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "ask publish: WAITING since" in status.stdout
        assert "note: the answer by carol was not taken" in status.stdout
        assert "write the note itself, not TODO" in status.stdout
        listing = backend.fleet("asks")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        assert f"{root}  publish  asked " in listing.stdout
        assert "note: the answer by carol was not taken" in listing.stdout
        later = backend.fleet("answer", root, "publish", "--json", '{"approved": false}')
        assert later.returncode == 0, later.stdout + later.stderr
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert backend.out()["approved"] is False
    assert backend.runs(root, "publish0") == 0


def test_answer_reads_a_file_and_finds_the_journal_given_with_store(
    tmp_path: Path, redis_url: str
) -> None:
    """From a directory with no journal: --store names it, --file holds the answer."""
    local = local_backend(tmp_path, redis_url)
    run = local.start("file-1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(REPO), FLEET_REDIS_URL=redis_url)

    def answer(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fleet", "answer", "file-1", "publish", *args]
        return subprocess.run(
            command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
        )

    store = ["--store", local.settings.store]
    good = elsewhere / "answer.json"
    good.write_text('{"approved": true, "note": "from a file"}\n')
    bad = elsewhere / "bad.json"
    bad.write_text('{"approved": true,')
    try:
        wait(waiting_for_answer(local, "file-1"), run, "the ask")
        missing = one_line(answer("--file", str(elsewhere / "nope.json"), *store))
        assert "cannot read the answer from" in missing and "nope.json" in missing
        assert "cannot read the answer from" in one_line(answer("--file", str(elsewhere), *store))
        assert "the answer is not JSON" in one_line(answer("--file", str(bad), *store))
        unplaced = one_line(answer("--file", str(good)))  # this directory's journal: empty
        assert "no workflow 'file-1' found" in unplaced
        assert run.poll() is None  # nothing above reached the ask
        given = answer("--file", str(good), *store, "--by", "filer")
        assert given.returncode == 0, given.stdout + given.stderr
        assert "answered 'publish' of workflow 'file-1' (by filer)" in given.stdout
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert local.out()["approved"] is True and local.out()["note"] == "from a file"
