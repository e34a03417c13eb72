"""Redis clients that ride out a Redis restart instead of failing the work in flight.

Every long-lived client fleet makes (the Celery host's, the workers', the journal's and the
budget ledger's) retries a command that hit a dropped or refused connection, with
exponential backoff, for about :data:`OUTAGE_TOLERANCE_S` seconds. A restart of Redis (with
AOF) therefore pauses a workflow rather than failing it; an outage longer than that fails
the affected steps with ``unavailable``.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["OUTAGE_TOLERANCE_S", "async_client", "retry_options", "sync_client"]

OUTAGE_TOLERANCE_S = 30.0
"""Roughly how long a command keeps retrying while Redis is unreachable."""

_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 1.0


def _retries(tolerance_s: float) -> int:
    waited, retries, delay = 0.0, 0, _BACKOFF_BASE_S
    while waited < tolerance_s:
        waited += min(delay, _BACKOFF_CAP_S)
        delay *= 2
        retries += 1
    return retries


def retry_options(*, asynchronous: bool, tolerance_s: float = OUTAGE_TOLERANCE_S) -> dict[str, Any]:
    """``Redis(...)`` keyword arguments for retrying through an outage of ``tolerance_s``."""
    retry_cls = aioredis.retry.Retry if asynchronous else redis.retry.Retry
    return {
        "retry": retry_cls(
            ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), _retries(tolerance_s)
        ),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    }


def async_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client for ``url`` that retries through a Redis restart."""
    return aioredis.Redis.from_url(url, **{**retry_options(asynchronous=True), **options})


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A blocking client for ``url`` that retries through a Redis restart."""
    return redis.Redis.from_url(url, **{**retry_options(asynchronous=False), **options})
