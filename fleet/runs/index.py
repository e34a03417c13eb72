"""The local run index: where each root id's latest run keeps its journal, log and budget.

Every ``fleet run`` notes its run here (``.fleet/runs.db``, ``FLEET_RUN_INDEX``): the root
id, the run id it registered under, and its places with passwords masked. A bare ``fleet
status ROOT`` or ``fleet watch ROOT`` finds the run's places through it; the run itself
(status, heartbeat, cancel) is recorded in the run registry at those places.

The table keeps the name and columns the index had before it noted run ids; the
``run_id`` column is added to a file that lacks it, so indexes written earlier still read.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..sqlite_file import add_column, connect

__all__ = ["IndexEntry", "index_run", "indexed", "indexed_stores"]


@dataclass(frozen=True)
class IndexEntry:
    """One root id's latest run as the index noted it (places masked)."""

    root_id: str
    run_id: str | None
    """``None`` for a run noted by a version that did not record run ids."""
    store: str
    events: str | None
    ledger: str | None
    started: float


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fleet_runs (root_id TEXT PRIMARY KEY, store TEXT NOT NULL, "
    "events TEXT, ledger TEXT, started REAL NOT NULL, run_id TEXT)"
)


def _index(path: Path) -> sqlite3.Connection:
    return connect(path, schema=_SCHEMA, busy_timeout_s=5.0, wal=False, migrate=_add_run_id)


def _add_run_id(conn: sqlite3.Connection) -> None:
    """Give an index written before run ids its ``run_id`` column."""
    add_column(conn, "fleet_runs", "run_id", "TEXT")


def index_run(
    path: Path, root_id: str, run_id: str, *, store: str, events: str | None, ledger: str | None
) -> None:
    """Note the run's id and places (give them masked) so ``fleet status ROOT`` finds it."""
    try:
        conn = _index(path)
        with contextlib.closing(conn):
            conn.execute(
                "INSERT OR REPLACE INTO fleet_runs (root_id, store, events, ledger, started, "
                "run_id) VALUES (?, ?, ?, ?, ?, ?)",
                (root_id, store, events, ledger, time.time(), run_id),
            )
    except (OSError, sqlite3.Error):
        pass  # the index is a convenience: a read-only directory must not fail the run


def indexed(path: Path, root_id: str) -> IndexEntry | None:
    """The index's entry for ``root_id``, if any (``None`` too when it cannot be read)."""
    if not path.exists():
        return None
    try:
        conn = _index(path)
        with contextlib.closing(conn):
            row = conn.execute(
                "SELECT root_id, run_id, store, events, ledger, started FROM fleet_runs "
                "WHERE root_id = ?",
                (root_id,),
            ).fetchone()
    except (OSError, sqlite3.Error):
        return None
    return None if row is None else IndexEntry(*row)


def indexed_stores(path: Path) -> list[str]:
    """Every journal the run index has seen runs use, newest first (passwords masked)."""
    if not path.exists():
        return []
    try:
        conn = _index(path)
        with contextlib.closing(conn):
            rows = conn.execute(
                "SELECT store FROM fleet_runs GROUP BY store ORDER BY MAX(started) DESC"
            ).fetchall()
    except (OSError, sqlite3.Error):
        return []
    return [str(row[0]) for row in rows]
