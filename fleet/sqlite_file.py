"""One SQLite file shared by the embedded default's tables: how fleet opens it and writes to it.

The journal, the run registry, the ask book, the budget ledger and the run index each keep
their tables in a local SQLite file. They open it the same way (its directory created, in
autocommit mode so every statement or ``BEGIN IMMEDIATE`` block is its own transaction,
WAL for concurrent readers), write in the same ``BEGIN IMMEDIATE`` … ``COMMIT`` blocks and
add columns to files written by earlier versions the same way; this module is that way.
:class:`SQLiteFile` adds the lazily opened connection behind a lock that the journal, the
run registry and the ask book share, with their one-line ``CheckpointError``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import CheckpointError

__all__ = ["SQLiteFile", "add_column", "connect", "write_transaction"]

T = TypeVar("T")


def connect(
    path: Path,
    *,
    schema: str,
    busy_timeout_s: float,
    synchronous: str | None = None,
    wal: bool = True,
    migrate: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """Open ``path`` (creating its directory) in autocommit mode and create ``schema``.

    Args:
        path: the database file.
        schema: the ``CREATE TABLE IF NOT EXISTS`` statements of the caller's tables.
        busy_timeout_s: how long a statement waits for another process holding the lock.
        synchronous: SQLite's ``synchronous`` pragma (``None``: SQLite's default).
        wal: put the file in WAL mode.
        migrate: run after the schema (e.g. :func:`add_column` for a file an earlier
            version wrote).

    Raises:
        sqlite3.Error: the file cannot be opened or is not a database.
        OSError: the directory cannot be created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,  # autocommit: each statement is its own transaction
        check_same_thread=False,  # callers guard the connection with a lock
    )
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        if synchronous is not None:
            conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.executescript(schema)
        if migrate is not None:
            migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def add_column(conn: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    """Give a ``table`` written by an earlier version its ``column`` (if it lacks it)."""
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if column not in columns:
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as error:
            if "duplicate column" not in str(error):  # another process added it first
                raise


class SQLiteFile:
    """A SQLite file opened on first use, its one connection guarded by a lock.

    Args:
        path: the database file.
        schema: the caller's ``CREATE TABLE IF NOT EXISTS`` statements.
        busy_timeout_s: how long a write waits for another process holding the lock.
        synchronous: SQLite's ``synchronous`` pragma (``None``: SQLite's default).
        migrate: run on each new connection after the schema (e.g. :func:`add_column`).
        place: how error messages name the file (default: its path, quoted).
        errors: the exceptions :meth:`run` turns into ``CheckpointError``.

    Calls are short local transactions run inline; the lock also lets several threads share it.
    """

    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        busy_timeout_s: float,
        synchronous: str | None = None,
        migrate: Callable[[sqlite3.Connection], None] | None = None,
        place: str | None = None,
        errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError),
    ) -> None:
        self.path = path
        self._schema = schema
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self._migrate = migrate
        self._place = place if place is not None else repr(str(path))
        self._errors = errors
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        return connect(
            self.path,
            schema=self._schema,
            busy_timeout_s=self._busy_timeout_s,
            synchronous=self._synchronous,
            migrate=self._migrate,
        )

    def run(
        self,
        action: str,
        body: Callable[[sqlite3.Connection], T],
        *,
        workflow_id: str | None = None,
    ) -> T:
        """Run ``body`` on the connection, under the lock (creating the file if missing).

        Args:
            action: what ``body`` does, as in "cannot {action} in {place}".
            body: the work, given the connection.
            workflow_id: the journal the ``CheckpointError`` names, if any.

        Raises:
            CheckpointError: the file cannot be opened, read or written.
        """
        return self._run(action, body, workflow_id=workflow_id)

    def run_if_exists(self, action: str, body: Callable[[sqlite3.Connection], T], missing: T) -> T:
        """As :meth:`run`, but a missing file answers ``missing`` (and stays missing)."""
        return self._run(action, body, missing=(missing,))

    def _run(
        self,
        action: str,
        body: Callable[[sqlite3.Connection], T],
        *,
        missing: tuple[T] | None = None,
        workflow_id: str | None = None,
    ) -> T:
        with self._lock:
            try:
                if self._conn is None:
                    if missing is not None and not self.path.exists():
                        return missing[0]
                    self._conn = self._connect()
                return body(self._conn)
            except self._errors as error:
                raise CheckpointError(
                    f"cannot {action} in {self._place}: {type(error).__name__}: {error}",
                    workflow_id=workflow_id,
                ) from error

    def close(self) -> None:
        """Close the connection (a later :meth:`run` reopens it)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
