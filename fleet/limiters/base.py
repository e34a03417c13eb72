"""Provider limits: what a limit is, and the contract of the stores that enforce one.

A provider limit (one ``[limits.NAME]`` table of the agents file) caps the model calls
of every agent that names it, across the whole fleet: at most ``requests`` calls and/or
``tokens`` tokens (prompt + completion) in any sliding window of ``window_s`` seconds
(either is enough, at least one is required), and optionally at most ``max_concurrent``
calls in flight.

A :class:`RateLimiter` keeps the windows (in memory for the local host, in Redis for a
fleet). Rules every limiter follows (``tests/test_limiters.py`` runs one contract suite
against both):

* ``try_admit`` is atomic: it admits one request of ``tokens`` when the window (and the
  in-flight count) has room and no provider pause is on, and otherwise admits nothing
  and answers how long to wait before asking again;
* an admission stays in the window for ``window_s`` (plus :data:`WINDOW_GUARD_S`, so
  network jitter between us and the provider cannot squeeze one more call into the
  provider's own window); ``reconcile`` replaces its tokens with what the call really
  spent, moves its time to when its request actually left, and ends its in-flight lease;
* an in-flight lease lapses on its own after ``lease_s``, so a crashed worker cannot
  keep a ``max_concurrent`` slot;
* ``pause`` stops every admission of the limit until the provider's reset.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError

__all__ = [
    "WIDTH_TTL_S",
    "WINDOW_GUARD_S",
    "AdmitResult",
    "AdmitStatus",
    "LimitState",
    "ProviderLimit",
    "RateLimiter",
    "parse_limits",
]

WINDOW_GUARD_S = 0.25
"""Added to every window: an admission counts this much longer than ``window_s``.

A call reaches the provider a little after we admit it, and not every call equally
late (a busy event loop, a new connection, the provider's own ingress); without a guard,
two calls admitted just over ``window_s`` apart can land inside one window at the
provider. At most 10 % of the window, for sub-second windows."""


WIDTH_TTL_S = 3600.0
"""How long a learned endpoint width is remembered after it was last written: a server
that was narrow an hour ago (or was replaced) is tried wide again."""


def window_guard_s(window_s: float) -> float:
    """The guard added to a window of ``window_s`` (see :data:`WINDOW_GUARD_S`)."""
    return min(WINDOW_GUARD_S, window_s * 0.1)


@dataclass(frozen=True, slots=True)
class ProviderLimit:
    """One provider account's or deployment's limits (a ``[limits.NAME]`` table)."""

    name: str
    """The table's name; agents refer to it with ``limit = "NAME"``."""
    requests: int | None
    """At most this many calls in any window (``None``: calls are not counted against a cap)."""
    tokens: int | None
    """At most this many tokens (prompt + completion) in any window (``None``: no token cap)."""
    window_s: float = 60.0
    """The sliding window's length in seconds."""
    max_concurrent: int | None = None
    """At most this many calls in flight at once (``None``: no cap)."""

    @property
    def counted_window_s(self) -> float:
        """How long an admission counts: the window plus its guard."""
        return self.window_s + window_guard_s(self.window_s)


_FIELDS = ("requests", "tokens", "window_s", "max_concurrent")


def _positive(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) and value > 0
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def parse_limits(tables: Mapping[str, Any], *, source: str) -> dict[str, ProviderLimit]:
    """Read the ``[limits.NAME]`` tables of an agents file.

    Args:
        tables: the ``limits`` section (name → table).
        source: where it came from (the file path), for messages.

    Raises:
        ConfigError: a table is not a table, has neither ``requests`` nor ``tokens``,
            has an unknown key, or a value that is not a positive number (the message
            names the table and the key).
    """
    limits: dict[str, ProviderLimit] = {}
    for name, table in tables.items():
        where = f"{source}: [limits.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table", key=f"limits.{name}")
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where} has unknown key {unknown[0]!r}; expected "
                + ", ".join(repr(f) for f in _FIELDS),
                key=f"limits.{name}.{unknown[0]}",
            )
        if "requests" not in table and "tokens" not in table:
            raise ConfigError(
                f"{where} needs 'requests' or 'tokens' (or both): the most calls or tokens "
                "the provider allows in one window, e.g. requests = 500",
                key=f"limits.{name}",
            )
        for key in _FIELDS:
            if key in table and not _positive(table[key], integer=key != "window_s"):
                kind = "number of seconds" if key == "window_s" else "integer"
                raise ConfigError(
                    f"{where} {key} must be a positive {kind}, got {table[key]!r}",
                    key=f"limits.{name}.{key}",
                )
        limits[name] = ProviderLimit(
            name=name,
            requests=table.get("requests"),
            tokens=table.get("tokens"),
            window_s=float(table.get("window_s", 60.0)),
            max_concurrent=table.get("max_concurrent"),
        )
    return limits


