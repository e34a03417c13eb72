"""In-process event delivery that never blocks, and the Redis stream other processes follow.

:class:`EventBus` fans each event out to every :class:`Subscription`; a subscription holds
at most ``capacity`` waiting events and, when a slow reader lets it fill up, drops the
oldest ones and yields a :class:`Lagged` marker saying how many. :class:`EventStream`
appends events to a capped Redis stream (``{key_prefix}:events:{root_id}``), framed by
``start`` / ``end`` control entries, from one background writer the workflow joins when it
closes. A workflow's output deltas (:mod:`fleet.deltas`) reach only subscriptions
made with ``deltas=True``, through :meth:`EventBus.publish_delta`, and never the stream;
on a fleet they have a stream of their own, :func:`delta_stream_key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from .keeper import stop_task
from .redis.keys import Keys
from .spec import FleetModel

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "DEFAULT_DELTA_SUBSCRIBER_CAPACITY",
    "DEFAULT_SUBSCRIBER_CAPACITY",
    "BufferedLog",
    "EventBus",
    "EventStream",
    "Lagged",
    "Subscription",
    "delta_stream_key",
    "event_stream_key",
]

logger = logging.getLogger(__name__)

DEFAULT_SUBSCRIBER_CAPACITY = 256
"""Events a subscriber may have waiting before its oldest ones are dropped."""
DEFAULT_DELTA_SUBSCRIBER_CAPACITY = 16_384
"""The same for a subscriber that also takes output deltas (``deltas=True``): steps that
stream send a few deltas a second each, so hundreds of them fill 256 in well under a second."""


def event_stream_key(root_id: str, *, key_prefix: str = "fleet") -> str:
    """The Redis stream a workflow's events are appended to (hash-tagged by its root id)."""
    return Keys(key_prefix).events(root_id)


def delta_stream_key(root_id: str, *, key_prefix: str = "fleet") -> str:
    """The Redis stream a workflow's output deltas go to on a fleet (capped, expiring)."""
    return Keys(key_prefix).deltas(root_id)


class Lagged(FleetModel):
    """Told to a subscriber that fell behind, in place of the events it lost."""

    type: Literal["lagged"] = "lagged"
    missed: int
    """How many of the oldest waiting events were dropped just before the next one."""
    steps: tuple[str, ...] = ()
    """The steps some of whose ``step_delta`` events were among them (their live text
    misses a piece: :class:`fleet.deltas.LiveText` marks it incomplete)."""


