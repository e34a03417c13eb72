"""A run whose host died reads as abandoned: status, watch, cancel and the dashboard agree."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.config import load_settings
from fleet.ledgers import RedisLedger
from fleet.runs import (
    HEARTBEAT_LAPSE_S,
    HEARTBEAT_S,
    MemoryRunRegistry,
    RunRecord,
    SQLiteRunRegistry,
)
from tests.dashboard_support import running_dashboard

REPO = Path(__file__).resolve().parents[1]

FLOW = """\
import asyncio
from fleet import AgentResult, AgentStepSpec

async def slow(spec, ctx):
    await asyncio.sleep(300)
    return AgentResult(output="never")

AGENTS = {"slow": slow}

async def main(workflow):
    await workflow.phase("wait", [
        AgentStepSpec(task_id=f"s{n}", agent="slow", description="", prompt="x")
        for n in range(2)
    ])
"""


def _env(tmp_path: Path, store: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        PYTHONPATH=str(REPO),
        FLEET_AGENTS_FILE=str(tmp_path / "no-agents.toml"),
        FLEET_STORE=store,
        FLEET_RUN_INDEX=str(tmp_path / "runs.db"),
        COLUMNS="200",
    )
    return env


def _fleet(tmp_path: Path, store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=tmp_path,
        env=_env(tmp_path, store),
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture
def host(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A `fleet run` host process (store as parametrised), running two 300 s steps."""
    store = request.param
    if store == "redis":
        store = request.getfixturevalue("redis_url")
    else:
        store = f"sqlite:{tmp_path / 'journal.db'}"
    (tmp_path / "flow.py").write_text(FLOW)
    process = subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", "flow.py:main", "--root-id", "doomed"]
        + ["--budget", "100000"],
        cwd=tmp_path,
        env=_env(tmp_path, store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while "running since" not in _fleet(tmp_path, store, "status", "doomed").stdout:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        yield store, process.pid
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(240)
@pytest.mark.parametrize("host", ["sqlite", "redis"], indirect=True)
def test_a_sigkilled_host_reads_as_abandoned_everywhere(
    tmp_path: Path, host: tuple[str, int]
) -> None:
    """SIGKILL the host: within the lapse its run is abandoned in status, watch, cancel, page."""
    store, pid = host
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    status = _fleet(tmp_path, store, "status", "doomed")
    assert "running since" in status.stdout  # the heartbeat has not lapsed yet
    while "abandoned" not in (status := _fleet(tmp_path, store, "status", "doomed")).stdout:
        # the documented bound: silent for more than the lapse, read once more
        assert time.monotonic() - killed <= HEARTBEAT_LAPSE_S + HEARTBEAT_S + 10, status.stdout
        time.sleep(1.0)
    assert time.monotonic() - killed > HEARTBEAT_LAPSE_S - HEARTBEAT_S
    assert "  abandoned: started" in status.stdout
    assert "were in flight when its host stopped" in status.stdout
    assert "re-run with --root-id doomed to resume" in status.stdout

    watch = _fleet(tmp_path, store, "watch", "doomed", "--timeout", "60")
    assert watch.returncode == 1
    assert "abandoned: its host stopped heartbeating" in watch.stdout
    assert "gave up" not in watch.stdout

    settings = load_settings(store=store, run_index=tmp_path / "runs.db")
    released = asyncio.run(_release_reservations(store, "doomed"))
    with (
        running_dashboard(settings, tmp_path, FLEET_DASHBOARD_SHOW_OUTPUT="1") as dashboard,
        dashboard.client() as client,
    ):
        if store.startswith("redis"):  # a run logged to Redis has a live-output route
            # It ends, as the run will write no more: no stream slot is kept forever (the
            # client's 10 s read timeout is shorter than the 15 s keep-alive).
            path = "/api/workflows/doomed/steps/s0/live"
            with client.stream("GET", path) as live:
                assert live.status_code == 200, live.read()
                assert "event: end" in live.read().decode()
        row = next(r for r in client.get("/api/workflows").json() if r["root_id"] == "doomed")
        assert row["status"] == "abandoned" and row["steps_in_flight"] == 0
        detail = client.get("/api/workflows/doomed").json()
        assert detail["status"] == "abandoned"
        assert "stopped heartbeating" in detail["abandoned"]
        shown = [step["status"] for phase in detail["phases"] for step in phase["steps"]]
        assert shown == ["interrupted", "interrupted"]  # in flight when killed, never running
        assert detail["steps_interrupted"] == 2 and detail["steps_in_flight"] == 0
        step = client.get("/api/workflows/doomed/steps/s0").json()
        assert step["status"] == "interrupted"
        metrics = client.get("/metrics").text
        assert 'fleet_steps{agent="slow",status="interrupted"} 2' in metrics, metrics
        assert (
            'status="running"} '
            not in metrics.split("# HELP fleet_steps_failed")[0].split("# HELP fleet_steps ")[1]
        )
        assert 'fleet_workflows{status="abandoned"} 1' in metrics
        # The budget agrees with the ledger (as `fleet status` reads it), or, logged, is the
        # last reading: its reservations are not presented as held.
        assert detail["budget"]["limit_tokens"] == 100_000
        if store.startswith("redis"):
            assert released == 2  # each in-flight step held tokens until they were settled
            assert detail["budget"]["consumed_tokens"] == 1000, detail["budget"]
            assert detail["budget"]["reserved_tokens"] == 0, detail["budget"]
            status_text = _fleet(tmp_path, store, "status", "doomed").stdout
            budget_line = next(line for line in status_text.splitlines() if "budget:" in line)
            assert "1000" in budget_line, budget_line  # `fleet status` reads the same ledger
        else:
            assert detail["budget_live"] is False, detail
        page = client.get("/workflows/doomed").text
        assert 'class="badge abandoned">abandoned<' in page
        assert "2 interrupted" in page and '<td class="st">running<' not in page
        assert [r["root_id"] for r in client.get("/api/workflows?status=abandoned").json()] == [
            "doomed"
        ]

    cancel = _fleet(tmp_path, store, "cancel", "doomed")
    assert cancel.returncode == 1
    assert "no host runs its steps, so nothing is stopped" in cancel.stdout
    assert "stop within" not in cancel.stdout
    after = _fleet(tmp_path, store, "status", "doomed")
    assert "its host was already gone" in after.stdout


async def _release_reservations(store: str, root_id: str) -> int:
    """Settle the killed host's reservations, 500 tokens used each; how many there were.

    As a worker that finished a step after its host died does, on a Redis ledger.
    """
    if not store.startswith("redis"):
        return 0
    ledger = RedisLedger(store)
    try:
        held = await ledger.reservations(root_id)
        for reservation in held:
            await ledger.settle(root_id, reservation.id, 500)
        return len(held)
    finally:
        await ledger.close()


def test_a_live_host_heartbeats_its_record(tmp_path: Path) -> None:
    """While a run lives its record's heartbeat moves; a record left alone lapses."""

    async def scenario() -> None:
        for board in (MemoryRunRegistry(), SQLiteRunRegistry(tmp_path / "j.db")):
            await board.begin("r", "run-1")
            first = await board.record("r")
            assert first is not None and first.beat_at is not None and not first.abandoned
            await asyncio.sleep(0.05)
            await board.beat("r", "run-1")
            await board.beat("r", "run-other")  # a superseded run's beat changes nothing
            second = await board.record("r")
            assert second is not None and second.beat_at is not None
            assert second.beat_at > first.beat_at
            await board.close()

    asyncio.run(scenario())
    now = time.time()
    stale = RunRecord(
        root_id="r",
        run_id="x",
        status="running",
        started_at=now - 100,
        beat_at=now - HEARTBEAT_LAPSE_S - 1,
    )
    assert stale.abandoned and stale.shown_status == "abandoned"
    assert not stale.model_copy(update={"status": "finished"}).abandoned
    fresh = stale.model_copy(update={"beat_at": now - HEARTBEAT_LAPSE_S + 2})
    assert not fresh.abandoned and fresh.shown_status == "running"


def test_a_journal_file_from_before_heartbeats_still_opens(tmp_path: Path) -> None:
    """A run table without the heartbeat column gets it; its records read and beat."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE fleet_workflow_runs (root_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, "
            "status TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL, reason TEXT)"
        )
        conn.execute(
            "INSERT INTO fleet_workflow_runs VALUES ('old', 'r-1', 'finished', 1.0, 2.0, NULL)"
        )
    conn.close()

    async def scenario() -> None:
        board = SQLiteRunRegistry(path)
        try:
            old = await board.record("old")
            assert old is not None and old.status == "finished" and old.beat_at is None
            await board.begin("new", "r-2")
            await board.beat("new", "r-2")
            new = await board.record("new")
            assert new is not None and new.beat_at is not None and not new.abandoned
        finally:
            await board.close()

    asyncio.run(scenario())
