"""The embedded default journal: one SQLite file, one row per completed step.

The database runs in WAL mode and every :meth:`SQLiteCheckpointStore.record_step` is its
own committed transaction, so a process killed between two steps (even ``kill -9``) loses
nothing it had already recorded. With ``synchronous="NORMAL"`` (the default) a power cut
may lose the last few commits but never corrupts the file; ``"FULL"`` syncs every commit.
Several processes may share one file (writers wait up to ``busy_timeout_s`` for the lock).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from ..checkpoint import WorkflowCheckpoint, WorkflowStepRecord
from ..errors import CheckpointError
from ..sqlite_file import SQLiteFile
from ..sqlite_file import write_transaction as _write_transaction
from .base import Batch, CheckpointStore, GroupCommit, decode_checkpoint, encode_meta

_UPSERT_STEP = (
    "INSERT OR REPLACE INTO fleet_journal_steps (workflow_id, task_id, record) VALUES (?, ?, ?)"
)


__all__ = ["SQLiteCheckpointStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_journal_meta (
    workflow_id TEXT PRIMARY KEY,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_journal_steps (
    workflow_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (workflow_id, task_id)
) WITHOUT ROWID;
"""


class SQLiteCheckpointStore(CheckpointStore):
    """Journals in a local SQLite database file (created, with its directory, on first use).

    Args:
        path: the database file.
        synchronous: SQLite's ``synchronous`` pragma; ``"NORMAL"`` survives a killed
            process, ``"FULL"`` also a power cut, at a higher cost per step.
        busy_timeout_s: how long a write waits for another process holding the lock.

    Calls are short local transactions and run inline on the event loop; the connection
    is guarded by a lock, so a store may also be used from several threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 5.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._file = SQLiteFile(
            self.path,
            schema=_SCHEMA,
            busy_timeout_s=busy_timeout_s,
            synchronous=synchronous,
            place=f"the SQLite journal {str(self.path)!r}",
            errors=(sqlite3.Error, OSError, ValueError),  # OSError/ValueError: the path
        )
        self._group = GroupCommit(self._write_batch)

    def __repr__(self) -> str:
        return f"SQLiteCheckpointStore({str(self.path)!r})"

    def _run(
        self, action: str, workflow_id: str | None, body: Callable[[sqlite3.Connection], T]
    ) -> T:
        return self._file.run(action, body, workflow_id=workflow_id)

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        """The journal for ``workflow_id``, or ``None``; raises ``CheckpointError`` if bad."""

        def read(conn: sqlite3.Connection) -> tuple[str | None, list[tuple[str, str]]]:
            conn.execute("BEGIN")  # one snapshot for meta and steps
            try:
                row = conn.execute(
                    "SELECT meta FROM fleet_journal_meta WHERE workflow_id = ?", (workflow_id,)
                ).fetchone()
                steps = conn.execute(
                    "SELECT task_id, record FROM fleet_journal_steps WHERE workflow_id = ?",
                    (workflow_id,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return (None if row is None else row[0]), steps

        meta, steps = self._run("read a workflow", workflow_id, read)
        if meta is None and not steps:
            return None
        if not all(isinstance(raw, str | bytes) for _key, raw in steps) or not (
            meta is None or isinstance(meta, str | bytes)
        ):
            raise CheckpointError(
                f"workflow checkpoint {workflow_id!r} is unreadable: a stored value is not text",
                workflow_id=workflow_id,
            )
        return decode_checkpoint(workflow_id, meta, steps)

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        """Append or replace one step's record, committed before this returns.

        Steps finishing together share one transaction (a group commit).
        """
        await self._group.submit(workflow_id, record)

    async def _write_batch(self, batch: Batch) -> None:
        metas = [(wid, encode_meta(wid)) for wid in dict.fromkeys(wid for wid, _ in batch)]
        rows = [(wid, record.task_id, record.to_json()) for wid, record in batch]

        def write(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO fleet_journal_meta (workflow_id, meta) VALUES (?, ?)",
                    metas,
                )
                conn.executemany(_UPSERT_STEP, rows)

        self._run("record a step", batch[0][0], write)

    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        """Replace the journal of ``checkpoint.workflow_id`` with ``checkpoint`` (atomically)."""
        workflow_id = checkpoint.workflow_id
        meta = encode_meta(workflow_id, checkpoint.schema_version)
        rows = [(workflow_id, record.task_id, record.to_json()) for record in checkpoint.steps]

        def write(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                _delete(conn, workflow_id)
                conn.execute(
                    "INSERT INTO fleet_journal_meta (workflow_id, meta) VALUES (?, ?)",
                    (workflow_id, meta),
                )
                conn.executemany(_UPSERT_STEP, rows)

        self._run("save a workflow", workflow_id, write)

    async def delete(self, workflow_id: str) -> bool:
        """Remove the journal; returns whether there was one."""

        def write(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                return _delete(conn, workflow_id)

        return self._run("delete a workflow", workflow_id, write)

    async def list_workflows(self) -> list[str]:
        """Workflow ids with a journal, sorted."""

        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT workflow_id FROM fleet_journal_meta UNION "
                "SELECT DISTINCT workflow_id FROM fleet_journal_steps ORDER BY 1"
            ).fetchall()
            return [str(row[0]) for row in rows]

        return self._run("list workflows", None, read)

    async def close(self) -> None:
        """Close the database connection (a later call reopens it)."""
        self._file.close()


def _delete(conn: sqlite3.Connection, workflow_id: str) -> bool:
    meta = conn.execute("DELETE FROM fleet_journal_meta WHERE workflow_id = ?", (workflow_id,))
    steps = conn.execute("DELETE FROM fleet_journal_steps WHERE workflow_id = ?", (workflow_id,))
    return meta.rowcount > 0 or steps.rowcount > 0
