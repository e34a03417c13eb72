"""Output deltas: a running step's text, on a channel of its own (never the journal).

An agent calls :meth:`fleet.AgentContext.emit_delta` with each piece of text it produces
(the OpenAI-compatible agent does with ``stream = true``). A step's pieces are coalesced:
the first goes out at once, later ones every :data:`DELTA_INTERVAL_S`, so a step streaming
hundreds of tokens a second costs a few deltas a second (and on a fleet, one stream entry
carries a flush's deltas of every step of the worker).

Where they go is the workflow's :class:`DeltaChannel`, made by its executor
(:meth:`fleet.AgentExecutor.delta_channel`):

- :class:`MemoryDeltaChannel` (the local host): delivered in process, only while someone
  subscribed with ``Workflow.subscribe(deltas=True)``;
- :class:`RedisDeltaChannel` (a fleet): workers append to the capped, expiring Redis stream
  :func:`~fleet.eventbus.delta_stream_key` (see :mod:`fleet.deltawriter`), which the
  workflow, ``fleet watch ROOT --output`` and the dashboard read; an entry id is a cursor
  to resume from; reading it and folding deltas into text is :mod:`fleet.deltastream`
  (its names are re-exported here).

The workflow verbs make their channel current (:func:`use_deltas`), as they do the
cancellation, so an executor finds it with :func:`current_deltas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

from .deltastream import START_MARGIN_S as START_MARGIN_S
from .deltastream import LiveText as LiveText
from .deltastream import decode_entries as decode_entries
from .deltastream import encode_entry as encode_entry
from .deltastream import read_deltas as read_deltas
from .deltastream import start_cursor as start_cursor
from .events import StepDelta

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "DELTA_BATCH",
    "DELTA_INTERVAL_S",
    "DELTA_MAXLEN",
    "DELTA_TTL_S",
    "DeltaChannel",
    "DeltaPublisher",
    "LiveText",
    "MemoryDeltaChannel",
    "Pending",
    "RedisDeltaChannel",
    "START_MARGIN_S",
    "current_deltas",
    "decode_entries",
    "encode_entry",
    "read_deltas",
    "start_cursor",
    "use_deltas",
]

logger = logging.getLogger(__name__)

DELTA_INTERVAL_S = 0.05
"""A step's waiting text is written this often (its first piece at once, its last as it ends)."""
DELTA_BATCH = 64
"""Deltas one stream entry carries at most (a worker's steps' text of one flush)."""
DELTA_MAXLEN = 20_000
"""Entries a workflow's delta stream keeps (about: trimmed with ``MAXLEN ~``); each holds
up to :data:`DELTA_BATCH` deltas."""
DELTA_TTL_S = 24 * 3600
"""A delta stream expires this long after its last write."""


class DeltaPublisher(Protocol):
    """Where one step's agent sends its text (:attr:`fleet.AgentContext.deltas`)."""

    def emit(self, text: str, *, replace: bool = False) -> None:
        """Queue ``text``; ``replace`` starts the step's text over. Never blocks."""

    def close(self) -> None:
        """The step ended: send what is still waiting."""


_CURRENT: contextvars.ContextVar[DeltaChannel | None] = contextvars.ContextVar(
    "fleet_deltas", default=None
)


def current_deltas() -> DeltaChannel | None:
    """The delta channel of the workflow this code runs for, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_deltas(channel: DeltaChannel | None) -> Iterator[None]:
    """Make ``channel`` current inside the block (tasks created there inherit it)."""
    token = _CURRENT.set(channel)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def new_attempt() -> str:
    """A fresh id for one run of a step."""
    return uuid.uuid4().hex[:10]


class Pending:
    """One step's text not sent yet (not thread-safe).

    The pieces since the last :meth:`take` wait in a list, joined once when taken; a
    ``replace`` drops what was waiting (the text it extended is gone).
    """

    __slots__ = ("attempt", "closed", "last_sent", "length", "parts", "start", "task_id")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.attempt = new_attempt()
        self.length = 0
        """Characters of the current text emitted so far."""
        self.parts: list[str] = []
        self.start = 0
        """Where the waiting pieces begin in the step's current text."""
        self.last_sent = -math.inf
        self.closed = False

    def add(self, text: str, *, replace: bool) -> bool:
        """Queue ``text``; returns whether nothing was waiting before it."""
        idle = not self.parts
        if replace:
            self.parts, self.start, self.length = [text], 0, 0
        else:
            if idle:
                self.start = self.length
            self.parts.append(text)
        self.length += len(text)
        return idle

    def take(self) -> tuple[int, str] | None:
        """The waiting text as one ``(offset, text)`` segment (now sent); ``None``: none."""
        if not self.parts:
            return None
        parts, self.parts = self.parts, []
        return self.start, "".join(parts)

    def delta(self, offset: int, text: str) -> StepDelta:
        """One segment as an event."""
        return StepDelta(task_id=self.task_id, text=text, attempt=self.attempt, offset=offset)


class DeltaChannel(ABC):
    """Where the deltas of one workflow run travel."""

    route: str | None = None
    """What a worker on another process writes to (a Redis stream key); ``None``: none."""

    @abstractmethod
    def publisher(self, task_id: str) -> DeltaPublisher | None:
        """A publisher for a step run in this process (``None``: nobody would read it)."""

    @abstractmethod
    async def start(self, deliver: Callable[[StepDelta], None]) -> None:
        """Hand every delta sent from now on to ``deliver`` (returns once that holds)."""

    @abstractmethod
    async def stop(self) -> None:
        """Deliver what is still on its way, then stop delivering."""