class AdmitStatus(Enum):
    """What a limiter answered to ``try_admit``."""

    ADMITTED = 0
    """The call counts in the window now; make it."""
    WAIT = 1
    """No room now (window full, in-flight cap reached or provider pause); ask again later."""
    TOO_LARGE = 2
    """The call alone needs more tokens than the limit allows in a whole window."""


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit's use right now."""

    requests: int
    """Calls admitted in the current window."""
    tokens: int
    """Tokens counted in the current window (estimates, replaced by real usage after calls)."""
    in_flight: int
    """Calls admitted and not yet finished (live leases)."""
    paused_s: float
    """Seconds left of a provider pause (0: none)."""


@dataclass(frozen=True, slots=True)
class AdmitResult:
    """A limiter's answer to ``try_admit``, with the limit's use right after it."""

    status: AdmitStatus
    """See :class:`AdmitStatus`."""
    wait_s: float
    """With ``WAIT``: seconds until the call could fit (0 otherwise)."""
    state: LimitState
    """The limit's use after this answer."""


class RateLimiter(ABC):
    """Where provider limits' windows live; shared by every step of one host or fleet."""

    @abstractmethod
    async def try_admit(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, lease_s: float
    ) -> AdmitResult:
        """Admit one call of ``tokens`` now, or say how long to wait (atomic)."""

    @abstractmethod
    async def reconcile(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, sent_after_s: float = 0.0
    ) -> None:
        """Count ``tokens`` for an admitted call instead of its estimate; end its lease.

        ``sent_after_s`` is how long after its admission the call actually left (its
        request written): the call then counts from that moment, as the provider's
        window does, rather than from its admission.
        """

    @abstractmethod
    async def pause(self, limit: ProviderLimit, seconds: float) -> float:
        """Admit nothing under ``limit`` for ``seconds`` (a longer pause already on wins).

        Returns:
            Seconds left of the pause now in force.
        """

    @abstractmethod
    async def state(self, limit: ProviderLimit) -> LimitState:
        """The limit's use now."""

    @abstractmethod
    async def recall_width(self, endpoint: str) -> int | None:
        """The calls in flight ``endpoint`` was last seen to take (``None``: nothing known).

        An agent's adaptive concurrency starts there rather than wide
        (``fleet.agents.openai.concurrency``); what it learns is kept for
        :data:`WIDTH_TTL_S` after it was last written.
        """

    @abstractmethod
    async def remember_width(self, endpoint: str, width: int) -> None:
        """Keep ``width`` as what ``endpoint`` takes, for :data:`WIDTH_TTL_S`."""

    @abstractmethod
    async def reset(self, limit: ProviderLimit) -> None:
        """Forget the limit's window, in-flight calls and pause (``fleet limits reset``).

        Calls waiting for room ask again within :data:`~fleet.limiters.admission.
        MAX_WAIT_POLL_S` and are admitted against the empty window.
        """
