"""The worker's one keeper: a thread that renews every lease its process holds.

Each turn it renews, in **one** Redis pipeline, every step lease and every budget
reservation that is due (a third of its lease after the last renewal), and, every
:data:`~fleet.cancel.markers.WATCH_INTERVAL_S`, reads the cancel markers of the running
steps (:class:`~fleet.cancel.markers.MarkerWatch`). A
thread rather than the steps' event loop, so leases stay alive while an agent hogs its
loop; it dies with the process, so a killed worker's leases lapse.

Steps never wait on it: taking a lease back (:meth:`LeaseKeeper.release`,
:meth:`LeaseKeeper.drop`) is a dictionary update under a lock the thread never holds
across a Redis call. Its own client has no retries and a socket timeout
(:func:`~fleet.keeper.renewal_timeout` of the step lease), so one turn is bounded too;
the next turn is the retry.

**Lapses.** A lease whose renewal did not succeed before it lapsed (timed from when the
last successful renewal was *sent*, so never later than Redis's own expiry), or that Redis
no longer holds for us (``renew_lease`` answered 0: expired, or another owner), is marked
lapsed, no longer renewed, logged, and its ``on_lapse(held)`` hook is called from this
thread (it must not block: hand the work to the step's loop with
``loop.call_soon_threadsafe``). A hook is the place to stop a step that lost its lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis

from fleet.budget import Reservation
from fleet.cancel.markers import WATCH_INTERVAL_S, MarkerWatch
from fleet.keeper import Held, Keeper, LapseHook, Renewable, lapse, renewal_timeout
from fleet.redis.clients import sync_client
from fleet.redis.scripts import Script, execute, script

__all__ = ["LeaseKeeper", "StepLease"]

logger = logging.getLogger("fleet.worker")

_MIN_PAUSE_S = 0.005
"""Shortest sleep between two turns (renewals due within it go together)."""


class StepLease:
    """A step's (or chain link's) lease key and the owner token this worker holds it with."""

    __slots__ = ("key", "owner")

    def __init__(self, key: str, owner: str) -> None:
        self.key = key
        self.owner = owner


class LeaseKeeper(Keeper):
    """Renews this process's step leases and budget reservations from one thread.

    Args:
        redis_url: the fleet's Redis (the thread makes its own bounded client).
        lease_s: the step lease (``step_lease_s``).
        key_prefix: the fleet's key prefix (for the cancel markers).
    """

    def __init__(self, redis_url: str, lease_s: float, key_prefix: str) -> None:
        self._url = redis_url
        self.lease_s = lease_s
        self._lease_ms = max(int(lease_s * 1000), 1)
        self._steps: dict[str, Held] = {}
        self._reservations: dict[int, Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.markers = MarkerWatch(key_prefix)
        """The cancel markers of the running steps, read on every turn."""

    # ------------------------------------------------------------------ holders' side

    def hold(
        self,
        key: str,
        owner: str,
        *,
        taken_at: float | None = None,
        on_lapse: LapseHook | None = None,
    ) -> Held:
        """Renew the step lease ``key`` (held as ``owner``) until :meth:`release`.

        Args:
            key: the lease key.
            owner: the owner token the claim script wrote.
            taken_at: ``time.monotonic()`` just before the claim that took it (default
                now); its lapse is timed from there.
            on_lapse: called once, from this thread, if the lease lapses while held.
        """
        held = Held.start(StepLease(key, owner), f"step lease {key}", self.lease_s)
        held.on_lapse = on_lapse
        if taken_at is not None:
            held.expires_at = taken_at + self.lease_s
        with self._lock:
            self._steps[key] = held
            self._start()
        return held

    def release(self, key: str) -> None:
        """Stop renewing the step lease ``key`` (it lapses unless the step finished)."""
        with self._lock:
            held = self._steps.pop(key, None)
        if held is not None:
            held.dropped = True

    def keep(
        self,
        subject: Renewable,
        *,
        every_s: float | None = None,
        on_lapse: LapseHook | None = None,
    ) -> Held:
        """Renew a budget reservation (of a Redis ledger) until :meth:`drop`."""
        if not isinstance(subject, Reservation) or not hasattr(subject.budget.ledger, "renewal"):
            raise TypeError(f"a worker's keeper renews Redis ledger reservations, not {subject!r}")
        held = Held.start(
            subject, subject.lease_name, subject.lease_s, every_s=every_s, on_lapse=on_lapse
        )
        with self._lock:
            self._reservations[id(held)] = held
            self._start()
        self._wake.set()  # its first renewal may come before the thread's next turn
        return held

    def drop(self, held: Held) -> None:
        """Stop renewing a reservation: a dictionary update, nothing awaited."""
        held.dropped = True
        with self._lock:
            self._reservations.pop(id(held), None)

    def held(self) -> int:
        """How many leases and reservations it renews now."""
        with self._lock:
            return len(self._steps) + len(self._reservations)

    def _start(self) -> None:
        """Start the thread on first use in this (possibly forked) process; lock held."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="fleet-leases", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (it ends its turn first); the process's leases then lapse."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the thread

    def _client(self) -> redis.Redis:
        timeout = renewal_timeout(self.lease_s)
        return sync_client(
            self._url, retry=False, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def _serve(self) -> None:
        client = self._client()
        next_watch = time.monotonic()
        while not self._stopping:
            self._wake.wait(self._pause(next_watch))
            self._wake.clear()
            if self._stopping:
                break
            try:
                next_watch = self._turn(client, next_watch)
            except Exception:
                # Every lease of the process depends on this thread: it must outlive any bug
                # in one holder's hook rather than let all of them lapse.
                logger.exception("the lease thread's turn failed; it goes on")
        client.close()

    def _turn(self, client: redis.Redis, next_watch: float) -> float:
        """Read the markers if their time came, renew what is due; returns the next watch."""
        if time.monotonic() >= next_watch:
            # The markers on their own pace (renewals of short leases come more often).
            next_watch = time.monotonic() + WATCH_INTERVAL_S
            try:
                if len(self.markers):
                    self.markers.poll(client)
            except (redis.RedisError, OSError) as error:
                logger.warning("could not read cancel markers: %s", error)
        due = self._due()
        if due:
            self._renew(client, due)
        return next_watch

    def _pause(self, next_watch: float) -> float:
        with self._lock:
            dues = [h.due for h in (*self._steps.values(), *self._reservations.values())]
        pause = min([*dues, next_watch]) - time.monotonic()
        return max(pause, _MIN_PAUSE_S)

    def _due(self) -> list[Held]:
        now = time.monotonic() + _MIN_PAUSE_S
        with self._lock:
            due = [h for h in self._steps.values() if h.due <= now]
            for held in list(self._reservations.values()):
                if held.subject.finished():  # settled: nothing left to renew
                    self._reservations.pop(id(held), None)
                elif held.due <= now:
                    due.append(held)
        return due

    def _renew(self, client: redis.Redis, due: list[Held]) -> None:
        sent = time.monotonic()
        for held in due:
            held.due = sent + held.every_s
        try:
            pipe = client.pipeline(transaction=False)
            for held in due:
                subject = held.subject
                if isinstance(subject, StepLease):
                    args: list[str | int] = [subject.owner, self._lease_ms]
                    script("renew_lease").queue(pipe, [subject.key], args)
                else:
                    renew, keys, args = self._renewal(subject)
                    renew.queue(pipe, keys, args)
            replies = execute(pipe, raise_on_error=False)
        except (redis.RedisError, OSError) as error:
            replies = [error] * len(due)
        for held, reply in zip(due, replies, strict=True):
            if isinstance(reply, Exception):
                self._failed(held, reply)
            elif reply:
                held.renewed(sent)
            elif not (isinstance(held.subject, Reservation) and held.subject.finished()):
                self._lapsed(held, "Redis no longer holds it for this worker")

    @staticmethod
    def _renewal(reservation: Reservation) -> tuple[Script, list[bytes], list[str | int]]:
        budget = reservation.budget
        renewal: Any = budget.ledger.renewal  # type: ignore[attr-defined]
        result: tuple[Script, list[bytes], list[str | int]] = renewal(
            budget.workflow_id,
            reservation.id,
            lease_s=budget.lease_s,
            ancestors=budget.known_ancestors or (),
        )
        return result

    def _failed(self, held: Held, error: Exception) -> None:
        if held.overdue(time.monotonic()):
            self._lapsed(held, f"not renewed within its {held.lease_s:g} s lease ({error})")
        else:
            logger.info("could not renew %s (will retry): %s", held.name, error)

    def _lapsed(self, held: Held, reason: str) -> None:
        with self._lock:
            if isinstance(held.subject, StepLease):
                if self._steps.get(held.subject.key) is held:
                    del self._steps[held.subject.key]
            else:
                self._reservations.pop(id(held), None)
        lapse(held, reason)
