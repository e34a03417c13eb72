"""One run, one id: the run registry, its index, its log, ``fleet status``, the dashboard.

A run of ``fleet run`` (on the embedded default's SQLite journal, and on Redis) is recorded
in the run registry (:mod:`fleet.runs`) under one run id, and that same id is what the
local run index notes, what the run log's start and end entries carry, what ``fleet
status`` and ``fleet cancel`` print and what the dashboard's API lists.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.config import FleetSettings
from fleet.processes import settings_env
from fleet.runlog import open_log_reader
from fleet.runs import RunRecord, RunRegistry, open_run_registry
from fleet.runs.index import indexed
from tests.dashboard_support import running_dashboard
from tests.test_workflow import FLOW, wait_for

REPO = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path, redis_url: str, key_prefix: str, backend: str) -> FleetSettings:
    store = f"sqlite:{tmp_path / 'journal.db'}" if backend == "sqlite" else redis_url
    return FleetSettings(
        store=store,
        redis_url=redis_url,
        key_prefix=key_prefix,
        run_index=tmp_path / "runs.db",
        agents_file=tmp_path / "no-agents.toml",
    )


def _env(settings: FleetSettings, counters: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings))
    env.update(PYTHONPATH=str(REPO), FLEET_TEST_COUNTER_DIR=str(counters), **extra)
    return env


def _fleet(settings: FleetSettings, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=tmp_path,
        env=_env(settings, tmp_path / "counters"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _log_runs(settings: FleetSettings, root_id: str) -> dict[str, list[str]]:
    """The ``run`` of every start and end entry of the root id's log, oldest first."""
    events = settings.store if settings.store.startswith("sqlite:") else settings.redis_url
    reader = open_log_reader(events, key_prefix=settings.key_prefix)
    try:
        entries = reader.after(root_id, "0", wait_s=0)
    finally:
        reader.close()
    runs: dict[str, list[str]] = {"start": [], "end": []}
    for entry in entries:
        control = entry.fields.get("control")
        if control in runs:
            runs[control].append(entry.fields["run"])
    return runs


def _registry(settings: FleetSettings) -> tuple[RunRecord | None, list[RunRecord]]:
    async def read() -> tuple[RunRecord | None, list[RunRecord]]:
        redis = None if settings.store.startswith("sqlite:") else settings.redis_url
        registry = open_run_registry(
            settings.store, redis_url=redis, key_prefix=settings.key_prefix
        )
        try:
            return await registry.latest("one-id"), await registry.list()
        finally:
            await registry.close()

    return asyncio.run(read())


def _flow(tmp_path: Path) -> str:
    (tmp_path / "counters").mkdir(exist_ok=True)
    (tmp_path / "flow.py").write_text(FLOW)
    return "flow.py:main"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_one_run_has_one_id_everywhere(
    tmp_path: Path, redis_url: str, key_prefix: str, backend: str
) -> None:
    """Index, registry (latest and list), log start and end, status and dashboard agree."""
    settings = _settings(tmp_path, redis_url, key_prefix, backend)
    done = _fleet(settings, tmp_path, "run", _flow(tmp_path), "--root-id", "one-id")
    assert done.returncode == 0, done.stderr
    entry = indexed(settings.run_index, "one-id")
    assert entry is not None and entry.run_id is not None
    run_id = entry.run_id
    latest, listed = _registry(settings)
    assert latest is not None and (latest.run_id, latest.status) == (run_id, "finished")
    assert [(record.root_id, record.run_id) for record in listed] == [("one-id", run_id)]
    assert _log_runs(settings, "one-id") == {"start": [run_id], "end": [run_id]}
    status = _fleet(settings, tmp_path, "status", "one-id")
    assert status.returncode == 0, status.stderr
    assert f"(run {run_id})" in status.stdout + status.stderr
    with running_dashboard(settings, tmp_path) as dashboard, dashboard.client() as client:
        rows = {row["root_id"]: row for row in client.get("/api/workflows").json()}
        assert rows["one-id"]["run_id"] == run_id
        assert client.get("/api/workflows/one-id").json()["run_id"] == run_id


def test_a_cancelled_run_is_cancelled_under_the_id_its_log_carries(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """``fleet cancel`` names the run id of the log's start and end and of the index."""
    settings = _settings(tmp_path, redis_url, key_prefix, "sqlite")
    counters = tmp_path / "counters"
    target = _flow(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", target, "--root-id", "one-id"],
        cwd=tmp_path,
        env=_env(settings, counters, FLOW_HANG="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for((counters / "reached-phase-3").exists, 60, child)
        cancelled = _fleet(settings, tmp_path, "cancel", "one-id")
        assert cancelled.returncode == 0, cancelled.stderr
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    said = re.search(r"\(run (r-[0-9a-f]+)", cancelled.stdout + cancelled.stderr)
    assert said is not None, cancelled.stdout + cancelled.stderr
    run_id = said.group(1)
    entry = indexed(settings.run_index, "one-id")
    assert entry is not None and entry.run_id == run_id
    latest, _listed = _registry(settings)
    assert latest is not None and (latest.run_id, latest.status) == (run_id, "cancelled")
    assert _log_runs(settings, "one-id") == {"start": [run_id], "end": [run_id]}


def test_list_is_newest_first_on_every_registry(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """``list`` gives each root id's latest run, newest start first, at most ``limit``."""
    from fleet.runs import MemoryRunRegistry, RedisRunRegistry, SQLiteRunRegistry

    async def listing(registry: RunRegistry) -> list[tuple[str, str, str]]:
        try:
            for root_id, run_id in (("a", "r-1"), ("b", "r-2"), ("a", "r-3")):
                await registry.begin(root_id, run_id)
                await asyncio.sleep(0.01)  # distinct start times, so the order is defined
            await registry.end("a", "r-3", "finished")
            first = await registry.list(limit=1)
            return [(r.root_id, r.run_id, r.status) for r in await registry.list()] + [
                (r.root_id, r.run_id, "first") for r in first
            ]
        finally:
            await registry.close()

    registries: list[RunRegistry] = [
        MemoryRunRegistry(),
        SQLiteRunRegistry(tmp_path / "j.db"),
        RedisRunRegistry(redis_url, key_prefix=key_prefix),
    ]
    for registry in registries:
        assert asyncio.run(listing(registry)) == [
            ("a", "r-3", "finished"),
            ("b", "r-2", "running"),
            ("a", "r-3", "first"),
        ], registry


def test_an_index_written_before_run_ids_still_reads(tmp_path: Path) -> None:
    """A run index without the ``run_id`` column reads, and gains the column on a write."""
    import sqlite3

    from fleet.runs.index import index_run, indexed_stores

    path = tmp_path / "runs.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE fleet_runs (root_id TEXT PRIMARY KEY, store TEXT NOT NULL, "
            "events TEXT, ledger TEXT, started REAL NOT NULL)"
        )
        conn.execute("INSERT INTO fleet_runs VALUES ('old', 'sqlite:j.db', NULL, NULL, 1.0)")
    conn.close()
    old = indexed(path, "old")
    assert old is not None and (old.store, old.run_id) == ("sqlite:j.db", None)
    index_run(path, "new", "r-9", store="sqlite:k.db", events=None, ledger=None)
    new = indexed(path, "new")
    assert new is not None and (new.store, new.run_id) == ("sqlite:k.db", "r-9")
    assert indexed_stores(path) == ["sqlite:k.db", "sqlite:j.db"]
