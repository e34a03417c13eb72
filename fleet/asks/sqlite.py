"""The ask book of the embedded default: a table in the run's SQLite journal file.

Table ``fleet_asks`` (root id, name, the record's JSON). A swap is one ``BEGIN
IMMEDIATE`` transaction, so the host and a ``fleet answer`` in another terminal never
both win. Every call runs in a thread: a write waits up to ``busy_timeout_s`` for another
process's lock, and a host polling its ask must not stall its event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from ..sqlite_file import SQLiteFile, write_transaction
from .book import AskBook

__all__ = ["SQLiteAskBook"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_asks (
    root_id TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (root_id, name)
) WITHOUT ROWID;
"""


class SQLiteAskBook(AskBook):
    """Asks in a SQLite file (the journal's).

    Args:
        path: the database file (created, with its directory, when first written).
        busy_timeout_s: how long a write waits for another process holding the lock.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._file = SQLiteFile(self.path, schema=_SCHEMA, busy_timeout_s=busy_timeout_s)

    def __repr__(self) -> str:
        return f"SQLiteAskBook({str(self.path)!r})"

    async def get(self, root_id: str, name: str) -> str | None:
        """The stored record."""

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT record FROM fleet_asks WHERE root_id = ? AND name = ?", (root_id, name)
            ).fetchone()
            return None if row is None else str(row[0])

        return await asyncio.to_thread(self._file.run_if_exists, "read an ask", read, None)

    async def swap(self, root_id: str, name: str, expected: str | None, new: str) -> bool:
        """Compare and swap in one transaction."""

        def write(conn: sqlite3.Connection) -> bool:
            with write_transaction(conn):  # a mismatch commits having written nothing
                row = conn.execute(
                    "SELECT record FROM fleet_asks WHERE root_id = ? AND name = ?",
                    (root_id, name),
                ).fetchone()
                if (None if row is None else str(row[0])) != expected:
                    return False
                conn.execute(
                    "INSERT OR REPLACE INTO fleet_asks (root_id, name, record) VALUES (?, ?, ?)",
                    (root_id, name, new),
                )
            return True

        return await asyncio.to_thread(self._file.run, "write an ask", write)

    async def all(self, root_id: str | None = None) -> list[str]:
        """Every record (of ``root_id``)."""

        def read(conn: sqlite3.Connection) -> list[str]:
            if root_id is None:
                rows = conn.execute("SELECT record FROM fleet_asks").fetchall()
            else:
                rows = conn.execute(
                    "SELECT record FROM fleet_asks WHERE root_id = ?", (root_id,)
                ).fetchall()
            return [str(row[0]) for row in rows]

        return await asyncio.to_thread(self._file.run_if_exists, "list asks", read, [])

    async def clear(self, root_id: str) -> None:
        """Remove ``root_id``'s records."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM fleet_asks WHERE root_id = ?", (root_id,))

        await asyncio.to_thread(self._file.run_if_exists, "clear asks", write, None)

    async def close(self) -> None:
        """Close the connection (a later call reopens it)."""
        await asyncio.to_thread(self._file.close)  # waits for a call still in its thread
