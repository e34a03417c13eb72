"""Saturation is not an outage: how many calls an agent keeps in flight to its server.

A server that is busy queues requests. Sending more only makes every one of them wait
longer, until they time out and their retries join the back of the same queue. So each
agent keeps at most a *limit* of calls in flight and adapts it the way TCP adapts its
window (additive increase, multiplicative decrease):

- without ``max_concurrent`` it starts at one call and doubles per round of successes
  (slow start) until the first sign of congestion, or until a call waited more than a
  quarter of its timeout (the server has begun to queue: doubling again would push the
  queue past the timeout before the news came back), then grows by one call per round;
  with ``max_concurrent`` (the width the operator says the server takes) it starts there;
- a timeout, a 429/503, or a call that took more than half its timeout or whose latency
  per token climbs well above the best seen halves the limit (once per round: calls that
  were already in flight when it was halved do not halve it again);
- ``max_concurrent`` caps it.

Calls over the limit wait here, in fleet, not in the server's queue; a timed-out call's
retry waits for a free slot like any other call.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "Gate", "Ticket"]

DEFAULT_CEILING = 256
"""The most calls in flight per agent and process when ``max_concurrent`` is not set.

As wide as the widest worker the docs size (``-c 256``): slow start, not this cap, is
what protects a server that takes few calls at once."""
CLIMB = 2.0
"""A call is congested when it took this many times the best latency per token ..."""
CLIMB_SLACK_S = 0.5
"""... and at least this many seconds more (small calls jitter)."""
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

    def __post_init__(self) -> None:
        self.limit = min(self.limit, float(self.ceiling))

    @property
    def slots(self) -> int:
        """Calls allowed in flight now."""
        return max(int(self.limit), 1)

    def congested(self, latency_s: float, tokens: int, timeout_s: float | None = None) -> bool:
        """Whether a successful call's latency says the server is queueing.

        It is when the call took more than half its timeout (one more call queued ahead
        of the next would make it time out), or twice the best latency per token seen.
        """
        if timeout_s is not None and latency_s > timeout_s / 2:
            return True
        per_token = latency_s / max(tokens, 1)
        best = self.best_s_per_token
        if best is None or per_token < best:
            self.best_s_per_token = per_token
            return False
        expected = best * max(tokens, 1)
        return latency_s > CLIMB * expected and latency_s - expected > CLIMB_SLACK_S

    def on_success(
        self, started_epoch: int, latency_s: float, tokens: int, timeout_s: float | None = None
    ) -> None:
        """A call succeeded: grow, unless its latency shows congestion."""
        typical = self.typical_s
        self.typical_s = latency_s if typical is None else 0.8 * typical + 0.2 * latency_s
        if self.congested(latency_s, tokens, timeout_s):
            self.on_congestion(started_epoch)
            return
        if timeout_s is not None and latency_s > QUEUEING * timeout_s:
            # Its news arrives one call late: by then slow start has admitted that many
            # calls more. Grow by a call per round from here, and halve at half a timeout.
            self.slow_start = False
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(self.limit + step, float(self.ceiling))

    def on_congestion(self, started_epoch: int) -> None:
        """A call timed out or was turned away as overloaded: halve, once per round."""
        if started_epoch != self.epoch:
            return
        self.limit = max(self.limit / 2, 1.0)
        self.slow_start = False
        self.epoch += 1


@dataclass(frozen=True)
class Ticket:
    """A held slot: the epoch its call started in."""

    epoch: int


class Gate:
    """Slots for calls in flight, shared by every event loop and thread of a process.

    Args:
        ceiling: ``max_concurrent``, the most slots ever.
    """

    def __init__(self, ceiling: int | None) -> None:
        # An explicit max_concurrent says what the server takes: start there (a worker
        # asked for 256 calls in flight gets them at once) and only back off on
        # congestion. Without one, start at one call and find the width (slow start).
        if ceiling is None:
            self.policy = AdaptiveLimit(DEFAULT_CEILING)
        else:
            self.policy = AdaptiveLimit(ceiling, limit=float(ceiling), slow_start=False)
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

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
            self.policy.on_success(ticket.epoch, latency_s, tokens, timeout_s)
            self._give_back()

    async def release_congested(self, ticket: Ticket, *, hold_s: float) -> None:
        """Give back the slot of a call that timed out or was turned away as overloaded.

        The limit drops at once; the slot itself stays taken for about one typical call
        (at most ``hold_s``), because the server may still be working on the abandoned
        request: its retry, or anyone else's call, is sent only once that slot is free.
        """
        with self._lock:
            self.policy.on_congestion(ticket.epoch)
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
