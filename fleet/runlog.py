"""A workflow run's trace for other terminals: its events, its end, its budget.

A running workflow appends *log entries* to one place another process can read: a
capped Redis stream (:class:`~fleet.eventbus.EventStream`, ``{key_prefix}:events:{root}``)
when the run uses Redis, or a table in the run's SQLite journal file
(:class:`SQLiteEventLog`) on the embedded default. An entry is a flat ``str → str``
mapping, the same in both places:

- ``{"control": "start", "run": RUN_ID, "at": EPOCH_S}`` opens a run of that root id;
- ``{"event": JSON}`` is one :data:`~fleet.events.WorkflowEvent`;
- ``{"control": "budget", "snapshot": JSON}`` is the budget after a phase and at the end;
  with ``"live": "1"`` it is a reading taken while a phase runs (for the dashboard's
  gauge; :func:`~fleet.runsummary.summarize` counts from the last settled one, since a
  live reading may already hold a step whose ``step_finished`` is logged after it);
- ``{"control": "end", "run": RUN_ID, "status": S, "at": EPOCH_S}`` closes it, where ``S``
  is ``finished``, ``closed`` (journals kept for a resume), ``failed`` or ``cancelled``.

:func:`open_log_reader` reads either place; :func:`follow` yields a run's entries as they
arrive (``fleet watch``); :mod:`fleet.runsummary` folds them into a summary (``fleet status``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from .config import mask_url
from .errors import ConfigError
from .eventbus import BufferedLog, event_stream_key
from .redis.keys import Keys, untagged
from .urls import REDIS_SCHEMES

__all__ = [
    "LogEntry",
    "LogReader",
    "SQLiteEventLog",
    "follow",
    "open_log_reader",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    root_id TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_events_by_root ON fleet_events (root_id, id);
"""


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    return conn


