"""Admission of one model call under a provider limit: wait for room, then count it.

:func:`admit` asks the limiter until the call fits (or the step's deadline makes it
pointless), then returns an :class:`Admission` the agent settles with the real usage
after the call. Waiting holds nothing: a waiting call is not in the window, and the
step keeps only the budget reservation it already had. A Redis outage while asking
is waited out the same way, within the deadline; a call is never made unadmitted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AgentError, BrokerError
from .base import AdmitStatus, LimitState, ProviderLimit, RateLimiter

__all__ = [
    "MAX_WAIT_POLL_S",
    "NOTICEABLE_WAIT_S",
    "Admission",
    "admit",
    "describe",
    "outage_backoff",
]

logger = logging.getLogger("fleet.limits")

NOTICEABLE_WAIT_S = 0.1
"""A call that waited at least this long is reported (``rate_limited`` event, log line)."""

MAX_WAIT_POLL_S = 1.0
"""A waiting call asks again at least this often, so it notices a reset limit or an
ended pause without sleeping out a wait computed from the old window."""

_MAX_OUTAGE_BACKOFF_S = 1.0
_DEADLINE_MARGIN_S = 0.05
"""The last look happens this long before the deadline, so the step fails with this
module's message (which limit, its use) rather than the step runner's bare timeout."""


def outage_backoff(attempt: int) -> float:
    """Seconds to wait before asking an unreachable limiter again (attempt 1, 2, ...)."""
    return min(0.05 * 2.0 ** max(attempt - 1, 0), _MAX_OUTAGE_BACKOFF_S)


def describe(limit: ProviderLimit, state: LimitState) -> str:
    """One line of a limit's use, for logs and messages."""
    requests = "" if limit.requests is None else f"/{limit.requests}"
    tokens = "" if limit.tokens is None else f"/{limit.tokens}"
    text = (
        f"{state.requests}{requests} requests, {state.tokens}{tokens} tokens "
        f"in the last {limit.window_s:g} s"
    )
    if limit.max_concurrent is not None:
        text += f", {state.in_flight}/{limit.max_concurrent} in flight"
    if state.paused_s > 0:
        text += f", provider pause {state.paused_s:.1f} s left"
    return text


@dataclass
class Admission:
    """One admitted call; settle it with the call's real usage."""

    limiter: RateLimiter | None
    """Where it was admitted (``None``: the agent has no limit, nothing to settle)."""
    limit: ProviderLimit | None
    """The limit it counts against."""
    admission_id: str = ""
    """Its id in the window."""
    tokens: int = 0
    """The tokens it was admitted with (the estimate)."""
    waited_s: float = 0.0
    """How long it waited for room."""
    admitted_at: float = 0.0
    """``time.monotonic()`` when it was admitted."""
    settled: bool = False

    async def settle(self, used_tokens: int | None, *, sent_at: float | None = None) -> None:
        """Count ``used_tokens`` instead of the estimate (``None``: keep the estimate).

        Ends the call's in-flight lease either way. Never raises: if the limiter is
        unreachable the window keeps the estimate and the lease lapses on its own.

        Args:
            used_tokens: what the call really spent.
            sent_at: ``time.monotonic()`` when its request was written; the call then
                counts from there (the provider counts it on arrival, not when we
                admitted it: a busy event loop or a new connection can lie between).
        """
        if self.limiter is None or self.limit is None or self.settled:
            return
        self.settled = True
        used = self.tokens if used_tokens is None else used_tokens
        late = 0.0 if sent_at is None else max(sent_at - self.admitted_at, 0.0)
        try:
            await self.limiter.reconcile(self.limit, self.admission_id, used, sent_after_s=late)
        except BrokerError as error:
            logger.warning(
                "limit %r: could not count a call's real usage (%s); the window keeps "
                "its estimate of %d tokens",
                self.limit.name,
                error,
                self.tokens,
            )


