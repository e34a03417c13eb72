"""The in-flight dispatcher every round and pipeline of one executor shares (per event loop).

What is written once here, for steps and chain links alike:

* **slots** — at most ``max_in_flight`` flights (a step, or one item's chain) are queued
  or running; a caller past that waits on a semaphore and holds no Redis connection;
  a step whose agent has a provider limit also waits its turn at the limit's
  :class:`~fleet.limiters.dispatch.DispatchGate`, so steps that could only wait for
  the window do not fill the broker and the workers' slots;
* **send** — register the flights, then hand their Celery signatures to the executor's
  sender; sending pauses while the broker queue is at ``queue_high_water``;
* **collect** — one collector task reads the one reply list of this host (``BLPOP``,
  then ``LPOP`` in batches) and routes each notice to the round or pipeline it
  belongs to (its :class:`Track`), by task id;
* **recover** — every check interval, one Redis pipeline looks at the flights that
  started or were not claimed in time: a recorded outcome is replayed as the notice
  that was lost, a live lease marks the flight started, anything else is handed back
  to its track to be sent again under the same task id;
* **release** — a finished flight gives its slot back.

The collector is the one task not owned by a caller: one reader per event loop is what
bounds a host's Redis connections however many callers wait. It runs only while
flights are out, stops by itself when none are, and :meth:`Dispatcher.aclose` ends it
within a bounded time: a stop flag the collector checks on every turn (each turn waits
at most a check interval on Redis), then a cancel, never a wait on the cancel alone.
The callers' own tasks handle their notices (:meth:`Track.receive`), so an outcome
callback never runs on the collector.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ..keeper import stop_task
from ..limiters import RedisRateLimiter
from ..limiters.dispatch import DispatchGate
from ..redis.clients import async_client
from ..redis.sentinel import check_redis
from .protocol import read_notice, recorded
from .track import Broken, Flight, Lost

if TYPE_CHECKING:
    from .executor import CeleryExecutor

__all__ = ["HOST_CONNECTIONS", "Dispatcher"]

logger = logging.getLogger("fleet.celery")

HOST_CONNECTIONS = 16
"""Redis connections one executor keeps per event loop (one of them for the collector).