class _LoopPublisher:
    """Coalesces one in-process step's text on the event loop it runs on.

    A blocking agent emits from a thread of its own: its pieces are handed to the loop
    (``call_soon_threadsafe``), in order, and coalesced there. Once the step ended
    (:meth:`close`), pieces are dropped, so a thread that outlives a cancelled step sends
    nothing after its ``step_finished``.
    """

    def __init__(self, channel: MemoryDeltaChannel, task_id: str) -> None:
        self._channel = channel
        self._pending = Pending(task_id)
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def emit(self, text: str, *, replace: bool = False) -> None:
        if self._pending.closed:
            return
        if threading.get_ident() == self._thread:
            self._add(text, replace)
            return
        try:
            self._loop.call_soon_threadsafe(self._add, text, replace)
        except RuntimeError:  # the loop is closed: the step and its workflow are over
            pass

    def _add(self, text: str, replace: bool) -> None:
        if self._pending.closed:
            return
        if not self._pending.add(text, replace=replace) or self._timer is not None:
            return
        wait = self._pending.last_sent + self._channel.interval_s - time.monotonic()
        if wait <= 0:
            self.flush()
        else:
            self._timer = self._loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Deliver what is waiting now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.last_sent = time.monotonic()
        segment = self._pending.take()
        if segment is not None:
            self._channel.deliver(self._pending.delta(*segment))

    def close(self) -> None:
        self.flush()
        self._pending.closed = True
        self._channel.forget(self)


class MemoryDeltaChannel(DeltaChannel):
    """The local host's channel: deltas reach this process's subscribers, nothing else.

    Args:
        interval_s: a step's deltas are delivered at most this often (its first at once).
    """

    def __init__(self, *, interval_s: float = DELTA_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._deliver: Callable[[StepDelta], None] | None = None
        self._publishers: list[_LoopPublisher] = []
        self._count = 0

    def publisher(self, task_id: str) -> DeltaPublisher | None:
        """A coalescing publisher on the step's loop (``None`` while nobody subscribed)."""
        if self._deliver is None:
            return None
        publisher = _LoopPublisher(self, task_id)
        self._publishers.append(publisher)
        return publisher

    def forget(self, publisher: _LoopPublisher) -> None:
        """A step ended (its publisher delivered what it held)."""
        with contextlib.suppress(ValueError):
            self._publishers.remove(publisher)

    def deliver(self, delta: StepDelta) -> None:
        """Hand one delta to the reader."""
        self._count += 1
        if self._deliver is not None:
            self._deliver(delta.model_copy(update={"id": str(self._count)}))

    async def start(self, deliver: Callable[[StepDelta], None]) -> None:
        """Deliver from now on to ``deliver``."""
        self._deliver = deliver

    async def stop(self) -> None:
        """Deliver what the running steps hold, then nothing more."""
        for publisher in list(self._publishers):
            publisher.flush()
        self._publishers.clear()
        self._deliver = None


class RedisDeltaChannel(DeltaChannel):
    """A fleet's channel: workers append to a Redis stream; this reads it for the workflow.

    Args:
        redis_url: the fleet's Redis.
        key: the stream (:func:`~fleet.eventbus.delta_stream_key` of the root id).
        block_s: how long one read waits for new entries (bounds how long :meth:`stop` takes).
        gap_s: after a read that found entries, the next waits this long (while steps
            stream, entries come every few ms: one read for many is one command); a read
            after a quiet spell (a step's first text) is not delayed.
    """

    def __init__(
        self,
        redis_url: str,
        key: str,
        *,
        block_s: float = 0.2,
        gap_s: float = DELTA_INTERVAL_S / 2,
    ) -> None:
        self.route = key
        self.key = key
        self._url = redis_url
        self._block_ms = max(int(block_s * 1000), 1)
        self._gap_s = gap_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def publisher(self, task_id: str) -> DeltaPublisher | None:
        """``None``: steps run on workers, which write to the stream themselves."""
        return None

    async def start(self, deliver: Callable[[StepDelta], None]) -> None:
        """Start reading the stream after its newest entry (marking restarts on the way)."""
        if self._task is not None:
            return
        from .redis.clients import async_client

        client = async_client(self._url, socket_timeout=5.0, socket_connect_timeout=5.0)
        newest = cast(list[Any], await client.xrevrange(self.key, count=1))
        cursor = bytes(newest[0][0]).decode() if newest else "0-0"
        self._task = asyncio.create_task(
            self._read(client, cursor, deliver), name=f"fleet-deltas:{self.key}"
        )

    async def _read(self, client: Redis, cursor: str, deliver: Callable[[StepDelta], None]) -> None:
        live = LiveText()
        try:
            while True:
                stopping = self._stopping
                block = None if stopping else self._block_ms
                try:
                    reply = cast(
                        list[Any],
                        await client.xread({self.key: cursor}, block=block, count=1000),
                    )
                except Exception as error:  # an outage loses live text, never the workflow
                    logger.warning("cannot read output deltas from %s: %s", self.key, error)
                    if stopping:
                        return
                    await asyncio.sleep(1.0)
                    continue
                entries = [item for _stream, items in reply or [] for item in items]
                for raw_id, raw in entries:
                    cursor = bytes(raw_id).decode()
                    fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                    for delta in decode_entries(cursor, fields):
                        if live.fold(delta):
                            delta = delta.model_copy(update={"restart": True})
                        deliver(delta)
                if stopping and not entries:
                    return
                if entries and not stopping and self._gap_s > 0:
                    await asyncio.sleep(self._gap_s)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Read until the stream has nothing more (what workers wrote is delivered), stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        try:
            await asyncio.wait_for(task, 5.0)
        except TimeoutError:
            logger.warning("gave up reading the last output deltas from %s", self.key)
