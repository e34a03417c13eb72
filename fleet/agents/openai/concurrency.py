"""Saturation is not an outage: how many calls an agent keeps in flight to its server.

A server that is busy queues requests. Sending more only makes every one of them wait
longer, until they time out and their retries join the back of the same queue. So each
agent keeps at most a *limit* of calls in flight and adapts it the way TCP adapts its
window (additive increase, multiplicative decrease):

- it starts wide: at the cap (``max_concurrent``, else :data:`DEFAULT_CEILING`, so what
  bounds the first calls is how many steps the worker runs at once, its ``-c``), or at
  the width this endpoint was last seen to take (remembered fleet-wide, see
  :meth:`Gate.recall`);
- a timeout, a 429/503, a call that took more than half its timeout, or latency per
  token that climbs well above the best seen halves it, from the calls actually in
  flight (once per round: calls that were already in flight when it was halved do not
  halve it again), and it then grows by one call per round. Latency is judged by the
  median of the last :data:`WINDOW` calls sent at the current width, never by one call:
  a server that queues slows every call, while one slow answer among quick ones is
  jitter (a busy machine, a long generation) and says nothing about the width;
- the cap bounds it.

Calls over the limit wait here, in fleet, not in the server's queue; a timed-out call's
retry waits for a free slot like any other call. A call already queued at a server that
keeps answering is not given up at its timeout (:meth:`Gate.patient`): its retry would
only join the back of the same queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["AdaptiveLimit", "Gate", "Ticket", "WidthMemory"]

logger = logging.getLogger("fleet.agents.openai")

DEFAULT_CEILING = 256
"""The most calls in flight per agent and process when ``max_concurrent`` is not set.

As wide as the widest worker the docs size (``-c 256``), and where an agent starts: a
server that takes fewer calls says so (timeouts, 429/503, latency that climbs), and the
limit falls to what it takes."""
RECALL_POLL_S = 0.005
"""How often a call checks whether the endpoint's remembered width has been read."""
REMEMBER_EVERY_S = 5.0
"""A grown limit is written to the endpoint's memory at most this often (a fall at once)."""
CLIMB = 2.0
"""A call is congested when it took this many times the best latency per token ..."""
CLIMB_SLACK_S = 0.5
"""... and at least this many seconds more (small calls jitter)."""
WINDOW = 5
"""How many calls sent at the current width the latency climb is judged over (their median)."""
QUEUEING = 0.25
"""Slow start ends when a call took more than this share of its timeout."""


