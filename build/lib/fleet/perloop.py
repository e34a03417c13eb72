"""State that belongs to one event loop, for objects users keep across ``asyncio.run()`` calls.

asyncio objects (connections, semaphores, locks, futures) belong to the loop that made
them. A store, ledger or executor that a program keeps for good (a script that calls
``asyncio.run`` twice, a notebook, a CLI, a test) must therefore never hold one for good:
it asks :class:`PerLoop` for the running loop's copy, made on first use in that loop.

A value with a ``close`` hook (a Redis client) is closed when its loop shuts down, even
if the owner never calls :meth:`PerLoop.aclose`: the hook rides on an async generator
that the loop registers, and ``asyncio.run`` (like ``asyncio.Runner`` and pytest-asyncio)
closes every open async generator before it closes the loop
(:meth:`asyncio.loop.shutdown_asyncgens`). So a client is never left with sockets of a
dead loop, which would fail the next run ("Event loop is closed") or leak connections.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    closer: AsyncGenerator[None, None] | None


async def _close_at_loop_end(close: Callable[[], Awaitable[object]]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await close()


class PerLoop(Generic[T]):
    """One value per event loop, made lazily by ``factory`` on first use in that loop.

    Args:
        factory: makes the value; called with the loop running, must not await.
        close: closes a value (e.g. ``Redis.aclose``); it runs in the value's own loop,
            from :meth:`aclose` or when that loop shuts down, whichever comes first.

    Thread-safe: each thread's loop gets its own value.
    """

    def __init__(
        self,
        factory: Callable[[], T],
        *,
        close: Callable[[T], Awaitable[object]] | None = None,
    ) -> None:
        self._factory = factory
        self._close = close
        self._entries: dict[asyncio.AbstractEventLoop, _Entry[T]] = {}
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's value, made now if this loop has none yet.

        Raises:
            RuntimeError: no event loop is running in this thread.
        """
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is None:
            with self._lock:
                # Drop values of loops that are gone (their closers already ran, or the
                # loop was closed without shutting its generators down: nothing to run).
                self._entries = {lp: e for lp, e in self._entries.items() if not lp.is_closed()}
                entry = _Entry(self._factory(), None)
                if self._close is not None:
                    entry.closer = self._arm_closer(entry.value)
                self._entries[loop] = entry
        return entry.value

    def current(self) -> T | None:
        """The running loop's value if it has one, without making it."""
        entry = self._entries.get(asyncio.get_running_loop())
        return None if entry is None else entry.value

    async def aclose(self) -> None:
        """Forget the running loop's value, closing it if there is a ``close`` hook."""
        with self._lock:
            entry = self._entries.pop(asyncio.get_running_loop(), None)
        if entry is not None and entry.closer is not None:
            await entry.closer.aclose()

    def _arm_closer(self, value: T) -> AsyncGenerator[None, None]:
        close = self._close
        assert close is not None
        closer = _close_at_loop_end(lambda: close(value))
        # Step the generator to its ``yield`` without awaiting (its body awaits nothing
        # before it): that first step registers it with the running loop, whose shutdown
        # then closes it, running ``close(value)`` in the loop the value belongs to.
        try:
            closer.asend(None).send(None)
        except StopIteration:
            pass
        return closer
