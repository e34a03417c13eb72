"""A worker's output deltas to Redis: one writer thread per process, coalescing per step.

Every step of the process that streams gets a :class:`ThreadPublisher`; its text waits in
memory, and one background thread writes what is due in one pipeline per turn: a step's
first piece at once, then at most one ``XADD`` per step every ``interval_s``, and an
``EXPIRE`` per stream about once a minute. So 256 steps streaming on one worker cost
about ``256 / interval_s`` entries a second in a few round trips, whatever their token
rate. A thread (not the step's event loop), so blocking agents and the shared loop alike
publish without waiting for Redis; it is started on first use in each (forked) process.

A step's last text is written before its outcome is recorded (:meth:`ThreadPublisher.close`
waits for it), so a reader that saw ``step_finished`` finds every delta before it in the
stream. An outage drops text (one warning), never fails or stalls a step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .deltas import DELTA_INTERVAL_S, DELTA_MAXLEN, DELTA_TTL_S, Pending, encode_entry

if TYPE_CHECKING:
    import redis

__all__ = ["DeltaWriter", "ThreadPublisher"]

logger = logging.getLogger("fleet.deltas")

EXPIRE_EVERY_S = 60.0
"""A stream's expiry is pushed back at most this often by one process."""


class ThreadPublisher:
    """One step's deltas, from any thread, to the process's :class:`DeltaWriter`."""

    def __init__(self, writer: DeltaWriter, key: str, task_id: str) -> None:
        self.key = key
        self.pending = Pending(task_id)
        self.written = threading.Event()
        """Set once a closed publisher's last text is written (or given up)."""
        self._writer = writer

    @property
    def attempt(self) -> str:
        """This run of the step (every entry carries it)."""
        return self.pending.attempt

    def emit(self, text: str, *, replace: bool = False) -> None:
        """Queue ``text`` (``replace``: start the step's text over); never blocks on Redis."""
        self._writer.add(self, text, replace)

    def close(self, timeout_s: float = 1.0) -> None:
        """Write what is left and wait (up to ``timeout_s``) until it is in Redis."""
        if self._writer.finish(self):
            self.written.wait(timeout_s)


class DeltaWriter:
    """Writes the deltas of every step of this process (see the module docstring).

    Args:
        client: this process's Redis client (called in the writer thread).
        interval_s: a step's entries are at least this far apart (its first at once).
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
        self._expired_at: dict[str, float] = {}
        self._pid = 0
        self._warned = False
        self.commands = 0
        """Redis commands sent so far (entries plus expiries), for benchmarks."""

    def publisher(self, key: str, task_id: str) -> ThreadPublisher:
        """A publisher for one run of step ``task_id`` into stream ``key``."""
        return ThreadPublisher(self, key, task_id)

    def add(self, publisher: ThreadPublisher, text: str, replace: bool) -> None:
        """Queue a publisher's text (see :meth:`ThreadPublisher.emit`)."""
        if not text and not replace:
            return
        with self._wake:
            self._ensure_thread()
            if publisher.pending.closed:
                return
            self._active[id(publisher)] = publisher
            if publisher.pending.add(text, replace=replace):
                self._wake.notify()

    def finish(self, publisher: ThreadPublisher) -> bool:
        """Mark a publisher closed; returns whether something is left to write."""
        with self._wake:
            publisher.pending.closed = True
            if id(publisher) not in self._active:
                return False
            self._wake.notify()
            return True

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use in this (possibly forked) process
            self._pid = os.getpid()
            self._active.clear()
            threading.Thread(target=self._run, name="fleet-deltas", daemon=True).start()

    def _due(self) -> list[tuple[ThreadPublisher, list[tuple[int, str]]]]:
        """Wait (holding the condition) until some text is due; take it."""
        while True:
            now = time.monotonic()
            due, wait = [], math.inf
            for publisher in self._active.values():
                pending = publisher.pending
                ready_at = pending.last_sent + self.interval_s
                if pending.closed or (pending.segments and ready_at <= now):
                    due.append(publisher)
                elif pending.segments:
                    wait = min(wait, ready_at - now)
            if due:
                batch = []
                for publisher in due:
                    publisher.pending.last_sent = now
                    batch.append((publisher, publisher.pending.take()))
                    if publisher.pending.closed:
                        del self._active[id(publisher)]
                return batch
            self._wake.wait(None if wait == math.inf else wait)

    def _run(self) -> None:
        while True:
            with self._wake:
                batch = self._due()
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
                for publisher, _segments in batch:
                    if publisher.pending.closed:
                        publisher.written.set()

    def _write(self, batch: list[tuple[ThreadPublisher, list[tuple[int, str]]]]) -> None:
        now = time.monotonic()
        pipe = self._client().pipeline(transaction=False)
        sent = 0
        for publisher, segments in batch:
            for offset, text in segments:
                entry = encode_entry(publisher.pending.task_id, publisher.attempt, offset, text)
                pipe.xadd(publisher.key, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                sent += 1
            if segments and now - self._expired_at.get(publisher.key, -math.inf) > EXPIRE_EVERY_S:
                self._expired_at[publisher.key] = now
                pipe.expire(publisher.key, self.ttl_s)
                sent += 1
        if sent:
            self.commands += sent
            pipe.execute()
        if len(self._expired_at) > 10_000:  # forget streams not written for a while
            self._expired_at = {
                key: at for key, at in self._expired_at.items() if now - at < EXPIRE_EVERY_S
            }
