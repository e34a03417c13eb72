"""The in-process limiter of the local host: the same windows, kept in this process."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import WIDTH_TTL_S, AdmitResult, AdmitStatus, LimitState, ProviderLimit, RateLimiter

__all__ = ["MemoryRateLimiter"]


@dataclass
class _Window:
    calls: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)
    """Admission id → (admitted at, tokens counted), oldest first."""
    tokens: int = 0
    flight: dict[str, float] = field(default_factory=dict)
    """Admission id → lease expiry."""
    paused_until: float = 0.0


class MemoryRateLimiter(RateLimiter):
    """Provider limits for one process (the embedded default); not shared across processes.

    Every method runs without awaiting, so on one event loop each is atomic; the local
    host runs all its steps on one loop.

    Args:
        clock: the time source (seconds); ``time.monotonic`` unless a test passes its own.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._widths: dict[str, tuple[int, float]] = {}

    def __repr__(self) -> str:
        return f"MemoryRateLimiter(limits={sorted(self._windows)!r})"

    def _window(self, limit: ProviderLimit, now: float) -> _Window:
        window = self._windows.setdefault(limit.name, _Window())
        horizon = now - limit.counted_window_s
        while window.calls:
            oldest, (at, tokens) = next(iter(window.calls.items()))
            if at > horizon:
                break
            del window.calls[oldest]
            window.tokens -= tokens
        for key in [k for k, until in window.flight.items() if until <= now]:
            del window.flight[key]
        return window

    def _state(self, window: _Window, now: float) -> LimitState:
        return LimitState(
            len(window.calls), window.tokens, len(window.flight), max(window.paused_until - now, 0)
        )

    async def try_admit(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, lease_s: float
    ) -> AdmitResult:
        """Admit now or say how long to wait; see :meth:`RateLimiter.try_admit`."""
        now = self._clock()
        window = self._window(limit, now)
        if limit.tokens is not None and tokens > limit.tokens:
            return AdmitResult(AdmitStatus.TOO_LARGE, 0.0, self._state(window, now))
        wait = max(window.paused_until - now, 0.0)
        entries = list(window.calls.values())
        span = limit.counted_window_s
        if limit.requests is not None and len(entries) >= limit.requests:
            wait = max(wait, entries[len(entries) - limit.requests][0] + span - now)
        excess = 0 if limit.tokens is None else window.tokens + tokens - limit.tokens
        if excess > 0:
            until = now + span  # counts drifted: wait a whole window rather than overrun
            for at, counted in entries:
                excess -= counted
                if excess <= 0:
                    until = at + span
                    break
            wait = max(wait, until - now)
        if limit.max_concurrent is not None and len(window.flight) >= limit.max_concurrent:
            wait = max(wait, min(min(window.flight.values()) - now, 0.05))
        if wait > 0:
            return AdmitResult(AdmitStatus.WAIT, wait, self._state(window, now))
        window.calls[admission_id] = (now, tokens)
        window.tokens += tokens
        if limit.max_concurrent is not None:
            window.flight[admission_id] = now + lease_s
        return AdmitResult(AdmitStatus.ADMITTED, 0.0, self._state(window, now))

    async def reconcile(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, sent_after_s: float = 0.0
    ) -> None:
        """Count the real usage; see :meth:`RateLimiter.reconcile`."""
        window = self._window(limit, self._clock())
        window.flight.pop(admission_id, None)
        entry = window.calls.get(admission_id)
        if entry is not None:
            window.tokens += tokens - entry[1]
            if sent_after_s > 0:  # keep the order oldest first
                del window.calls[admission_id]
                at = entry[0] + sent_after_s
                later = [(k, v) for k, v in window.calls.items() if v[0] > at]
                for key, _ in later:
                    del window.calls[key]
                window.calls[admission_id] = (at, tokens)
                window.calls.update(later)
            else:
                window.calls[admission_id] = (entry[0], tokens)

    async def pause(self, limit: ProviderLimit, seconds: float) -> float:
        """Pause admissions; see :meth:`RateLimiter.pause`."""
        now = self._clock()
        window = self._window(limit, now)
        window.paused_until = max(window.paused_until, now + max(seconds, 0.0))
        return window.paused_until - now

    async def state(self, limit: ProviderLimit) -> LimitState:
        """The limit's use now; see :meth:`RateLimiter.state`."""
        now = self._clock()
        return self._state(self._window(limit, now), now)

    async def recall_width(self, endpoint: str) -> int | None:
        """The endpoint's remembered width; see :meth:`RateLimiter.recall_width`."""
        width, until = self._widths.get(endpoint, (0, 0.0))
        return width if until > self._clock() else None

    async def remember_width(self, endpoint: str, width: int) -> None:
        """Keep the endpoint's width; see :meth:`RateLimiter.remember_width`."""
        self._widths[endpoint] = (width, self._clock() + WIDTH_TTL_S)

    async def reset(self, limit: ProviderLimit) -> None:
        """Forget the limit's use; see :meth:`RateLimiter.reset`."""
        self._windows.pop(limit.name, None)