@dataclass
class AdaptiveLimit:
    """The AIMD policy: a pure state machine over successes and congestion signals.

    Args:
        ceiling: the most calls in flight ever allowed.
    """

    ceiling: int
    limit: float = 1.0
    """Calls allowed in flight now (its integer part counts)."""
    slow_start: bool = True
    """Doubling per round until the first congestion."""
    epoch: int = 0
    """Bumped on every decrease; a call remembers the epoch it started in."""
    best_s_per_token: float | None = None
    """The lowest latency per token seen."""
    typical_s: float | None = None
    """A moving average of successful calls' latency."""
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    """Latency per token of the last calls sent at the current width (since the last fall)."""

    def __post_init__(self) -> None:
        self.limit = min(self.limit, float(self.ceiling))

    @property
    def slots(self) -> int:
        """Calls allowed in flight now."""
        return max(int(self.limit), 1)

    def congested(
        self, latency_s: float, tokens: int, timeout_s: float | None = None, *, current: bool = True
    ) -> bool:
        """Whether a successful call's latency says the server is queueing.

        It is when the call took more than half its timeout (one more call queued ahead
        of the next would make it time out), or when the median latency per token of the
        last :data:`WINDOW` calls sent at the current width (``current``) is twice the
        best seen, and at least :data:`CLIMB_SLACK_S` more for a call of this size.
        """
        if timeout_s is not None and latency_s > timeout_s / 2:
            return True
        size = max(tokens, 1)
        per_token = latency_s / size
        best = self.best_s_per_token
        if best is None or per_token < best:
            self.best_s_per_token = best = per_token
        if not current:  # sent before the last fall: its latency judged the old width
            return False
        self.recent.append(per_token)
        if len(self.recent) < WINDOW:
            return False
        median = sorted(self.recent)[WINDOW // 2]
        return median > CLIMB * best and (median - best) * size > CLIMB_SLACK_S

    def on_success(
        self,
        started_epoch: int,
        latency_s: float,
        tokens: int,
        timeout_s: float | None = None,
        in_flight: int | None = None,
    ) -> None:
        """A call succeeded: grow, unless its latency shows congestion (then halve)."""
        typical = self.typical_s
        self.typical_s = latency_s if typical is None else 0.8 * typical + 0.2 * latency_s
        if self.congested(latency_s, tokens, timeout_s, current=started_epoch == self.epoch):
            self.on_congestion(started_epoch, in_flight)
            return
        if timeout_s is not None and latency_s > QUEUEING * timeout_s:
            # Its news arrives one call late: by then slow start has admitted that many
            # calls more. Grow by a call per round from here, and halve at half a timeout.
            self.slow_start = False
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(self.limit + step, float(self.ceiling))

    def on_congestion(self, started_epoch: int, in_flight: int | None = None) -> None:
        """A call timed out or was turned away as overloaded: halve, once per round.

        ``in_flight`` (the calls in flight, this one included) is what is halved when it
        is below the limit: a limit far above what was ever sent says nothing.
        """
        if started_epoch != self.epoch:
            return
        base = self.limit if in_flight is None else min(self.limit, float(max(in_flight, 1)))
        self.limit = max(base / 2, 1.0)
        self.slow_start = False
        self.epoch += 1
        self.recent.clear()


@dataclass(frozen=True)
class Ticket:
    """A held slot: the epoch its call started in."""

    epoch: int


class WidthMemory(Protocol):
    """Where the width an endpoint takes is remembered (a limiter is one)."""

    async def recall_width(self, endpoint: str) -> int | None:
        """The width last remembered for ``endpoint`` (``None``: nothing known)."""

    async def remember_width(self, endpoint: str, width: int) -> None:
        """Remember ``width`` for ``endpoint`` (for a while)."""


class Gate:
    """Slots for calls in flight, shared by every event loop and thread of a process.

    Args:
        ceiling: ``max_concurrent``, the most slots ever (``None``: :data:`DEFAULT_CEILING`).
        endpoint: what the width is remembered under (the server and model).
    """

    def __init__(self, ceiling: int | None, *, endpoint: str = "") -> None:
        # Start wide: the operator's cap, else as wide as the process runs steps. A
        # server that takes fewer says so within a round, and the limit falls.
        top = DEFAULT_CEILING if ceiling is None else ceiling
        self.policy = AdaptiveLimit(top, limit=float(top), slow_start=False)
        self.endpoint = endpoint
        self.in_flight = 0
        self.peak = 0
        self.last_answer_at = float("-inf")
        """``time.monotonic()`` of the last call the server answered."""
        self._recalled: bool | None = False
        """Whether the endpoint's width was read (``None``: being read)."""
        self._remembered: tuple[int, float] = (top, float("-inf"))
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def recall(self, memory: WidthMemory | None) -> None:
        """Start from the width this endpoint was last seen to take (once per process).

        Calls that arrive while it is being read wait for it (they would otherwise all
        go out wide). Advisory: an unreachable memory leaves the limit where it is.
        """
        if self._recalled is True or memory is None:
            return
        if self._recalled is not False:  # another call is reading it
            # Polled: the gate serves several event loops, an asyncio.Event only one.
            while self._recalled is not True:  # noqa: ASYNC110
                await asyncio.sleep(RECALL_POLL_S)
            return
        self._recalled = None
        try:
            width = await memory.recall_width(self.endpoint)
            if width is not None:
                with self._lock:
                    self.policy.limit = float(min(max(width, 1), self.policy.ceiling))
                    self._remembered = (width, time.monotonic())
                    self._wake()
        except Exception as error:  # the memory is advisory; the calls go on
            logger.debug("endpoint width not read (%s)", error)
        finally:
            self._recalled = True

    async def remember(self, memory: WidthMemory | None) -> None:
        """Write the limit to the endpoint's memory when it fell, or grew a while ago."""
        if memory is None:
            return
        slots, now = self.policy.slots, time.monotonic()
        width, at = self._remembered
        if slots == width or (slots > width and now - at < REMEMBER_EVERY_S):
            return
        self._remembered = (slots, now)
        try:
            await memory.remember_width(self.endpoint, slots)
        except Exception as error:  # the memory is advisory; the calls go on
            logger.debug("endpoint width not written (%s)", error)

    def patient(self, sent_at: float, waited_s: float, timeout_s: float) -> bool:
        """Whether a call sent at ``sent_at`` and unanswered for ``waited_s`` may wait on.

        It may while the server keeps answering (another call was answered within the
        last ``timeout_s``, after this one was sent): the call is queued, not lost, and a
        retry would only join the back of that queue. At most ``timeout_s`` times the
        most calls ever in flight (all of them served one after another), so a call that
        is truly lost is still given up.
        """
        now = time.monotonic()
        answering = self.last_answer_at > max(sent_at, now - timeout_s)
        return answering and waited_s < timeout_s * max(self.peak, 1)

    async def acquire(self) -> Ticket:
        """Wait for a slot (first come, first served)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self.in_flight < self.policy.slots:
                return self._take()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except BaseException:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                elif waiter.done() and not waiter.cancelled():
                    self._give_back()  # granted, but we will not use it
            raise
        return Ticket(self.policy.epoch)

    def release(
        self, ticket: Ticket, *, latency_s: float, tokens: int = 0, timeout_s: float | None = None
    ) -> None:
        """Give a slot back after a success that took ``latency_s`` (of ``timeout_s``)."""
        with self._lock:
            self.last_answer_at = time.monotonic()
            self.policy.on_success(ticket.epoch, latency_s, tokens, timeout_s, self.in_flight)
            self._give_back()

    async def release_congested(self, ticket: Ticket, *, hold_s: float) -> None:
        """Give back the slot of a call that timed out or was turned away as overloaded.

        The limit drops at once; the slot itself stays taken for about one typical call
        (at most ``hold_s``), because the server may still be working on the abandoned
        request: its retry, or anyone else's call, is sent only once that slot is free.
        """
        with self._lock:
            self.policy.on_congestion(ticket.epoch, self.in_flight)
            typical = self.policy.typical_s
        try:
            if hold_s > 0:
                await asyncio.sleep(min(typical if typical is not None else hold_s, hold_s))
        finally:
            self.forget()

    def forget(self) -> None:
        """Give a slot back without a signal (the call failed for another reason)."""
        with self._lock:
            self._give_back()

    def _take(self) -> Ticket:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return Ticket(self.policy.epoch)

    def _give_back(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.policy.slots:
            loop, waiter = self._waiters.popleft()
            self._take()
            try:
                loop.call_soon_threadsafe(self._grant, waiter)
            except RuntimeError:  # that loop is closed: its waiter is gone
                self.in_flight -= 1

    def _grant(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            with self._lock:
                self._give_back()
        else:
            waiter.set_result(None)