async def admit(
    limiter: RateLimiter,
    limit: ProviderLimit,
    tokens: int,
    *,
    deadline: float | None,
    lease_s: float,
    label: str,
    on_wait: Callable[[float], None] | None = None,
) -> Admission:
    """Wait until one call of ``tokens`` fits under ``limit``, and count it.

    A waiting call asks again when room should open, and at least every
    :data:`MAX_WAIT_POLL_S`, until the step's deadline; a reset limit or an ended pause
    is noticed within that time.

    Args:
        limiter: where the limit's window lives.
        limit: the limit.
        tokens: the call's estimate (prompt estimate + its ``max_tokens``).
        deadline: ``time.monotonic()`` past which the step times out (``None``: none).
        lease_s: how long the call may stay in flight before its slot lapses.
        label: names the step in log lines and messages.
        on_wait: called with the seconds waited when the call waited noticeably.

    Raises:
        AgentError: ``timeout`` when the call cannot fit (or the limiter stays
            unreachable) before the deadline; ``unavailable`` when, without a deadline,
            the limiter stays unreachable for longer than the outage tolerance;
            ``rate_limit`` when the call alone needs more tokens than a whole window.
    """
    admission_id = uuid.uuid4().hex
    started = time.monotonic()
    outages = 0
    while True:
        try:
            result = await limiter.try_admit(limit, admission_id, tokens, lease_s=lease_s)
        except BrokerError as error:
            outages += 1
            delay = outage_backoff(outages)
            reason = f"the rate limiter is unreachable ({error})"
            if outages == 1:
                logger.warning("%s: %s; waiting to be admitted", label, reason)
            from ..redis.clients import OUTAGE_TOLERANCE_S  # here: `import fleet` loads no redis

            if deadline is None and time.monotonic() - started > OUTAGE_TOLERANCE_S:
                raise AgentError(
                    f"{label}: not admitted under limit {limit.name!r}: {reason} for over "
                    f"{OUTAGE_TOLERANCE_S:g} s",
                    kind="unavailable",
                ) from None
        else:
            outages = 0
            if result.status is AdmitStatus.ADMITTED:
                return _admitted(
                    limiter, limit, admission_id, tokens, started, label, on_wait, result.state
                )
            if result.status is AdmitStatus.TOO_LARGE:
                raise AgentError(
                    f"{label}: one call needs about {tokens} tokens but limit {limit.name!r} "
                    f"allows {limit.tokens} per {limit.window_s:g} s; lower the agent's "
                    "max_tokens or the prompt, or raise the limit",
                    kind="rate_limit",
                )
            delay = result.wait_s + random.uniform(0, min(0.02, result.wait_s / 10))
            reason = describe(limit, result.state)
        now = time.monotonic()
        delay = min(delay, MAX_WAIT_POLL_S)
        if deadline is not None and now + delay >= deadline - _DEADLINE_MARGIN_S:
            if deadline - now <= _DEADLINE_MARGIN_S:
                raise AgentError(
                    f"{label}: timed out after waiting {now - started:.2f} s for room under "
                    f"limit {limit.name!r} ({reason}); raise the step's timeout_s or the limit",
                    kind="timeout",
                )
            delay = deadline - now - _DEADLINE_MARGIN_S  # one last look just before it
        await asyncio.sleep(delay)


def _admitted(
    limiter: RateLimiter,
    limit: ProviderLimit,
    admission_id: str,
    tokens: int,
    started: float,
    label: str,
    on_wait: Callable[[float], None] | None,
    state: LimitState,
) -> Admission:
    waited = time.monotonic() - started
    if waited >= NOTICEABLE_WAIT_S:
        logger.info(
            "%s: admitted under limit %r after waiting %.2f s (%s)",
            label,
            limit.name,
            waited,
            describe(limit, state),
        )
        if on_wait is not None:
            on_wait(waited)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: admitted under limit %r (%s)", label, limit.name, describe(limit, state))
    return Admission(limiter, limit, admission_id, tokens, waited, time.monotonic())