class SQLiteEventLog(BufferedLog):
    """Appends a run's log entries to the ``fleet_events`` table of a SQLite file.

    The embedded default's counterpart of :class:`~fleet.eventbus.EventStream`: one
    background writer commits what is queued in one transaction per batch (off the event
    loop), so ``fleet watch`` in another terminal follows a local run live. Keeps the
    newest ``maxlen`` entries of each root id, like the Redis stream's cap.
    """

    def __init__(self, path: str | Path, root_id: str, *, maxlen: int, run_id: str) -> None:
        self.path = Path(path)
        self.root_id = root_id
        self.maxlen = maxlen
        self._conn: sqlite3.Connection | None = None
        super().__init__(f"SQLite file '{self.path}' (root id {root_id!r})", run_id=run_id)

    async def _open(self) -> None:
        import asyncio

        self._conn = await asyncio.to_thread(_connect, self.path, create=True)

    async def _append(self, batch: list[dict[str, str]]) -> None:
        import asyncio

        await asyncio.to_thread(self._insert, batch)

    def _insert(self, batch: list[dict[str, str]]) -> None:
        conn = self._conn
        assert conn is not None
        rows = [(self.root_id, json.dumps(entry, separators=(",", ":"))) for entry in batch]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO fleet_events (root_id, entry) VALUES (?, ?)", rows)
            conn.execute(
                "DELETE FROM fleet_events WHERE root_id = ? AND id <= "
                "(SELECT id FROM fleet_events WHERE root_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.root_id, self.root_id, self.maxlen),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def _shut(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One entry of a run's log, with the cursor that comes after it."""

    cursor: str
    """Opaque position: pass it back to :meth:`LogReader.after` to read what follows."""
    fields: Mapping[str, str]
    """The entry (``control`` or ``event`` and their companions)."""


class LogReader(Protocol):
    """Reads the log entries of root ids from one place."""

    where: str
    """The place, for humans (passwords masked)."""

    def last_start(self, root_id: str) -> str | None:
        """Cursor just before the newest ``start`` entry of ``root_id``, or ``None``."""

    def after(self, root_id: str, cursor: str, *, wait_s: float) -> list[LogEntry]:
        """Entries after ``cursor`` (``"0"``: from the oldest), waiting up to ``wait_s``."""

    def root_ids(self, *, limit: int) -> list[str]:
        """Up to ``limit`` root ids that have a log here (``fleet dashboard`` lists them)."""

    def close(self) -> None:
        """Release the connection."""


class _SQLiteReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"sqlite:{path}"
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None:
            with contextlib.suppress(FileNotFoundError):
                self._conn = _connect(self.path, create=False)
        return self._conn

    def last_start(self, root_id: str) -> str | None:
        conn = self._db()
        if conn is None:
            return None
        row = conn.execute(
            "SELECT id FROM fleet_events WHERE root_id = ? AND entry LIKE ? "
            "ORDER BY id DESC LIMIT 1",
            (root_id, '{"control":"start"%'),
        ).fetchone()
        return None if row is None else str(row[0] - 1)

    def after(self, root_id: str, cursor: str, *, wait_s: float) -> list[LogEntry]:
        deadline = time.monotonic() + wait_s
        while True:
            conn = self._db()
            rows: list[Any] = []
            if conn is not None:
                rows = conn.execute(
                    "SELECT id, entry FROM fleet_events WHERE root_id = ? AND id > ? "
                    "ORDER BY id LIMIT 500",
                    (root_id, int(cursor)),
                ).fetchall()
            if rows or time.monotonic() >= deadline:
                return [LogEntry(str(row[0]), _loads(row[1])) for row in rows]
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))

    def root_ids(self, *, limit: int) -> list[str]:
        conn = self._db()
        if conn is None:
            return []
        rows = conn.execute(
            "SELECT root_id FROM fleet_events GROUP BY root_id ORDER BY MAX(id) DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _loads(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class _RedisReader:
    def __init__(self, url: str, key_prefix: str) -> None:
        from .redis.clients import sync_client

        self.where = mask_url(url)
        self._prefix = key_prefix
        try:
            self._client = sync_client(
                url, retry=False, socket_timeout=5.0, socket_connect_timeout=5.0
            )
        except ValueError as error:  # an unknown scheme, a port out of range
            raise ConfigError(f"invalid Redis URL {self.where}: {error}", key="redis_url") from None

    def _key(self, root_id: str) -> str:
        return event_stream_key(root_id, key_prefix=self._prefix)

    def last_start(self, root_id: str) -> str | None:
        newest = "+"
        while True:
            key = self._key(root_id)
            page = cast(list[Any], self._client.xrevrange(key, max=newest, count=500))
            for entry_id, entry in page:
                if entry.get(b"control") == b"start":
                    return "(" + bytes(entry_id).decode()
            if len(page) < 500:
                return None
            newest = "(" + page[-1][0].decode()

    def after(self, root_id: str, cursor: str, *, wait_s: float) -> list[LogEntry]:
        key = self._key(root_id)
        if cursor.startswith("("):  # just before an entry: read it with XRANGE first
            page = cast(list[Any], self._client.xrange(key, min=cursor[1:], count=500))
        else:
            block = max(int(wait_s * 1000), 1)
            reply = cast(list[Any], self._client.xread({key: cursor}, block=block, count=500))
            page = [item for _stream, items in reply or [] for item in items]
        return [LogEntry(bytes(entry_id).decode(), _decode(raw)) for entry_id, raw in page]

    def root_ids(self, *, limit: int) -> list[str]:
        head = Keys(self._prefix).head("events")
        pattern = head.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?") + "*"
        found: list[str] = []
        for key in self._client.scan_iter(match=pattern, count=500, _type="stream"):
            found.append(untagged(bytes(key).decode(errors="replace")[len(head) :]))
            if len(found) >= limit:
                break
        return found

    def close(self) -> None:
        self._client.close()


def _decode(entry: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in entry.items()}


def open_log_reader(url: str, *, key_prefix: str = "fleet") -> LogReader:
    """A reader of run logs at ``url``: ``sqlite:PATH`` or ``redis://``/``rediss://``/``unix://``.

    Raises:
        ConfigError: the URL names no place a run log can live.
    """
    if url.startswith("sqlite:"):
        return _SQLiteReader(Path(url.removeprefix("sqlite:")))
    if url.startswith(REDIS_SCHEMES):
        return _RedisReader(url, key_prefix)
    raise ConfigError(
        f"run logs live in a sqlite:PATH file or a redis:// URL, not {mask_url(url)!r}",
        key="store",
    )


def follow(
    reader: LogReader,
    root_id: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    abandoned: Callable[[], str | None] | None = None,
    check_every_s: float = 2.0,
) -> Iterator[LogEntry]:
    """Yield the newest run's entries of ``root_id`` as they arrive, until its ``end``.

    Starts at the newest ``start`` entry (or waits for one); ends after the ``end`` entry,
    or when ``timeout_s`` passes (then the iterator simply stops).

    Args:
        reader: where the log is.
        root_id: the workflow.
        timeout_s: stop after this long.
        poll_s: how long one read waits for new entries.
        abandoned: asked every ``check_every_s`` while the log is quiet: why the run's
            host is gone (its run record's heartbeat lapsed), or ``None`` while it lives.
            When it answers, one last entry ``{"control": "abandoned", "why": ...}`` ends
            the iteration: a dead host never writes its ``end``.
        check_every_s: how often to ask ``abandoned``.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    cursor = reader.last_start(root_id) or "0"
    check_at = time.monotonic()
    while deadline is None or time.monotonic() < deadline:
        wait = poll_s if deadline is None else max(min(poll_s, deadline - time.monotonic()), 0.0)
        page = reader.after(root_id, cursor, wait_s=wait)
        for entry in page:
            cursor = entry.cursor
            yield entry
            if entry.fields.get("control") == "end":
                return
        if abandoned is not None and not page and time.monotonic() >= check_at:
            check_at = time.monotonic() + check_every_s
            why = abandoned()
            if why is not None:
                yield LogEntry(cursor, {"control": "abandoned", "why": why})
                return