class Subscription:
    """An async iterator over workflow events sent after :meth:`Workflow.subscribe`.

    Yields :data:`~fleet.events.WorkflowEvent` values, and a :class:`Lagged` marker where
    events were dropped because more than ``capacity`` were waiting. Iteration ends
    once the workflow is finished or closed and the waiting events are drained, or
    when :meth:`close` is called. Read a subscription from one task; subscribe again
    for another reader.
    """

    def __init__(self, bus: EventBus, capacity: int, *, deltas: bool = False) -> None:
        self._bus = bus
        self.capacity = max(int(capacity), 1)
        self.deltas = deltas
        """Whether this subscription also receives ``step_delta`` events."""
        self._queue: deque[Any] = deque()
        self._pending_missed = 0
        self._pending_steps: dict[str, None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self.lost = 0
        """Events this subscriber lost so far, in total."""

    def _offer(self, event: Any) -> None:
        if self._ended:
            return
        if len(self._queue) >= self.capacity:
            dropped = self._queue.popleft()
            if getattr(dropped, "type", None) == "step_delta":
                self._pending_steps[dropped.task_id] = None
            self._pending_missed += 1
            self.lost += 1
        self._queue.append(event)
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop receiving; iteration ends after nothing else (waiting events are dropped)."""
        self._bus.unsubscribe(self)
        self._queue.clear()
        self._pending_missed = 0
        self._pending_steps = {}
        self._end()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._pending_missed:
                missed, self._pending_missed = self._pending_missed, 0
                steps, self._pending_steps = tuple(self._pending_steps), {}
                return Lagged(missed=missed, steps=steps)
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class EventBus:
    """Fans events out to subscriptions; never blocks, never raises."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self.closed = False

    def subscribe(self, capacity: int, *, deltas: bool = False) -> Subscription:
        """A new subscription (already ended if the bus is closed)."""
        subscription = Subscription(self, capacity, deltas=deltas)
        if self.closed:
            subscription._end()
        else:
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription``."""
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)

    def publish(self, event: Any) -> None:
        """Offer ``event`` to every subscription; never blocks."""
        for subscription in list(self._subscriptions):
            subscription._offer(event)

    def publish_delta(self, event: Any) -> None:
        """Offer a ``step_delta`` to the subscriptions that asked for deltas; never blocks."""
        for subscription in list(self._subscriptions):
            if subscription.deltas:
                subscription._offer(event)

    @property
    def wants_deltas(self) -> bool:
        """Whether any open subscription asked for deltas."""
        return any(subscription.deltas for subscription in self._subscriptions)

    def close(self) -> None:
        """End every subscription once its waiting events are read."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription._end()
        self._subscriptions.clear()


class BufferedLog:
    """Appends log entries from one background writer task; subclasses say where.

    :meth:`push` never blocks and never raises; the writer, started on the first running
    event loop, flushes what is queued in batches through :meth:`_append` and is joined
    by :meth:`close`. An outage drops entries (with one warning), never fails or stalls the
    workflow. Subclasses implement ``_open``, ``_append`` and ``_shut``.
    """

    _BUFFER = 10_000
    _BATCH = 256
    _LINGER_S = 0.0
    """How long the writer waits after a wakeup for more entries, to append them together
    (cut short by :meth:`flush` and :meth:`close`)."""

    def __init__(self, where: str, *, run_id: str) -> None:
        self.where = where
        self.run_id = run_id
        self._buffer: deque[dict[str, str]] = deque(maxlen=self._BUFFER)
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._urgent: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._warned = False
        self.push({"control": "start", "run": run_id, "at": f"{time.time():.3f}"})

    async def _open(self) -> None:
        """Connect (called once, in the writer task)."""

    async def _append(self, batch: list[dict[str, str]]) -> None:
        raise NotImplementedError

    async def _shut(self) -> None:
        """Disconnect (called once, when the writer ends)."""

    def push(self, entry: dict[str, str]) -> None:
        """Queue one entry (an ``event`` or ``control`` field); never blocks."""
        if self._closing:
            return
        self._buffer.append(entry)
        if self._idle is not None:
            self._idle.clear()
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the entry waits in the buffer for the first one
        if self._task is not None and self._task.get_loop() is loop:
            assert self._wakeup is not None
            self._wakeup.set()
            return
        # First entry, or a new event loop (the workflow outlived an asyncio.run(), whose
        # end cancelled the old writer): what is still buffered goes out from this loop.
        self._wakeup = asyncio.Event()
        self._wakeup.set()
        self._idle = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task = asyncio.create_task(self._write(), name=f"fleet-events:{self.where}")

    async def _write(self) -> None:
        assert self._wakeup is not None
        try:
            await self._open()
            while True:
                await self._wakeup.wait()
                await self._linger()
                self._wakeup.clear()
                while self._buffer:
                    await self._flush()
                assert self._idle is not None
                self._idle.set()
                assert self._urgent is not None
                self._urgent.clear()
                if self._closing:
                    return
        finally:
            await self._shut()

    async def _linger(self) -> None:
        """Let the entries pushed in the next :attr:`_LINGER_S` join this batch."""
        urgent = self._urgent
        if not self._LINGER_S or urgent is None or self._closing or urgent.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(urgent.wait(), self._LINGER_S)

    async def _flush(self) -> None:
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self._BATCH))]
        try:
            await self._append(batch)
        except Exception as error:  # a dead log must not fail the workflow
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot append workflow events to %s (%s: %s); "
                    "events are dropped until it answers",
                    self.where,
                    type(error).__name__,
                    error,
                )

    async def flush(self, *, timeout_s: float = 5.0) -> None:
        """Wait until everything pushed so far is written (or ``timeout_s`` passes)."""
        if self._task is None or self._task.done() or self._idle is None:
            return
        if self._urgent is not None:
            self._urgent.set()  # no lingering while a caller waits
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self, status: str, *, timeout_s: float = 10.0) -> None:
        """Append the ``end`` marker, flush what is queued (up to ``timeout_s``), stop."""
        self.push(
            {"control": "end", "run": self.run_id, "status": status, "at": f"{time.time():.3f}"}
        )
        self._closing = True
        self._ensure_writer()
        if self._task is None:
            return
        self._wakeup.set()  # type: ignore[union-attr]
        if self._urgent is not None:
            self._urgent.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            logger.warning(
                "gave up flushing workflow events to %s after %s s", self.where, timeout_s
            )
            # Bounded: a cancel swallowed inside a Redis call leaves the writer to see
            # ``_closing`` once that call returns.
            await stop_task(self._task)
        except Exception as error:  # e.g. a malformed URL: the log is lost, the run is not
            logger.warning(
                "workflow event log %s failed: %s: %s", self.where, type(error).__name__, error
            )


class EventStream(BufferedLog):
    """Appends a run's log entries to a capped Redis stream (see :mod:`fleet.runlog`).

    The writer lingers a moment after the first entry of a batch, so the events of
    steps that end close together go out in one pipeline, not one round trip each.
    """

    _LINGER_S = 0.05

    def __init__(self, redis_url: str, key: str, *, maxlen: int, run_id: str) -> None:
        self.key = key
        self.maxlen = maxlen
        self._url = redis_url
        self._client: Redis | None = None
        super().__init__(f"Redis stream {key!r}", run_id=run_id)

    async def _open(self) -> None:
        from .redis.clients import async_client

        self._client = async_client(
            self._url, retry=False, socket_timeout=5.0, socket_connect_timeout=5.0
        )

    async def _append(self, batch: list[dict[str, str]]) -> None:
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in batch:
                pipe.xadd(self.key, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

    async def _shut(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
