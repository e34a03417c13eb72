"""Redis clients that ride out a Redis restart instead of failing the work in flight.

Every long-lived client fleet makes (the Celery host's, the workers', the journal's and the
budget ledger's) retries a command that hit a dropped or refused connection, with
exponential backoff, for about :data:`OUTAGE_TOLERANCE_S` seconds. A restart of Redis (with
AOF) therefore pauses a workflow rather than failing it; an outage longer than that fails
the affected steps with ``unavailable``.

A process-wide client comes from :func:`async_client` or :func:`sync_client`; an object
users keep across ``asyncio.run()`` calls (a store, a ledger, a registry) takes its clients
from :func:`per_loop` instead, one per event loop (see :mod:`fleet.perloop`).
A command whose failure the caller reports as one line awaits through :func:`broker_call`.

A sentinel URL (see :mod:`fleet.redis.sentinel`) gets a client whose connections ask the
sentinels for the master on every (re)connect: a failover looks to it like a restart,
a connection to the old master fails (refused, or ``READONLY`` once it came back as a
replica), the retry re-resolves the master and sends the command there. Only the
commands fleet retries are idempotent (Lua scripts keyed by reservation or task id);
see ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BrokerError
from ..perloop import PerLoop
from ..urls import mask_url
from .sentinel import is_sentinel, parse_sentinel_url

__all__ = [
    "OUTAGE_TOLERANCE_S",
    "async_client",
    "broker_call",
    "per_loop",
    "retry_options",
    "sync_client",
]

OUTAGE_TOLERANCE_S = 30.0
"""Roughly how long a command keeps retrying while Redis is unreachable."""

_T = TypeVar("_T")

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


class _AsyncSentinelConnection(aioredis.sentinel.SentinelManagedConnection):
    """Asks the sentinels for the master on every socket connect.

    redis-py (8.1) reconnects a connection that dropped inside a command's retry through
    the plain connect path, to the address it last had: after a failover that is the
    dead master, for the whole retry budget. Resolving here sends the retry to the new one.

    The connections to the sentinels are closed once the answer is in (those another
    lookup is using, once it is done): a lookup made after the client was closed (a
    retry the close overtook, during a failover) left connections to a sentinel that
    nothing closed.
    """

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            try:
                self.host, self.port = await self.connection_pool.get_master_address()
            finally:
                # Shielded: the cancel of a client closing mid-failover lands here often, and
                # would otherwise stop the loop after the first sentinel and leave the others'
                # connections to the garbage collector.
                await asyncio.shield(_let_go(self.connection_pool.sentinel_manager))
        connect: Any = super()._connect  # typed in some redis-py releases, not in others
        await connect()


async def _let_go(manager: Any) -> None:
    """Close the sentinel connections no lookup is using now (in use: closed by that lookup)."""
    for sentinel in list(manager.sentinels):
        await sentinel.connection_pool.disconnect(inuse_connections=False)


class _SentinelConnection(redis.sentinel.SentinelManagedConnection):
    """The blocking twin of :class:`_AsyncSentinelConnection`."""

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        connect: Any = super()._connect
        return connect()


class _AsyncSentinelRedis(aioredis.Redis):
    """A master client that also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the client, its pool (as redis-py decides) and the sentinel clients.

        The sentinel clients are closed even when closing the pool fails (a connection to
        a master that died mid-failover), so nothing this client opened is left to the
        garbage collector.
        """
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            if manager is not None:
                await manager.aclose()


class _SentinelRedis(redis.Redis):
    """A master client that also closes its connections to the sentinels."""

    def close(self) -> None:
        """Close the client, its pool (as redis-py decides) and the sentinel clients."""
        try:
            super().close()
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for client in getattr(manager, "sentinels", ()):
                client.close()


class _AsyncBlockingSentinelPool(
    aioredis.sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool
):
    """A sentinel-managed pool that waits for a free connection instead of failing."""


class _BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """A sentinel-managed pool that waits for a free connection instead of failing."""


def _blocking(
    pool_class: type, max_connections: int | None, timeout_s: float | None
) -> dict[str, Any]:
    """``master_for`` options for a blocking pool of ``max_connections`` (none: the default)."""
    if max_connections is None:
        return {}
    return {
        "connection_pool_class": pool_class,
        "max_connections": max_connections,
        "timeout": timeout_s,
    }


@dataclass(frozen=True)
class _Flavour:
    """The redis-py classes of one flavour of client: asyncio or blocking."""

    asynchronous: bool
    redis: Any
    pool: Any
    sentinel: Any
    sentinel_connection: Any
    sentinel_redis: Any
    sentinel_pool: Any


_ASYNC = _Flavour(
    True,
    aioredis.Redis,
    aioredis.BlockingConnectionPool,
    aioredis.sentinel.Sentinel,
    _AsyncSentinelConnection,
    _AsyncSentinelRedis,
    _AsyncBlockingSentinelPool,
)
_SYNC = _Flavour(
    False,
    redis.Redis,
    redis.BlockingConnectionPool,
    redis.sentinel.Sentinel,
    _SentinelConnection,
    _SentinelRedis,
    _BlockingSentinelPool,
)


def async_client(
    url: str,
    *,
    retry: bool = True,
    max_connections: int | None = None,
    pool_timeout_s: float | None = 30.0,
    **options: Any,
) -> aioredis.Redis:
    """An asyncio client for ``url`` (``redis://``, ``rediss://`` or ``sentinel://``).

    Args:
        url: the Redis URL.
        retry: retry through a restart or failover for :data:`OUTAGE_TOLERANCE_S`
            (``False``: redis-py's own default).
        max_connections: a blocking pool of this many connections (callers wait up to
            ``pool_timeout_s`` for one) instead of redis-py's unbounded default.
        pool_timeout_s: how long a caller waits for a free connection (``None``: forever).
        options: more ``Redis(...)`` connection keyword arguments.
    """
    client: aioredis.Redis = _client(_ASYNC, url, retry, max_connections, pool_timeout_s, options)
    return client


def sync_client(
    url: str,
    *,
    retry: bool = True,
    max_connections: int | None = None,
    pool_timeout_s: float | None = 30.0,
    **options: Any,
) -> redis.Redis:
    """A blocking client for ``url``; arguments as for :func:`async_client`."""
    client: redis.Redis = _client(_SYNC, url, retry, max_connections, pool_timeout_s, options)
    return client


def _client(
    flavour: _Flavour,
    url: str,
    retry: bool,
    max_connections: int | None,
    pool_timeout_s: float | None,
    options: dict[str, Any],
) -> Any:
    asynchronous = flavour.asynchronous
    kwargs = {**(retry_options(asynchronous=asynchronous) if retry else {}), **options}
    if is_sentinel(url):
        target = parse_sentinel_url(url)
        timeout = float(options.get("socket_connect_timeout") or 1.0)
        sentinel = flavour.sentinel(
            target.sentinels,
            sentinel_kwargs=target.sentinel_kwargs(timeout_s=timeout, asynchronous=asynchronous),
            connection_class=flavour.sentinel_connection,
            **target.connection_kwargs(),
        )
        blocking = _blocking(flavour.sentinel_pool, max_connections, pool_timeout_s)
        return sentinel.master_for(target.master_name, flavour.sentinel_redis, **blocking, **kwargs)
    if max_connections is None:
        return flavour.redis.from_url(url, **kwargs)
    pool = flavour.pool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s, **kwargs
    )
    return flavour.redis(connection_pool=pool)


def per_loop(url: str, **options: Any) -> PerLoop[aioredis.Redis]:
    """One :func:`async_client` per event loop, closed when its loop ends (or on ``aclose``).

    Args:
        url: the Redis URL.
        options: :func:`async_client` keyword arguments.
    """
    return PerLoop(lambda: async_client(url, **options), close=_aclose)


async def _aclose(client: aioredis.Redis) -> None:
    await client.aclose()


async def broker_call(url: str, action: str, command: Awaitable[_T]) -> _T:
    """Await one Redis command; a Redis or socket error becomes a one-line ``BrokerError``.

    Args:
        url: the Redis URL the command went to (masked in the message).
        action: what the command does, as in "cannot {action} at {url}".
        command: the awaitable command (a client call or a script run).

    Raises:
        BrokerError: the command failed; its message names the action, the place and the error.
    """
    try:
        return await command
    except (RedisError, OSError) as error:
        raise BrokerError(
            f"cannot {action} at {mask_url(url)}: {type(error).__name__}: {error}",
            url=mask_url(url),
        ) from error
