"""Durable waits: a workflow asks a person (or a system) and survives the wait (DESIGN §4c).

``answer = await workflow.ask(name, question=..., schema=..., timeout_s=..., default=...)``
journals the question in the run's store, publishes ``asked``, and waits, holding no step
reservation, until the first valid answer is journaled (``fleet answer``, the dashboard, or
:func:`give_answer`), the absolute deadline passes, or the workflow is cancelled. A re-run
of the program reaches the same ask and returns the journaled answer at once.

Where asks live (:func:`ask_book_for`, :func:`open_ask_book`): the ``fleet_asks`` table of
the SQLite journal file on the embedded default, the hash ``{p}:asks:{ROOT}`` in Redis on a
fleet, this process's memory for a memory store.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import AnswerRefused, ConfigError
from ..stores import CheckpointStore, MemoryCheckpointStore, SQLiteCheckpointStore, sqlite_path
from .book import AskBook as AskBook
from .book import MemoryAskBook as MemoryAskBook
from .book import read as read
from .book import records as records
from .book import update as update
from .record import AskRecord as AskRecord
from .record import AskState as AskState
from .record import answered, check_name
from .wait import NO_DEFAULT as NO_DEFAULT
from .wait import POLL_S as POLL_S
from .wait import wait_for_answer as wait_for_answer

__all__ = [
    "NO_DEFAULT",
    "POLL_S",
    "AskBook",
    "AskRecord",
    "AskState",
    "MemoryAskBook",
    "ask_book_for",
    "give_answer",
    "open_ask_book",
    "open_asks",
    "read",
    "records",
    "update",
    "wait_for_answer",
]

_MEMORY_BOOKS: weakref.WeakKeyDictionary[CheckpointStore, MemoryAskBook] = (
    weakref.WeakKeyDictionary()
)


def ask_book_for(store: CheckpointStore) -> AskBook:
    """The book a workflow journaled in ``store`` keeps its asks in.

    A SQLite store's file, a Redis store's server (same key prefix); any other store
    (memory, or one of your own) gets a book in this process's memory, the same one
    every time for the same store object.
    """
    if isinstance(store, SQLiteCheckpointStore):
        from .sqlite import SQLiteAskBook

        return SQLiteAskBook(store.path, busy_timeout_s=store.busy_timeout_s)
    if not isinstance(store, MemoryCheckpointStore):
        from ..stores.redis import RedisCheckpointStore

        if isinstance(store, RedisCheckpointStore):
            from .redis import RedisAskBook

            return RedisAskBook(store.url, key_prefix=store.key_prefix)
    book = _MEMORY_BOOKS.get(store)
    if book is None:
        book = _MEMORY_BOOKS[store] = MemoryAskBook()
    return book


def open_ask_book(target: str, *, key_prefix: str = "fleet") -> AskBook:
    """The book of the journal a ``store`` setting names (``sqlite:PATH`` or a Redis URL).

    Raises:
        ConfigError: ``target`` is ``memory`` (only its own process can see it) or unknown.
    """
    text = target.strip()
    path = sqlite_path(text)
    if path:
        from .sqlite import SQLiteAskBook

        return SQLiteAskBook(path)
    if text.startswith(("redis://", "rediss://", "sentinel://", "unix://")):
        from .redis import RedisAskBook

        return RedisAskBook(text, key_prefix=key_prefix)
    if text == "memory":
        raise ConfigError(
            "a run with a memory journal keeps its asks in its own process; answer it there "
            "(fleet.asks.give_answer) or run it with a sqlite: or redis:// --store",
            key="store",
        )
    raise ConfigError(
        f"unknown journal store {text!r}; use 'sqlite:PATH' or a redis:// URL", key="store"
    )


async def give_answer(
    book: AskBook,
    root_id: str,
    name: str,
    answer: Any,
    *,
    by: str,
    exists: Callable[[], Awaitable[bool]] | None = None,
) -> AskRecord:
    """Answer ask ``name`` of workflow ``root_id``; the first valid answer wins.

    Before the program reached the ask, the answer is kept (an *early* answer) and
    checked against the schema when it does.

    Args:
        book: where the workflow's asks are (:func:`ask_book_for`, :func:`open_ask_book`).
        root_id: the workflow.
        name: the ask.
        answer: any JSON value that fits the ask's schema.
        by: who answers (journaled, shown in the ``answered`` event).
        exists: when the ask is not journaled yet, says whether the workflow exists;
            ``None`` takes any root id.

    Returns:
        The journaled record.

    Raises:
        AnswerRefused: unknown workflow, already answered, past the deadline, or the
            answer does not fit the schema (``field`` names where).
        AskError: ``name`` cannot name an ask.
    """
    check_name(name)
    if await read(book, root_id, name) is None and exists is not None and not await exists():
        raise AnswerRefused(f"no workflow {root_id!r} found", kind="unknown")
    return await update(
        book,
        root_id,
        name,
        lambda current: answered(
            current, root_id=root_id, name=name, answer=answer, by=by, now=time.time()
        ),
    )


async def open_asks(book: AskBook, root_id: str | None = None) -> list[AskRecord]:
    """The questions waiting for an answer (of ``root_id``, or of every workflow)."""
    return [record for record in await records(book, root_id) if record.is_open]
