"""How long to wait before retrying a model call: pure functions a test can call."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping

__all__ = ["MAX_BACKOFF_S", "MAX_RETRY_AFTER_S", "backoff", "reset_after", "retry_after"]

MAX_RETRY_AFTER_S = 120.0
"""The longest ``Retry-After`` honoured; a server asking for more gets this."""
MAX_BACKOFF_S = 30.0
"""The longest wait between retries without ``Retry-After`` (before jitter)."""


def backoff(
    attempt: int,
    retry_after: float | None,
    *,
    base_s: float,
    jitter: float = 0.0,
    cap_s: float = MAX_BACKOFF_S,
) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based).

    The server's ``retry_after`` wins when it gave one; otherwise ``base_s`` doubles per
    attempt up to ``cap_s``, plus ``jitter * base_s`` (pass ``random.random()``).
    """
    if retry_after is not None:
        return retry_after
    return float(min(base_s * 2 ** (attempt - 1), cap_s) + jitter * base_s)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return min(max(float(millis) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def reset_after(headers: Mapping[str, str]) -> float | None:
    """Seconds until the provider's windows reset (``x-ratelimit-reset-*``, e.g. ``6m0s``)."""
    longest: float | None = None
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name, "").strip()
        parts = _DURATION.findall(value)
        if parts and not _DURATION.sub("", value):
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in parts)
        else:
            try:  # a bare number of seconds
                seconds = float(value)
            except ValueError:
                continue
        if math.isfinite(seconds):
            longest = max(longest or 0.0, min(max(seconds, 0.0), MAX_RETRY_AFTER_S))
    return longest