Commands wait for a free connection instead of failing, so this bounds a host process
however many steps its callers await at once.
"""
_DRAIN = 512


_Flight = TypeVar("_Flight", bound=Flight)

STOP_TIMEOUT_S = 0.5
"""How long :meth:`Dispatcher.aclose` lets the collector end by itself before cancelling it."""


class Dispatcher:
    """One executor's flights on one event loop: slots, send, collect, recover, release."""

    def __init__(self, executor: CeleryExecutor) -> None:
        self.x = executor
        self.keys = executor.keys
        self.check_interval_s = executor.check_interval_s
        self.reply = self.keys.reply(f"host-{uuid.uuid4().hex[:16]}")
        """This host's reply list: every step and chain link it sends names it."""
        self.slots = asyncio.Semaphore(executor.settings.max_in_flight)
        self.flights: dict[str, Flight] = {}
        """The flights out, by the task id of the message each waits for."""
        self.routes: dict[str, Flight] = {}
        """Every task id whose notices go to a flight (its ``tid`` and its ``routes``)."""
        self._client: aioredis.Redis | None = None
        self._probed = False
        self._probe_lock = asyncio.Lock()
        self._collector: asyncio.Task[None] | None = None
        self._stopping = False
        self._blmpop = True
        self._credit = 0
        self._credit_at = float("-inf")
        self._room_lock = asyncio.Lock()
        settings = executor.settings
        self._limiter = RedisRateLimiter(settings.redis_url, key_prefix=settings.key_prefix)
        self.gate = DispatchGate(self._limiter, recheck_s=min(self.check_interval_s, 0.1))

    # ------------------------------------------------------------------ Redis

    def client(self) -> aioredis.Redis:
        """This loop's Redis client: retries through a restart, :data:`HOST_CONNECTIONS` max."""
        if self._client is None:
            self._client = async_client(
                self.x.settings.redis_url,
                max_connections=HOST_CONNECTIONS,
                pool_timeout_s=None,
                client_name=f"fleet-host-{os.getpid()}",
            )
        return self._client

    async def ready(self) -> aioredis.Redis:
        """The client, after a one-time check (no retries) that Redis answers.

        So an unreachable broker (or a sentinel URL that reaches no master) fails the
        first round at once, not after the client's outage tolerance; every caller that
        arrives meanwhile waits for the same check.
        """
        if not self._probed:
            async with self._probe_lock:
                if not self._probed:
                    # One line naming the problem (unreachable, wrong password, no
                    # sentinel, unknown master), before anything is reserved or sent.
                    await asyncio.to_thread(check_redis, self.x.settings.redis_url)
                    self._probed = True
        return self.client()

    async def aclose(self) -> None:
        """Stop the collector (within about a second) and close this loop's connections."""
        collector = self._collector
        if collector is not None:
            self._stopping = True
            if not await stop_task(collector, grace_s=STOP_TIMEOUT_S, timeout_s=STOP_TIMEOUT_S):
                # Its cancel was swallowed mid-command: it ends after that command (one
                # bounded BLMPOP) on its stop flag. Closing the client under it would make
                # its retry open connections nobody closes.
                await asyncio.wait({collector})
        await self._limiter.close()
        if self._client is not None:
            await self._client.aclose()
            await self._client.connection_pool.disconnect()
            self._client = None

    # ------------------------------------------------------------------ slots and send

    async def acquire(self, flight: Flight) -> None:
        """Wait for a slot for ``flight``, then for its provider limit's turn."""
        await self.slots.acquire()
        try:
            await self.gate.turn(flight.limit)
        except BaseException:
            self.slots.release()
            raise
        flight.holds_slot = True

    def may_send(self, flight: Flight) -> bool:
        """Whether :meth:`acquire` of ``flight`` would not wait for its provider limit."""
        return self.gate.ready(flight.limit)

    async def batches(self, flights: Sequence[_Flight], limit: int) -> AsyncIterator[list[_Flight]]:
        """``flights`` in batches that hold their slots, sized to the room in the queue.

        The first flight of a batch waits for a slot before anything touches Redis; the
        batch grows while slots are free and the next flight's provider limit lets it go
        (a batch is sent before waiting on a saturated limit), up to ``limit`` and the
        queue's room.
        """
        pending = iter(flights)
        flight = next(pending, None)
        while flight is not None:
            await self.acquire(flight)
            room = min(await self.room(), limit)
            batch = [flight]
            flight = next(pending, None)
            while (
                flight is not None
                and len(batch) < room
                and not self.slots.locked()
                and self.may_send(flight)
            ):
                await self.acquire(flight)
                batch.append(flight)
                flight = next(pending, None)
            yield batch

    def release(self, flight: Flight) -> None:
        """``flight`` is finished: forget it and give its slot (and limit turn) back."""
        self.release_route(flight)
        for tid in flight.routes:
            if self.routes.get(tid) is flight:
                del self.routes[tid]
        if flight.holds_slot:
            flight.holds_slot = False
            self.slots.release()
            self.gate.finished(flight.limit)

    async def room(self) -> int:
        """How many more messages the step queue takes; waits while it is at high water.

        One ``LLEN`` answers for a check interval: what this host sends meanwhile is
        counted against it, so a burst of small rounds does not ask Redis each time.
        """
        high_water = self.x.settings.queue_high_water
        async with self._room_lock:
            while True:
                stale = time.monotonic() - self._credit_at >= self.check_interval_s
                if self._credit > 0 and not stale:
                    return self._credit
                depth = await self.client().llen(self.x.settings.queue)
                self._credit, self._credit_at = int(high_water - depth), time.monotonic()
                if self._credit > 0:
                    return self._credit
                await asyncio.sleep(self.check_interval_s / 2)

    def watch(self, flight: Flight, *, started: bool = False) -> None:
        """Follow ``flight`` (sent now, or found running): route its notices, check it."""
        flight.sent_at, flight.started = time.monotonic(), started
        self.flights[flight.tid] = flight
        for tid in (flight.tid, *flight.routes):
            self.routes[tid] = flight
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name="fleet-celery-collector"
            )

    def rekey(self, flight: Flight, tid: str) -> None:
        """``flight`` now waits for ``tid`` (a chain moved on to its next link)."""
        self.release_route(flight)
        flight.tid = tid
        self.watch(flight)

    def release_route(self, flight: Flight) -> None:
        """Stop following the message ``flight`` waits for (late words about it are dropped)."""
        if self.flights.get(flight.tid) is flight:
            del self.flights[flight.tid]
        if self.routes.get(flight.tid) is flight:
            del self.routes[flight.tid]

    async def send(self, flights: Sequence[Flight], signatures: list[Any]) -> None:
        """Send ``signatures`` (one Celery group) for ``flights`` and follow them."""
        for flight in flights:
            self.watch(flight)
        self._credit -= len(signatures)
        await self.x._send(signatures, as_group=True)

    # ------------------------------------------------------------------ collect and recover

    async def _collect(self) -> None:
        interval = self.check_interval_s
        next_check = time.monotonic() + interval
        try:
            client = self.client()
            while self.flights and not self._stopping:
                for raw in await self._pop(client, interval):
                    self._route(raw)
                if time.monotonic() >= next_check:
                    await self._check()
                    next_check = time.monotonic() + interval
        except Exception as error:
            owners = {id(f.owner): f.owner for f in self.flights.values() if f.owner}
            for owner in owners.values():
                owner.inbox.put_nowait(Broken(error))
        finally:
            self._collector = None

    async def _pop(self, client: aioredis.Redis, wait_s: float) -> list[Any]:
        """Wait up to ``wait_s`` for notices; take every one waiting, in one round trip.

        ``BLMPOP ... COUNT`` (Redis 7) returns them all at once; an older server gets
        ``BLPOP`` and then ``LPOP count``.
        """
        if self._blmpop:
            try:
                popped = await client.blmpop(wait_s, 1, self.reply, direction="LEFT", count=_DRAIN)
            except ResponseError as error:
                if "unknown command" not in str(error).lower():
                    raise
                self._blmpop = False
            else:
                return [] if popped is None else list(popped[1])
        first = await client.blpop([self.reply], timeout=wait_s)
        if first is None:
            return []
        more: Any = await client.lpop(self.reply, _DRAIN)
        return [first[1], *(more or ())]

    def _route(self, raw: Any) -> None:
        notice = read_notice(raw)
        flight = None if notice is None else self.routes.get(notice.id)
        if flight is not None and flight.owner is not None and notice is not None:
            flight.owner.inbox.put_nowait((flight, notice))

    async def _check(self) -> None:
        """Replay lost notices, mark running flights, hand lost flights back to their track."""
        now = time.monotonic()
        claim_timeout = self.x.settings.claim_timeout_s
        suspects = [
            f for f in self.flights.values() if f.started or now - f.sent_at >= claim_timeout
        ]
        if not suspects:
            return
        async with self.client().pipeline(transaction=False) as pipe:
            for flight in suspects:
                pipe.exists(self.keys.lease(flight.tid))
                pipe.get(self.keys.result(flight.tid, flight.nonce))
                if flight.journaled:
                    pipe.hget(flight.record, f"done:{flight.tid}")
            replies = iter(await pipe.execute())
        for flight in suspects:
            leased, record = next(replies), next(replies)
            if flight.journaled:
                record = next(replies) or record
            owner = flight.owner
            if owner is None or self.flights.get(flight.tid) is not flight:
                continue
            if record is not None:
                # It finished but its notice was lost: replay what it recorded.
                owner.inbox.put_nowait((flight, recorded(flight.tid, record)))
            elif leased:
                flight.started = True
            else:
                logger.warning(
                    "task %s was %s; re-sending it under the same task id",
                    flight.tid,
                    "orphaned by a dead worker"
                    if flight.started
                    else f"not claimed within {claim_timeout} s",
                )
                flight.sent_at, flight.started = now, False
                owner.inbox.put_nowait(Lost(flight))
