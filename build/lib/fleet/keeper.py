"""Keepers: what renews a process's leases while their holders run, and says when one lapsed.

A budget reservation (and, on a worker, a step's lease) lives for ``lease_s`` unless its
holder renews it. fleet never gives a holder a renewal task of its own: a holder hands its
lease to a **keeper** when it starts (:meth:`Keeper.keep`) and takes it back when it ends
(:meth:`Keeper.drop`). Dropping is a plain dictionary update: it never waits on the
network, so a step's exit is bounded whatever Redis is doing. The keeper renews every
lease it keeps, each every third of its lease, with every renewal call bounded by a
timeout (:func:`renewal_timeout`), and it stops on a flag it checks on every turn rather
than on a cancellation alone (redis-py's asyncio client can swallow a ``CancelledError``
that arrives while a command is in flight: the call then simply returns).

When a lease could not be renewed before it lapsed, or the store says it is gone (settled
elsewhere, or already expired), the keeper marks it :attr:`Held.lapsed`, stops renewing
it, logs it once and calls the holder's ``on_lapse(held)``: the hook a holder uses to stop
work that no longer owns its lease.

Two keepers exist:

* :class:`LoopKeeper` — one task per event loop renews every reservation kept there
  (the local host, the Celery host's reservations); a :class:`~fleet.WorkflowBudget`
  without an explicit keeper uses one per event loop;
* the worker's lease thread (``workers/keeper.py``) renews the step leases and the budget
  reservations of every step the worker process runs, in one Redis pipeline per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_RENEWAL_TIMEOUT_S",
    "Held",
    "Keeper",
    "LoopKeeper",
    "Renewable",
    "lapse",
    "renewal_timeout",
    "stop_task",
]

logger = logging.getLogger("fleet.keeper")

MAX_RENEWAL_TIMEOUT_S = 2.0
"""The longest a keeper waits for one renewal (a shorter lease waits half its length)."""


def renewal_timeout(lease_s: float) -> float:
    """How long one renewal of a ``lease_s`` lease may take before the keeper gives up on it.

    Half the lease: a renewal slower than that leaves too little of the lease to trust,
    and the next attempt is due by then anyway.
    """
    return max(min(lease_s / 2, MAX_RENEWAL_TIMEOUT_S), 0.001)


class Renewable(ABC):
    """Something a :class:`LoopKeeper` can renew (a budget reservation)."""

    __slots__ = ()

    def finished(self) -> bool:
        """Whether its holder already ended it (a settled reservation): nothing to renew."""
        return False

    @property
    @abstractmethod
    def lease_s(self) -> float:
        """How long the lease lasts after a renewal."""

    @property
    @abstractmethod
    def lease_name(self) -> str:
        """Names the lease in log lines (no secret, no prompt text)."""

    @abstractmethod
    async def renew(self) -> bool:
        """Extend the lease by ``lease_s`` from now; ``False`` if it is gone."""


LapseHook = Callable[["Held"], object]
"""Called once, from the keeper, when a kept lease lapsed; must not block."""


@dataclass(eq=False)
class Held:
    """One lease a keeper keeps alive, as the holder sees it."""

    subject: Any
    """What is renewed (a :class:`Renewable`, or a keeper's own record of a lease)."""
    name: str
    """Names the lease in log lines."""
    lease_s: float
    """The lease's length."""
    every_s: float
    """How often it is renewed."""
    on_lapse: LapseHook | None = None
    """Called once when it lapses (see :attr:`lapsed`)."""
    expires_at: float = 0.0
    """``time.monotonic()`` by which the lease lapses unless a renewal succeeds (a bound
    taken when the last successful renewal was *sent*, so it is never later than the
    store's own expiry)."""
    due: float = 0.0
    """``time.monotonic()`` of the next renewal."""
    lapsed: bool = False
    """The lease could not be renewed before it lapsed, or the store says it is gone.
    The keeper stops renewing it; whatever the holder does afterwards no longer holds it."""
    lapse_reason: str = ""
    """Why it lapsed (for logs and for the holder)."""
    dropped: bool = False
    """The holder handed it back (:meth:`Keeper.drop`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for a keeper's own bookkeeping."""

    @classmethod
    def start(
        cls,
        subject: Any,
        name: str,
        lease_s: float,
        *,
        every_s: float | None = None,
        on_lapse: LapseHook | None = None,
    ) -> Held:
        """A lease taken now (it lives ``lease_s`` from now), first renewed in ``every_s``."""
        now = time.monotonic()
        interval = every_s if every_s is not None else lease_s / 3
        return cls(
            subject,
            name,
            lease_s,
            interval,
            on_lapse,
            expires_at=now + lease_s,
            due=now + interval,
        )

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self.expires_at = max(self.expires_at, sent_at + self.lease_s)

    def overdue(self, now: float) -> bool:
        """No renewal succeeded in time: the lease has lapsed in the store by now."""
        return now >= self.expires_at


def lapse(held: Held, reason: str) -> bool:
    """Mark ``held`` lapsed (once), log it and call its hook; ``False`` if nothing changed.

    A lease its holder already dropped does not lapse: the holder is done with it.
    """
    if held.lapsed or held.dropped:
        return False
    held.lapsed, held.lapse_reason = True, reason
    logger.warning("lease %s lapsed before its holder ended: %s", held.name, reason)
    if held.on_lapse is not None:
        try:
            held.on_lapse(held)
        except Exception:
            logger.exception("the lapse hook of %s failed", held.name)
    return True


class Keeper(ABC):
    """Renews leases for their holders until they drop them (see the module docstring)."""

    @abstractmethod
    def keep(
        self,
        subject: Renewable,
        *,
        every_s: float | None = None,
        on_lapse: LapseHook | None = None,
    ) -> Held:
        """Renew ``subject`` every ``every_s`` (a third of its lease by default) until dropped.

        The lease is taken to start now. Never waits on the network.
        """

    @abstractmethod
    def drop(self, held: Held) -> None:
        """Stop renewing ``held``; never waits on the network."""


class LoopKeeper(Keeper):
    """One task on the running event loop renews every reservation kept through it.

    The task starts with the first lease kept and ends by itself once none is left, so
    nothing runs while nothing is held; :meth:`aclose` stops it within ``timeout_s``.
    Renewals due together run concurrently, each bounded by :func:`renewal_timeout`.
    Use one keeper per event loop (:class:`~fleet.perloop.PerLoop`).
    """

    def __init__(self) -> None:
        self._held: dict[int, Held] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    def __len__(self) -> int:
        return len(self._held)

    def keep(
        self,
        subject: Renewable,
        *,
        every_s: float | None = None,
        on_lapse: LapseHook | None = None,
    ) -> Held:
        """Renew ``subject`` from this loop's keeper task until :meth:`drop` (call on the loop)."""
        held = Held.start(
            subject, subject.lease_name, subject.lease_s, every_s=every_s, on_lapse=on_lapse
        )
        self._held[id(held)] = held
        self._stopping = False
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            # An empty context: the keeper belongs to no step (no span, no cancellation).
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="fleet-keeper", context=contextvars.Context()
            )
        else:
            self._wakeup()  # it may sleep past this lease's first renewal
        return held

    def drop(self, held: Held) -> None:
        """Stop renewing ``held``: a dictionary update, nothing awaited."""
        held.dropped = True
        self._held.pop(id(held), None)
        if not self._held:
            self._wakeup()  # the task ends instead of sleeping to the next renewal

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Stop the keeper task: flag, wake, wait up to ``timeout_s``, then cancel it."""
        self._stopping = True
        self._wakeup()
        task = self._task
        if task is not None:
            await stop_task(task, grace_s=timeout_s, timeout_s=timeout_s)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while self._held and not self._stopping:
            now = time.monotonic()
            due = [held for held in self._held.values() if held.due <= now]
            if due:
                await asyncio.gather(*(self._renew(held) for held in due))
                continue
            wake.clear()
            pause = min(held.due for held in self._held.values()) - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await wake.wait()

    async def _renew(self, held: Held) -> None:
        sent = time.monotonic()
        held.due = sent + held.every_s
        renewable: Renewable = held.subject
        if renewable.finished():
            self._held.pop(id(held), None)
            return
        try:
            async with asyncio.timeout(renewal_timeout(held.lease_s)):
                alive = await renewable.renew()
        except Exception as error:  # unreachable, too slow, or anything else: try again
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if held.overdue(time.monotonic()):
                if lapse(held, f"not renewed within its {held.lease_s:g} s lease ({why})"):
                    self._held.pop(id(held), None)
            else:
                logger.info("could not renew %s (will retry): %s", held.name, why)
            return
        if alive:
            held.renewed(sent)
        elif renewable.finished():
            self._held.pop(id(held), None)
        elif lapse(held, "the store no longer holds it (settled elsewhere, or expired)"):
            self._held.pop(id(held), None)


async def stop_task(
    task: asyncio.Task[Any], *, grace_s: float = 0.0, timeout_s: float = 1.0
) -> bool:
    """Stop ``task`` in bounded time: ``grace_s`` to end by itself, then a cancel and ``timeout_s``.

    Returns whether it ended. Never waits longer than ``grace_s + timeout_s``: a task
    whose cancellation was swallowed (redis-py's asyncio client can do that while a
    command is in flight) is left to notice its owner's stop flag on its own.
    """
    if grace_s > 0 and not task.done():
        await asyncio.wait({task}, timeout=grace_s)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=timeout_s)
    if not task.done():
        logger.warning("%s did not stop within %.1f s of its cancel", task.get_name(), timeout_s)
        return False
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        logger.warning("%s ended with %s: %s", task.get_name(), type(error).__name__, error)
    return True
