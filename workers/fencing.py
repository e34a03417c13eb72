"""Fencing: a step whose lease this worker cannot renew in time is stopped, and counts for nothing.

A worker's claim on a step is a lease in Redis (``{prefix}:lease:{tid}``, ``SET NX PX``)
holding a token that names this attempt. A worker cut off from Redis, or paused, cannot
tell whether its lease still lives; once it lapses the host sends the step again and
another worker may own it. So each attempt has a :class:`Fence` over the lease the
process's lease thread keeps (:class:`~fleet.keeper.Held`, renewed by
:class:`~workers.keeper.LeaseKeeper`), which counts the lease from the moment it *sent*
its last claim or renewal that Redis accepted (Redis set the expiry no earlier). A little
before that much time has passed without a newer renewal accepted, or as soon as the
keeper finds the lease gone, the fence trips (this module's own thread watches the
clock, so a renewal stuck on a dead link does not delay it; it sleeps until the earliest
deadline of the running attempts, rather than looking at every fence on a tick):

* the step is interrupted through its cancellation, on its own event loop, which closes
  its open model calls (the cancel path, :mod:`fleet.cancel.signal`);
* every model call the agent still tries is refused (``AgentContext.fence``, checked by
  ``check_tokens`` before each call), also in the moments between a ``SIGCONT`` and this
  module's watch thread running again;
* the worker records nothing for it (``finish`` is not even sent), and what its tokens
  were spent on is charged on its own (see ``WorkerRuntime.settle``).

The fence is the worker's half. The other half is in Redis: every record an attempt
writes (outcome, done-marker, journal record, the host's notice) goes through
``finish.lua``, which writes only while the lease holds the attempt's token, so a write
sent before the fence tripped and delivered after the lease lapsed is refused too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable

from fleet.budget import WorkflowBudget
from fleet.errors import AgentError, BrokerError
from fleet.keeper import Held
from fleet.redis.clients import OUTAGE_TOLERANCE_S

__all__ = ["FENCE_MARGIN", "Fence", "Fences", "charge_stopped"]

logger = logging.getLogger("fleet.worker")

FENCE_MARGIN = 0.1
"""The fence trips this fraction of the lease before the lease would lapse in Redis: time
for the interrupt to reach the agent and its model calls to close."""


class Fence:
    """One attempt's lease as this worker knows it: until when it surely holds.

    Args:
        token: the attempt's token (the lease's value).
        held: the lease as the lease thread keeps it (its ``expires_at`` moves on with
            every accepted renewal; ``lapsed`` once the keeper finds it gone).
    """

    def __init__(self, token: str, held: Held) -> None:
        self.token = token
        self.held = held
        self._margin_s = held.lease_s * FENCE_MARGIN
        self.tripped_at: float | None = None
        """When the fence tripped (``time.monotonic()``), or ``None``."""
        self._lock = threading.Lock()
        self._stop: Callable[[str], object] | None = None

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` past which the attempt must not act any more."""
        return self.held.expires_at - self._margin_s

    def lapsed(self) -> bool:
        """Whether the attempt may no longer act (its lease may have lapsed)."""
        return self.tripped_at is not None or self.held.lapsed or time.monotonic() >= self.deadline

    @property
    def reason(self) -> str:
        """The cancel reason the stopped step reports (its outcome is never recorded)."""
        return f"this worker could not renew its lease on the step in time (attempt {self.token})"

    def on_trip(self, stop: Callable[[str], object]) -> None:
        """Call ``stop(reason)`` when the fence trips (now, if it already has)."""
        with self._lock:
            self._stop = stop
            tripped = self.tripped_at is not None
        if tripped:
            stop(self.reason)

    def trip(self) -> None:
        """Stop the attempt (once): interrupt it through the callback :meth:`on_trip` set."""
        with self._lock:
            if self.tripped_at is not None:
                return
            self.tripped_at = time.monotonic()
            stop = self._stop
        logger.warning("stopping a step: %s", self.reason)
        if stop is not None:
            stop(self.reason)

    def check(self) -> None:
        """Before a model call: refuse it once the lease may have lapsed.

        Raises:
            AgentError: ``cancelled``.
        """
        if self.lapsed():
            self.trip()
            raise AgentError(f"step stopped: {self.reason}", kind="cancelled")


