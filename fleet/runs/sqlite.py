"""The run registry of the embedded default: two tables in the run's SQLite journal file.

A local run (``fleet run`` on the local executor with a ``sqlite:`` store) registers
itself here and polls its marker, so ``fleet cancel ROOT_ID`` from another terminal on
the same machine reaches it without Redis.

Tables: ``fleet_workflow_runs`` (the latest run per root id: run id, status, when, why,
and the host's last heartbeat) and ``fleet_cancel_markers`` (a
:class:`~fleet.runs.CancelNotice` per cancelled run id, with an expiry time). The tables
keep the names and columns the cancel board gave them, so journal files written by an
earlier version still read (and earlier versions still read these).
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from pathlib import Path

from ..sqlite_file import SQLiteFile, add_column, write_transaction
from .base import CANCEL_TTL_S, CancelNotice, RunRecord, RunRegistry, RunState

__all__ = ["SQLiteRunRegistry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_workflow_runs (
    root_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    reason TEXT,
    beat_at REAL
);
CREATE TABLE IF NOT EXISTS fleet_cancel_markers (
    run_id TEXT PRIMARY KEY,
    notice TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


class SQLiteRunRegistry(RunRegistry):
    """A run registry in a SQLite file (the journal's, by default).

    Args:
        path: the database file (created, with its directory, on first use).
        marker_ttl_s: how long a cancel marker is kept.
        busy_timeout_s: how long a write waits for another process holding the lock.

    Calls are short local transactions run inline; a lock guards the connection.
    """

    def __init__(
        self, path: str | Path, *, marker_ttl_s: int = CANCEL_TTL_S, busy_timeout_s: float = 5.0
    ) -> None:
        self.path = Path(path)
        self.marker_ttl_s = marker_ttl_s
        self.busy_timeout_s = busy_timeout_s
        self._file = SQLiteFile(
            self.path, schema=_SCHEMA, busy_timeout_s=busy_timeout_s, migrate=_add_heartbeat_column
        )

    def __repr__(self) -> str:
        return f"SQLiteRunRegistry({str(self.path)!r})"

    async def begin(self, root_id: str, run_id: str) -> None:
        """Register the live run (replacing the record of any earlier run)."""

        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "INSERT OR REPLACE INTO fleet_workflow_runs (root_id, run_id, status, "
                "started_at, beat_at) VALUES (?, ?, 'running', ?, ?)",
                (root_id, run_id, now, now),
            )
            conn.execute("DELETE FROM fleet_cancel_markers WHERE expires_at < ?", (time.time(),))

        self._file.run("register a workflow run", write)

    async def heartbeat(self, root_id: str, run_id: str) -> None:
        """Refresh the live run's heartbeat."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE fleet_workflow_runs SET beat_at = ? WHERE root_id = ? AND run_id = ? "
                "AND status = 'running'",
                (time.time(), root_id, run_id),
            )

        self._file.run_if_exists("refresh a workflow heartbeat", write, None)

    async def request(
        self, root_id: str, reason: str, *, run_id: str | None = None
    ) -> CancelNotice | None:
        """Cancel the live run of ``root_id`` in one transaction; ``None`` when none is live."""

        def write(conn: sqlite3.Connection) -> CancelNotice | None:
            with write_transaction(conn):
                return _cancel_live(conn)

        def _cancel_live(conn: sqlite3.Connection) -> CancelNotice | None:
            row = conn.execute(
                "SELECT run_id FROM fleet_workflow_runs WHERE root_id = ? AND status = 'running'",
                (root_id,),
            ).fetchone()
            if row is None or (run_id is not None and row[0] != run_id):
                return None
            now = time.time()
            notice = CancelNotice(root_id=root_id, run_id=row[0], reason=reason, at=now)
            conn.execute(
                "UPDATE fleet_workflow_runs SET status = 'cancelled', ended_at = ?, "
                "reason = ? WHERE root_id = ?",
                (now, reason, root_id),
            )
            conn.execute(
                "INSERT OR REPLACE INTO fleet_cancel_markers VALUES (?, ?, ?)",
                (notice.run_id, notice.to_json(), now + self.marker_ttl_s),
            )
            return notice

        return self._file.run_if_exists("cancel a workflow", write, None)

    async def check(self, run_id: str) -> CancelNotice | None:
        """The marker of ``run_id``, if one was left (and has not expired)."""

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT notice FROM fleet_cancel_markers WHERE run_id = ? AND expires_at >= ?",
                (run_id, time.time()),
            ).fetchone()
            return None if row is None else str(row[0])

        raw = self._file.run_if_exists("read a cancel marker", read, None)
        return None if raw is None else CancelNotice.from_json(raw)

    async def end(self, root_id: str, run_id: str, status: RunState) -> None:
        """Record how the run ended (a cancelled or superseded record is left alone)."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE fleet_workflow_runs SET status = ?, ended_at = ? WHERE root_id = ? "
                "AND run_id = ? AND status = 'running'",
                (status, time.time(), root_id, run_id),
            )

        self._file.run_if_exists("record a workflow end", write, None)

    async def latest(self, root_id: str) -> RunRecord | None:
        """The latest run of ``root_id``."""
        rows = self._rows("WHERE root_id = ?", (root_id,))
        return rows[0] if rows else None

    async def list(self, *, limit: int = 100) -> builtins.list[RunRecord]:
        """The latest run of each root id recorded here, newest start first."""
        return self._rows("ORDER BY started_at DESC LIMIT ?", (max(limit, 0),))

    def _rows(self, where: str, args: tuple[object, ...]) -> builtins.list[RunRecord]:
        def read(conn: sqlite3.Connection) -> builtins.list[tuple[object, ...]]:
            cursor = conn.execute(
                "SELECT root_id, run_id, status, started_at, ended_at, reason, beat_at "
                f"FROM fleet_workflow_runs {where}",
                args,
            )
            return [tuple(row) for row in cursor.fetchall()]

        rows = self._file.run_if_exists("read workflow runs", read, None) or []
        names = ("root_id", "run_id", "status", "started_at", "ended_at", "reason", "beat_at")
        return [RunRecord.model_validate(dict(zip(names, row, strict=True))) for row in rows]

    async def close(self) -> None:
        """Close the connection (a later call reopens it)."""
        self._file.close()


def _add_heartbeat_column(conn: sqlite3.Connection) -> None:
    """Give a journal file written before heartbeats its ``beat_at`` column."""
    add_column(conn, "fleet_workflow_runs", "beat_at", "REAL")
