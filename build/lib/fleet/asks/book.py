"""The ask book: where a run's questions and their answers are journaled.

A book stores one JSON :class:`~fleet.asks.record.AskRecord` per ``(root_id, name)`` and
changes one only by compare-and-swap (:meth:`AskBook.swap`), so the host that asks and
every process that answers agree on one outcome without a lock: :func:`update` reads,
applies a pure rule, and writes only if nobody wrote in between.

Books: :class:`MemoryAskBook` (this process), ``SQLiteAskBook`` (a table in the embedded
default's journal file) and ``RedisAskBook`` (the fleet's Redis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self

from ..errors import CheckpointError
from .record import AskRecord

__all__ = ["AskBook", "MemoryAskBook", "read", "records", "update"]

_SWAP_ATTEMPTS = 50


class AskBook(ABC):
    """Journals asks and answers; every method is a coroutine."""

    @abstractmethod
    async def get(self, root_id: str, name: str) -> str | None:
        """The stored record of ``(root_id, name)`` as text, or ``None``."""

    @abstractmethod
    async def swap(self, root_id: str, name: str, expected: str | None, new: str) -> bool:
        """Store ``new`` if the stored text is still ``expected`` (``None``: absent).

        Returns:
            Whether ``new`` was stored.
        """

    @abstractmethod
    async def all(self, root_id: str | None = None) -> list[str]:
        """Every stored record of ``root_id`` (of every workflow when ``None``), as text."""

    @abstractmethod
    async def clear(self, root_id: str) -> None:
        """Remove every record of ``root_id`` (the workflow finished)."""

    async def close(self) -> None:  # noqa: B027 - books without resources need no close
        """Release connections (a later call reopens them)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class MemoryAskBook(AskBook):
    """A book in this process's memory: only this process can answer."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"MemoryAskBook(asks={len(self._records)})"

    async def get(self, root_id: str, name: str) -> str | None:
        """The stored record."""
        return self._records.get((root_id, name))

    async def swap(self, root_id: str, name: str, expected: str | None, new: str) -> bool:
        """Compare and swap."""
        if self._records.get((root_id, name)) != expected:
            return False
        self._records[(root_id, name)] = new
        return True

    async def all(self, root_id: str | None = None) -> list[str]:
        """Every record (of ``root_id``)."""
        return [raw for (root, _), raw in self._records.items() if root_id in (None, root)]

    async def clear(self, root_id: str) -> None:
        """Forget ``root_id``'s records."""
        for key in [key for key in self._records if key[0] == root_id]:
            del self._records[key]


def _load(book: AskBook, raw: str | bytes) -> AskRecord:
    try:
        return AskRecord.from_json(raw)
    except ValueError as error:  # pydantic's ValidationError included
        raise CheckpointError(f"an ask record in {book!r} is unreadable: {error}") from None


async def read(book: AskBook, root_id: str, name: str) -> AskRecord | None:
    """The record of ``(root_id, name)``, or ``None``."""
    raw = await book.get(root_id, name)
    return None if raw is None else _load(book, raw)


async def records(book: AskBook, root_id: str | None = None) -> list[AskRecord]:
    """Every record of ``root_id`` (or of every workflow), oldest question first."""
    found = [_load(book, raw) for raw in await book.all(root_id)]
    return sorted(found, key=lambda r: (r.asked_at or r.answered_at or 0.0, r.root_id, r.name))


async def update(
    book: AskBook,
    root_id: str,
    name: str,
    change: Callable[[AskRecord | None], AskRecord],
) -> AskRecord:
    """Apply ``change`` to the stored record atomically and return what is stored after.

    ``change`` is a pure rule (:mod:`fleet.asks.record`); it runs again if another
    process wrote in between, and may raise to refuse.

    Raises:
        CheckpointError: the record kept changing under us (should not happen), or the
            book cannot be read.
    """
    for _ in range(_SWAP_ATTEMPTS):
        raw = await book.get(root_id, name)
        current = None if raw is None else _load(book, raw)
        new = change(current)
        if new == current:
            return new
        if await book.swap(root_id, name, raw, new.to_json()):
            return new
    raise CheckpointError(
        f"ask {name!r} of workflow {root_id!r} kept changing while being written in {book!r}"
    )