class Fences:
    """The fences of this process's running attempts, and the thread that trips them.

    The thread sleeps until the earliest deadline among the fences (a renewal only moves
    a deadline later, so waking at the old one and finding it moved costs one look); a
    fence opened with an earlier deadline than the one it sleeps towards wakes it.
    """

    def __init__(self) -> None:
        self._fences: dict[str, Fence] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._next = math.inf
        """The deadline the watch thread sleeps towards (``inf`` while it looks)."""
        self._pid = 0
        self.wakeups = 0
        """How many times the watch thread has looked at the fences."""

    def open(self, key: str, token: str, held: Held) -> Fence:
        """Fence the attempt that took lease ``key`` with ``token``, kept as ``held``."""
        fence = Fence(token, held)
        with self._lock:
            earlier = self._fences.get(key)
            self._fences[key] = fence
            if self._pid != os.getpid():  # first use in this (possibly forked) process
                self._pid = os.getpid()
                self._next = math.inf
                self._wake = threading.Event()
                threading.Thread(target=self._watch, name="fleet-fences", daemon=True).start()
            sooner = fence.deadline < self._next
        if sooner:
            self._wake.set()
        if earlier is not None:
            earlier.trip()  # the step was claimed again: that attempt's lease is gone
        return fence

    def get(self, key: str, token: str = "") -> Fence | None:
        """The fence of the attempt holding lease ``key`` here (with ``token``, if given)."""
        with self._lock:
            fence = self._fences.get(key)
        return fence if fence is not None and token in ("", fence.token) else None

    def close(self, key: str, token: str = "") -> Fence | None:
        """The attempt on ``key`` (with ``token``, if given) ended: stop watching it.

        Returns its fence, or ``None`` (then another attempt of the same step, claimed
        here after this one's lease lapsed, holds ``key``: it is left alone).
        """
        with self._lock:
            fence = self._fences.get(key)
            if fence is None or token not in ("", fence.token):
                return None
            return self._fences.pop(key)

    def lapsed(self, held: Held) -> None:
        """The lease keeper's lapse hook: the lease ``held`` is gone; stop its attempt."""
        lease = held.subject
        fence = self.get(getattr(lease, "key", ""), getattr(lease, "owner", ""))
        if fence is not None and fence.held is held and fence.lapsed():
            fence.trip()

    def _watch(self) -> None:
        while True:
            self._wake.wait(self._look())

    def _look(self) -> float | None:
        """Trip the lapsed fences; how long until the earliest deadline of the others."""
        self.wakeups += 1
        with self._lock:
            # A fence opened while we look wakes us again (its deadline < inf).
            self._next = math.inf
            self._wake.clear()
            fences = list(self._fences.values())
        soonest = math.inf
        for fence in fences:
            if fence.tripped_at is None:
                if fence.lapsed():
                    try:
                        fence.trip()
                    except Exception:  # one step's stop failing must not unfence the others
                        logger.exception("could not stop a step whose lease lapsed")
                else:
                    soonest = min(soonest, fence.deadline)
        with self._lock:
            self._next = soonest
        return None if soonest == math.inf else max(soonest - time.monotonic(), 0.0)


async def charge_stopped(
    budget: WorkflowBudget, reservation_id: str, token: str, used: int
) -> None:
    """Charge what a stopped attempt used, on an id of its own: ``{reservation id}~{token}``.

    The step's own reservation stays held for the attempt that runs it now, and each
    attempt is charged once (settling is idempotent by id). A worker stopped because it
    was cut off from Redis asks until Redis answers, for up to ``OUTAGE_TOLERANCE_S``.

    Raises:
        BrokerError: Redis stayed out of reach that long (the usage is not charged).
    """
    stopped = budget.reservation(f"{reservation_id}~{token}", 0)
    deadline, pause = time.monotonic() + OUTAGE_TOLERANCE_S, 0.05
    while True:
        try:
            await stopped.settle(used)
            return
        except BrokerError:
            if time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)
