"""The host's side of provider limits: do not flood the broker with steps that can only wait.

A step whose agent's limit is saturated would be taken by a worker and then sit in its
admission wait, holding a worker slot that a step of another agent could use. The
Celery host's dispatcher asks :meth:`DispatchGate.turn` before sending each step and
calls :meth:`DispatchGate.finished` when its outcome is back: a step goes out while the
host's unfinished steps of that limit number fewer than the window's free requests plus
``ahead``, and otherwise waits, re-reading the limit's use every ``recheck_s``. It never
admits anything: admission stays with the worker, right before the model call, so
holding a step back here costs no window room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..errors import BrokerError
from .base import LimitState, ProviderLimit, RateLimiter

__all__ = ["DispatchGate", "sendable"]

logger = logging.getLogger("fleet.limits")

_UNBOUNDED = 1 << 30
"""Free requests of a limit that counts only tokens: as many as there are steps."""


def sendable(limit: ProviderLimit, state: LimitState, *, ahead: int) -> int:
    """How many more steps of ``limit`` a dispatcher may send now (pure policy).

    The window's free requests (unbounded for a limit of tokens only; none while the
    provider's pause lasts or the tokens are spent, nor beyond ``max_concurrent`` minus
    the calls in flight), plus ``ahead`` so workers always have the next steps at hand
    when room opens.
    """
    if state.paused_s > 0:
        return 0
    room = _UNBOUNDED if limit.requests is None else limit.requests - state.requests
    if limit.tokens is not None and state.tokens >= limit.tokens:
        room = 0
    if limit.max_concurrent is not None:
        room = min(room, limit.max_concurrent - state.in_flight)
    return max(room, 0) + ahead


@dataclass
class _Limit:
    outstanding: int = 0
    """Steps of this limit this host sent whose outcome is not back yet."""
    sendable: int = 0
    """What the last read of the limit's use allowed (see :func:`sendable`)."""
    read_at: float = float("-inf")


class DispatchGate:
    """Paces one host's sends per provider limit.

    Args:
        limiter: where the limits' windows live (the workers' limiter).
        ahead: steps sent beyond the window's free requests, so workers have the next
            steps at hand when room opens.
        recheck_s: how often a saturated limit's use is read again.
    """

    def __init__(self, limiter: RateLimiter, *, ahead: int = 8, recheck_s: float = 0.1) -> None:
        self.limiter = limiter
        self.ahead = ahead
        self.recheck_s = recheck_s
        self._limits: dict[str, _Limit] = {}

    async def turn(self, limit: ProviderLimit | None) -> float:
        """Wait until one more step of ``limit`` may be sent; returns the seconds held back.

        ``None`` (an agent without a limit) never waits. An unreachable limiter does
        not hold dispatch back: the worker's own admission still enforces the limit.
        """
        if limit is None:
            return 0.0
        entry = self._limits.setdefault(limit.name, _Limit())
        started = time.monotonic()
        while entry.outstanding >= entry.sendable or (
            time.monotonic() - entry.read_at >= self.recheck_s
        ):
            wait = entry.read_at + self.recheck_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                state = await self.limiter.state(limit)
            except BrokerError as error:
                logger.warning("limit %r: cannot read its use (%s); sending", limit.name, error)
                break
            entry.read_at = time.monotonic()
            entry.sendable = sendable(limit, state, ahead=self.ahead)
            if entry.outstanding < entry.sendable:
                break
        entry.outstanding += 1
        return time.monotonic() - started

    def ready(self, limit: ProviderLimit | None) -> bool:
        """Whether :meth:`turn` would return at once (without reading the limit's use)."""
        if limit is None:
            return True
        entry = self._limits.get(limit.name)
        return entry is not None and (
            entry.outstanding < entry.sendable and time.monotonic() - entry.read_at < self.recheck_s
        )

    def finished(self, limit: ProviderLimit | None) -> None:
        """A step of ``limit`` sent after :meth:`turn` has its outcome (or was given up)."""
        if limit is not None and limit.name in self._limits:
            entry = self._limits[limit.name]
            entry.outstanding = max(entry.outstanding - 1, 0)
