"""A track (a round or a pipeline) and the flights it puts out: what the dispatcher serves.

A :class:`Flight` holds one ``max_in_flight`` slot (a step, or one item's chain); a
:class:`Track` sends its flights, receives their notices on its own task (never the
collector's) and acts on a cancel through its :class:`CancelState`. The dispatcher
(:mod:`fleet.celery.dispatch`) routes notices to tracks and hands back lost flights.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cancel.signal import current_cancellation
from ..deltas import current_deltas
from ..limiters import ProviderLimit
from .protocol import Finished, Limited, Started, Stopped

if TYPE_CHECKING:
    from ..events import EventSink
    from .executor import CeleryExecutor

__all__ = ["CANCEL_GRACE_S", "Broken", "CancelState", "Flight", "Lost", "Notice", "Track"]


@dataclass(eq=False, kw_only=True)
class Flight:
    """What holds one ``max_in_flight`` slot: a step, or one item's chain."""

    tid: str = ""
    """The task id of the message out (a step's, or the chain's due link)."""
    nonce: str = ""
    """Its record is ``result(tid, nonce)``."""
    journaled: bool = False
    """A done-marker in its step record may answer for it (a journaled step)."""
    record: str = ""
    """Its step record (:meth:`~fleet.redis.keys.Keys.steps`), for a journaled step."""
    routes: tuple[str, ...] = ()
    """Other task ids whose notices belong to it (the later links of a chain): a link's
    notice may arrive before its track has heard that the previous link finished."""
    sent_at: float = 0.0
    started: bool = False
    holds_slot: bool = False
    owner: Track | None = None
    limit: ProviderLimit | None = None
    """The provider limit of the step's agent (paces sending; ``None``: none)."""


@dataclass(frozen=True)
class Lost:
    """The collector found no lease and no record for ``flight``: send it again."""

    flight: Flight


@dataclass(frozen=True)
class Broken:
    """The collector failed (Redis gone past the outage tolerance): the track fails too."""

    error: BaseException


Notice = Started | Finished | Stopped | Limited
_Item = tuple[Flight, Notice] | Lost | Broken | None


CANCEL_GRACE_S = 10.0
"""How long a cancelled track waits for the workers of its running steps to report."""


class CancelState:
    """Where a track is in a cancel: requested (by the workflow's cancellation), begun, over."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.started = False
        self.deadline = float("inf")

    def request(self, reason: str, dispatch: asyncio.Task[None], wake: Callable[[], None]) -> None:
        """Stop sending now; the track's next :meth:`Track.tick` does the rest."""
        if self.reason is None:
            self.reason = reason
            dispatch.cancel()
            wake()

    def due(self) -> bool:
        """Requested and not acted on yet."""
        return self.reason is not None and not self.started

    def begin(self) -> str:
        """Act on it now; returns the reason."""
        self.started = True
        self.deadline = time.monotonic() + CANCEL_GRACE_S
        self.reason = self.reason or "cancelled"
        return self.reason

    def expired(self) -> bool:
        """The running steps had their grace time to report."""
        return time.monotonic() > self.deadline


class Track(ABC):
    """A round or a pipeline: flights the dispatcher serves, notices it receives."""

    def __init__(self, executor: CeleryExecutor, events: EventSink | None) -> None:
        self.x = executor
        self.keys = executor.keys
        self.events = events
        self.dispatcher = executor._dispatcher()
        self.inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self.open = 0
        """Flights of this track not finished yet; :meth:`receive` returns at zero."""
        self.cancellation = current_cancellation()
        """The workflow's cancellation this track runs under (from its caller's context)."""
        channel = current_deltas()
        self.deltas_route = None if channel is None else channel.route
        """The stream the workers write its steps' output deltas to (``None``: none)."""
        self.cancel = CancelState()
        """Where the track is in a cancel (see :meth:`cancellable`)."""

    @abstractmethod
    async def dispatch(self) -> None:
        """Send this track's flights (see :meth:`Dispatcher.batches`)."""

    @abstractmethod
    async def handle(self, flight: Flight, notice: Notice) -> None:
        """Act on one notice about one of this track's flights."""

    @abstractmethod
    async def resend(self, flights: list[Flight]) -> None:
        """Send these flights again (their message or their worker was lost)."""

    async def tick(self) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Called about every check interval while the track waits (default: nothing)."""

    def closed(self) -> None:
        """Wake :meth:`receive` (call when :attr:`open` drops to zero off a notice)."""
        self.inbox.put_nowait(None)

    async def drive(self, flights: Sequence[Flight]) -> None:
        """Dispatch and receive at once until every flight is finished; then free their slots.

        The workflow's cancel stops the dispatch; the track's ``cancel`` (a
        :class:`CancelState`) is then due, for its :meth:`tick`.
        """
        cancellation = self.cancellation
        forget = None
        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(self.dispatch())
                tasks.create_task(self.receive())
                if cancellation is not None:
                    forget = cancellation.add_callback(
                        lambda reason: self.cancel.request(reason, sender, self.closed)
                    )
        finally:
            if forget is not None:
                forget()
            for flight in flights:
                self.dispatcher.release(flight)

    async def receive(self) -> None:
        """Handle this track's notices until every flight is finished."""
        interval = self.dispatcher.check_interval_s
        while self.open:
            items: list[_Item] = []
            try:
                async with asyncio.timeout(interval):
                    items.append(await self.inbox.get())
            except TimeoutError:
                pass
            while not self.inbox.empty():
                items.append(self.inbox.get_nowait())
            lost: list[Flight] = []
            for item in items:
                if isinstance(item, Broken):
                    raise item.error
                if isinstance(item, Lost):
                    if item.flight.owner is self:
                        lost.append(item.flight)
                elif item is not None:
                    await self.handle(*item)
            if lost:
                await self.resend(lost)
            await self.tick()
