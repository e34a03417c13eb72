"""A worker's output deltas to Redis: one writer thread per process, coalescing per step.

Every step of the process that streams gets a :class:`ThreadPublisher`; its pieces wait
in a list under the publisher's own lock (an ``emit`` takes no lock the writer holds for
long, wakes no thread and makes no object but the piece). One background thread writes:
a step's first piece at once, then every ``interval_s`` (a tick) whatever every step has
waiting, in one pipeline, as one ``XADD`` per stream (up to :data:`DELTA_BATCH` steps'
text in one entry, see :func:`~fleet.deltas.encode_entry`) and an ``EXPIRE`` per stream
about once a minute. So 256 steps streaming on one worker cost a few commands a tick,
whatever their token rate. A thread (not the step's event loop), so blocking agents and
the shared loop alike publish without waiting for Redis; it is started on first use in
each (forked) process.

A step's last text is written before its outcome is recorded (:meth:`ThreadPublisher.close`
flushes it at once and waits for it), so a reader that saw ``step_finished`` finds every
delta before it in the stream. An outage drops text (one warning), never fails or stalls
a step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .deltas import DELTA_BATCH, DELTA_INTERVAL_S, DELTA_MAXLEN, DELTA_TTL_S, Pending
from .deltastream import encode_entry

if TYPE_CHECKING:
    import redis

__all__ = ["DeltaWriter", "ThreadPublisher"]

logger = logging.getLogger("fleet.deltas")

EXPIRE_EVERY_S = 60.0
"""A stream's expiry is pushed back at most this often by one process."""

Segment = tuple[int, str]


class ThreadPublisher:
    """One step's deltas, from any thread, to the process's :class:`DeltaWriter`."""

    def __init__(self, writer: DeltaWriter, key: str, task_id: str) -> None:
        self.key = key
        self.pending = Pending(task_id)
        self.written = threading.Event()
        """Set once a closed publisher's last text is written (or given up)."""
        self._writer = writer
        self._lock = threading.Lock()
        self._started = False

    @property
    def attempt(self) -> str:
        """This run of the step (every entry carries it)."""
        return self.pending.attempt

    def emit(self, text: str, *, replace: bool = False) -> None:
        """Queue ``text`` (``replace``: start the step's text over); never blocks on Redis."""
        if not text and not replace:
            return
        with self._lock:
            if self.pending.closed:
                return
            self.pending.add(text, replace=replace)
            started, self._started = self._started, True
        if not started or self._writer.interval_s <= 0:
            self._writer.flush(self)  # a step's first piece goes out at once

    def close(self, timeout_s: float = 1.0) -> None:
        """Write what is left and wait (up to ``timeout_s``) until it is in Redis."""
        with self._lock:
            self.pending.closed = True
            started = self._started
        if started:
            self._writer.flush(self)
            self.written.wait(timeout_s)

    def take(self) -> tuple[Segment | None, bool]:
        """The waiting text (now sent) and whether the publisher is closed."""
        with self._lock:
            return self.pending.take(), self.pending.closed


class DeltaWriter:
    """Writes the deltas of every step of this process (see the module docstring).

    Args:
        client: this process's Redis client (called in the writer thread).
        interval_s: how often waiting text is written (a step's first piece at once;
            ``0``: every piece at once).
        maxlen: entries a stream keeps (``MAXLEN ~``).
        ttl_s: a stream expires this long after its last write.
    """

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        *,
        interval_s: float = DELTA_INTERVAL_S,
        maxlen: int = DELTA_MAXLEN,
        ttl_s: float = DELTA_TTL_S,
    ) -> None:
        self._client = client
        self.interval_s = interval_s
        self.maxlen = maxlen
        self.ttl_s = int(max(ttl_s, 1))
        self._wake = threading.Condition()
        self._active: dict[int, ThreadPublisher] = {}
        self._now: dict[int, ThreadPublisher] = {}
        self._next_tick = math.inf
        self._expired_at: dict[str, float] = {}
        self._pid = 0
        self._warned = False
        self.commands = 0
        """Redis commands sent so far (entries plus expiries), for benchmarks."""

    def publisher(self, key: str, task_id: str) -> ThreadPublisher:
        """A publisher for one run of step ``task_id`` into stream ``key``."""
        return ThreadPublisher(self, key, task_id)

    def flush(self, publisher: ThreadPublisher) -> None:
        """Write ``publisher``'s waiting text now (its first piece, or its last)."""
        with self._wake:
            if self._pid != os.getpid():  # first use in this (possibly forked) process
                self._pid = os.getpid()
                self._active.clear()
                self._now.clear()
                threading.Thread(target=self._run, name="fleet-deltas", daemon=True).start()
            self._active[id(publisher)] = publisher
            self._now[id(publisher)] = publisher
            if self._next_tick == math.inf and self.interval_s > 0:
                self._next_tick = time.monotonic() + self.interval_s
            self._wake.notify()

    def _due(self) -> list[ThreadPublisher]:
        """Wait (holding the condition) for a tick or a publisher to flush now; take them."""
        while True:
            now = time.monotonic()
            if now >= self._next_tick:
                due = self._now | self._active
                self._next_tick = now + self.interval_s if self._active else math.inf
            elif self._now:
                due = self._now
            else:
                self._wake.wait(None if self._next_tick == math.inf else self._next_tick - now)
                continue
            self._now = {}
            return list(due.values())

    def _run(self) -> None:
        while True:
            with self._wake:
                due = self._due()
            batch, closed = [], []
            for publisher in due:
                segment, done = publisher.take()
                if segment is not None:
                    batch.append((publisher, segment))
                if done:
                    closed.append(publisher)
            if closed:
                with self._wake:
                    for publisher in closed:
                        self._active.pop(id(publisher), None)
            try:
                self._write(batch)
            except Exception as error:  # a dead Redis must not fail or stall the steps
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "cannot write output deltas (%s: %s); live text is dropped until "
                        "Redis answers",
                        type(error).__name__,
                        error,
                    )
            finally:
                for publisher in closed:
                    publisher.written.set()

    def _write(self, batch: list[tuple[ThreadPublisher, Segment]]) -> None:
        """One pipeline: one ``XADD`` per stream (per :data:`DELTA_BATCH` steps)."""
        if not batch:
            return
        now = time.monotonic()
        streams: dict[str, list[tuple[str, str, int, str]]] = {}
        for publisher, (offset, text) in batch:
            pending = publisher.pending
            streams.setdefault(publisher.key, []).append(
                (pending.task_id, pending.attempt, offset, text)
            )
        pipe = self._client().pipeline(transaction=False)
        sent = 0
        for key, deltas in streams.items():
            for start in range(0, len(deltas), DELTA_BATCH):
                entry = encode_entry(deltas[start : start + DELTA_BATCH])
                pipe.xadd(key, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                sent += 1
            if now - self._expired_at.get(key, -math.inf) > EXPIRE_EVERY_S:
                self._expired_at[key] = now
                pipe.expire(key, self.ttl_s)
                sent += 1
        self.commands += sent
        pipe.execute()
        if len(self._expired_at) > 10_000:  # forget streams not written for a while
            self._expired_at = {
                key: at for key, at in self._expired_at.items() if now - at < EXPIRE_EVERY_S
            }
