"""The fleet-wide limiter: every limit's window in Redis, each operation one Lua script.

Keys of one limit (``P`` is the key prefix, ``L`` the limit's name)::

    P:limit:L:calls    zset   admission id -> admitted at (Redis server time, ms)
    P:limit:L:cost     hash   admission id -> tokens counted (estimate, then real usage)
    P:limit:L:meta     hash   tokens (sum of cost over the window), paused_until (ms)
    P:limit:L:flight   zset   admission id -> in-flight lease expiry (ms)

and, per model endpoint (``E``: a digest of its base URL and model)::

    P:endpoint:E:width string the calls in flight it was last seen to take (expires)

Why a script of our own rather than the ``limits`` library: its moving-window strategy
counts hits of a fixed cost, cannot charge a call's token estimate and later replace it
with the real usage, has no in-flight count with leases and no shared pause; two
counters (requests and tokens) checked by two library calls would also not be one
atomic decision. One script checks requests, tokens, in-flight calls and the pause,
and admits, in one round trip.

Times come from the Redis server's clock (``TIME``), so workers with skewed clocks
share one window. Every script first drops what has left the window and lapsed
leases, so nothing needs a sweeper; every key expires once the limit goes unused. The
scripts are ``fleet/redis/lua/limit_*.lua``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import mask_url
from ..errors import BrokerError, ConfigError
from ..redis.clients import per_loop
from ..redis.keys import Keys
from ..redis.scripts import script
from .base import WIDTH_TTL_S, AdmitResult, AdmitStatus, LimitState, ProviderLimit, RateLimiter

__all__ = ["RedisRateLimiter"]

T = TypeVar("T")


def _ms(seconds: float) -> int:
    return max(round(seconds * 1000), 1)


def _state(requests: int, tokens: int, in_flight: int, paused_ms: int) -> LimitState:
    return LimitState(int(requests), int(tokens), int(in_flight), max(int(paused_ms), 0) / 1000)


class RedisRateLimiter(RateLimiter):
    """Provider limits in Redis, shared by every host and worker using the same server.

    Args:
        url: ``redis://`` or ``rediss://`` URL (password in the URL).
        key_prefix: prefix of every key (``{key_prefix}:limit:{name}:...``).
        socket_timeout_s: how long one command may take before it counts as an outage
            (the caller then waits and asks again within the step's deadline).

    Works from any event loop (one connection pool each, closed when its loop ends).
    """

    def __init__(
        self, url: str, *, key_prefix: str = "fleet", socket_timeout_s: float = 2.0
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.socket_timeout_s = socket_timeout_s
        # One pool per event loop, closed when that loop ends. No retry inside the
        # client: the admission loop retries within the step's deadline.
        self._clients = per_loop(
            url,
            retry=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
        )
        self._keys: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"RedisRateLimiter({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _client(self) -> aioredis.Redis:
        try:
            return self._clients.get()
        except ValueError as error:
            raise ConfigError(
                f"invalid rate limiter Redis URL {mask_url(self.url)}: {error}",
                key="redis_url",
            ) from None

    def keys(self, name: str) -> tuple[str, ...]:
        """The Redis keys of limit ``name`` (calls, cost, meta, flight)."""
        keys = self._keys.get(name)
        if keys is None:
            keys = self._keys[name] = Keys(self.key_prefix).limit(name)
        return keys

    async def _run(self, name: str, limit: ProviderLimit, *args: str | int) -> Any:
        client = self._client()
        keys = self.keys(limit.name)
        argv = (_ms(limit.counted_window_s), *args)
        run = script(f"limit_{name}").run(client, keys, argv)
        return await self._reach(run, hint="; is Redis running and is FLEET_REDIS_URL right?")

    async def _reach(self, command: Awaitable[T], *, hint: str = "") -> T:
        """Await ``command``; an unreachable Redis becomes a one-line ``BrokerError``."""
        try:
            return await command
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise BrokerError(
                f"cannot reach the rate limiter at {mask_url(self.url)} ({error}){hint}",
                url=mask_url(self.url),
            ) from None

    async def try_admit(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, lease_s: float
    ) -> AdmitResult:
        """Admit now or say how long to wait (one script); see :meth:`RateLimiter.try_admit`."""
        status, wait_ms, *state = await self._run(
            "admit",
            limit,
            admission_id,
            tokens,
            limit.requests or 0,
            limit.tokens or 0,
            limit.max_concurrent or 0,
            _ms(lease_s),
        )
        return AdmitResult(AdmitStatus(status), max(int(wait_ms), 0) / 1000, _state(*state))

    async def reconcile(
        self, limit: ProviderLimit, admission_id: str, tokens: int, *, sent_after_s: float = 0.0
    ) -> None:
        """Count the real usage (one script); see :meth:`RateLimiter.reconcile`."""
        shift = max(round(sent_after_s * 1000), 0)
        await self._run("reconcile", limit, admission_id, max(int(tokens), 0), shift)

    async def pause(self, limit: ProviderLimit, seconds: float) -> float:
        """Pause admissions (one script); see :meth:`RateLimiter.pause`."""
        return _state(*await self._run("pause", limit, _ms(seconds))).paused_s

    async def state(self, limit: ProviderLimit) -> LimitState:
        """The limit's use now (one script); see :meth:`RateLimiter.state`."""
        return _state(*await self._run("state", limit))

    def width_key(self, endpoint: str) -> str:
        """The key of an endpoint's learned width (a digest: no URL in a key name)."""
        return Keys(self.key_prefix).endpoint_width(endpoint)

    async def recall_width(self, endpoint: str) -> int | None:
        """The endpoint's remembered width (one GET); see :meth:`RateLimiter.recall_width`."""
        value = await self._reach(self._client().get(self.width_key(endpoint)))
        return int(value) if value is not None else None

    async def remember_width(self, endpoint: str, width: int) -> None:
        """Keep the endpoint's width (one SET, expiring); see :meth:`RateLimiter.remember_width`."""
        key = self.width_key(endpoint)
        await self._reach(self._client().set(key, int(width), px=_ms(WIDTH_TTL_S)))

    async def reset(self, limit: ProviderLimit) -> None:
        """Delete the limit's keys; see :meth:`RateLimiter.reset`."""
        await self._reach(self._client().delete(*self.keys(limit.name)))

    async def close(self) -> None:
        """Close this event loop's connections (another loop's close when that loop ends)."""
        await self._clients.aclose()
