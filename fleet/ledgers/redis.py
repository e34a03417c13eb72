"""The fleet-wide ledger: accounts in Redis, every operation one atomic Lua script.

Keys of one workflow's account (``P`` is the key prefix, ``W`` the workflow id)::

    P:budget:W:account   hash   limit (-1 = uncapped; absent = not set), consumed, reserved
    P:budget:W:held      hash   reservation id -> "<tokens>|<holder>"
    P:budget:W:leases    zset   reservation id -> lease expiry (Redis server time, ms)
    P:budget:W:settled   hash   reservation id -> tokens charged (makes settle idempotent)

Each call is one ``EVALSHA`` round trip. Amounts are written from their decimal text,
never through a Lua number's ``%.14g`` form, so counts stay exact up to 2**53 tokens.
Lease times come from the Redis server's clock (``TIME``), so hosts with skewed clocks
agree on when a lease ends. Every script first releases the reservations whose lease
has expired, so a dead holder's tokens return to the budget without any sweeper process.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import mask_url
from ..errors import BrokerError, ConfigError
from ..perloop import PerLoop
from .base import BudgetLedger, HeldReservation, LedgerState, ReserveResult, ReserveStatus

__all__ = ["RedisLedger"]

# KEYS: account, held, leases, settled. Defines `now` (ms) and releases expired leases.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #dead > 0 then
  for _, id in ipairs(dead) do
    local v = redis.call('HGET', KEYS[2], id)
    if v then
      redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. string.match(v, '^(%d+)'))
    end
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
  end
end
local function account()
  local a = redis.call('HMGET', KEYS[1], 'limit', 'consumed', 'reserved')
  return tonumber(a[1]) or -2, tonumber(a[2]) or 0, tonumber(a[3]) or 0
end
"""

# ARGV: id, tokens, holder, lease_ms, initial_limit (-1 = uncapped).
# Returns {status, tokens, consumed, reserved, limit, retry_ms};
# status 0 granted, 1 wait, 2 refused.
_RESERVE = (
    _PRELUDE
    + """
local limit, consumed, reserved = account()
if limit == -2 then
  limit = tonumber(ARGV[5])
  redis.call('HSET', KEYS[1], 'limit', ARGV[5])
end
local id = ARGV[1]
local lease = tonumber(ARGV[4])
local existing = redis.call('HGET', KEYS[2], id)
if existing then
  redis.call('ZADD', KEYS[3], now + lease, id)
  return {0, tonumber(string.match(existing, '^(%d+)')), consumed, reserved, limit, 0}
end
local tokens = tonumber(ARGV[2])
if limit >= 0 then
  if consumed >= limit or consumed + tokens > limit then
    return {2, 0, consumed, reserved, limit, 0}
  end
  if consumed + reserved + tokens > limit then
    local soonest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local retry = 0
    if soonest[2] then retry = tonumber(soonest[2]) - now end
    return {1, 0, consumed, reserved, limit, retry}
  end
end
-- A settled id reserved again is a new attempt of the same step: settle anew.
redis.call('HDEL', KEYS[4], id)
redis.call('HSET', KEYS[2], id, ARGV[2] .. '|' .. ARGV[3])
redis.call('ZADD', KEYS[3], now + lease, id)
reserved = redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
return {0, tokens, consumed, reserved, limit, 0}
"""
)

# ARGV: id, used. Returns {consumed, reserved, limit}.
_SETTLE = (
    _PRELUDE
    + """
local id = ARGV[1]
if redis.call('HSETNX', KEYS[4], id, ARGV[2]) == 1 then
  local v = redis.call('HGET', KEYS[2], id)
  if v then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. string.match(v, '^(%d+)'))
  end
  redis.call('HINCRBY', KEYS[1], 'consumed', ARGV[2])
end
local limit, consumed, reserved = account()
return {consumed, reserved, limit}
"""
)

# ARGV: id, lease_ms. Returns 1 if the reservation is live (and renewed), else 0.
_RENEW = (
    _PRELUDE
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)

# ARGV: none, or a new limit (-1 = uncapped). Returns {consumed, reserved, limit}.
_STATE = (
    _PRELUDE
    + """
if ARGV[1] then redis.call('HSET', KEYS[1], 'limit', ARGV[1]) end
local limit, consumed, reserved = account()
return {consumed, reserved, limit}
"""
)

# Returns a flat list: id, "<tokens>|<holder>", expires_in_ms, ...
_HELD = (
    _PRELUDE
    + """
local out = {}
local leases = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #leases, 2 do
  local v = redis.call('HGET', KEYS[2], leases[i])
  if v then
    table.insert(out, leases[i])
    table.insert(out, v)
    table.insert(out, tonumber(leases[i + 1]) - now)
  end
end
return out
"""
)

_SCRIPTS = {
    "reserve": _RESERVE,
    "settle": _SETTLE,
    "renew": _RENEW,
    "state": _STATE,
    "held": _HELD,
}
_SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}
_STATUS: tuple[ReserveStatus, ...] = ("granted", "wait", "refused")
_KEY_CACHE_SIZE = 1024


def _limit(raw: int) -> tuple[int | None, bool]:
    """Decode a stored limit: -2 not set, -1 uncapped, else the number."""
    if raw == -2:
        return None, False
    if raw == -1:
        return None, True
    return int(raw), True


def _state(consumed: int, reserved: int, raw_limit: int) -> LedgerState:
    limit, limit_set = _limit(raw_limit)
    return LedgerState(int(consumed), int(reserved), limit, limit_set)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


class RedisLedger(BudgetLedger):
    """Accounts in Redis, shared by every process and machine that uses the same server.

    Args:
        url: ``redis://`` or ``rediss://`` URL (password in the URL).
        key_prefix: prefix of every key (``{key_prefix}:budget:{workflow_id}:...``).

    The account outlives the process: a resumed workflow (same workflow id) continues
    where it stopped. Works from any event loop: each gets its own connection pool, made
    on first use and closed when that loop ends, so one ledger may serve successive
    ``asyncio.run()`` calls.
    """

    def __init__(self, url: str, *, key_prefix: str = "fleet") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._clients: PerLoop[aioredis.Redis] = PerLoop(
            lambda: aioredis.Redis.from_url(url), close=lambda client: client.aclose()
        )
        self._key_cache: dict[str, tuple[bytes, ...]] = {}

    def __repr__(self) -> str:
        return f"RedisLedger({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _client(self) -> aioredis.Redis:
        try:
            return self._clients.get()
        except ValueError as error:  # e.g. an unknown scheme or a port out of range
            raise ConfigError(
                f"invalid budget ledger Redis URL {mask_url(self.url)}: {error}",
                key="redis_url",
            ) from None

    def _keys(self, workflow_id: str) -> tuple[bytes, ...]:
        keys = self._key_cache.get(workflow_id)
        if keys is None:
            if len(self._key_cache) >= _KEY_CACHE_SIZE:
                self._key_cache.clear()
            base = f"{self.key_prefix}:budget:{workflow_id}"
            keys = self._key_cache[workflow_id] = tuple(
                f"{base}:{part}".encode() for part in ("account", "held", "leases", "settled")
            )
        return keys

    async def _run(self, script: str, workflow_id: str, *args: str | int) -> Any:
        """Run one script: one EVALSHA round trip (a SCRIPT LOAD first on a new server)."""
        client = self._client()
        keys = self._keys(workflow_id)
        try:
            try:
                return await client.evalsha(_SHAS[script], 4, *keys, *args)
            except NoScriptError:
                await client.script_load(_SCRIPTS[script])
                return await client.evalsha(_SHAS[script], 4, *keys, *args)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise BrokerError(
                f"cannot reach the budget ledger at {mask_url(self.url)} ({error}); "
                "is Redis running and is FLEET_REDIS_URL right?",
                url=mask_url(self.url),
            ) from None

    async def reserve(
        self,
        workflow_id: str,
        reservation_id: str,
        tokens: int,
        *,
        holder: str,
        lease_s: float,
        initial_limit: int | None,
    ) -> ReserveResult:
        """Try to hold ``tokens`` (one script); see :meth:`BudgetLedger.reserve`."""
        initial = -1 if initial_limit is None else initial_limit
        status, held, consumed, reserved, limit, retry_ms = await self._run(
            "reserve", workflow_id, reservation_id, tokens, holder, _ms(lease_s), initial
        )
        retry = max(retry_ms, 0) / 1000 if status == 1 else None
        return ReserveResult(_STATUS[status], int(held), _state(consumed, reserved, limit), retry)

    async def renew(self, workflow_id: str, reservation_id: str, *, lease_s: float) -> bool:
        """Extend a live lease (one script); see :meth:`BudgetLedger.renew`."""
        return bool(await self._run("renew", workflow_id, reservation_id, _ms(lease_s)))

    async def settle(self, workflow_id: str, reservation_id: str, used_tokens: int) -> LedgerState:
        """Charge once and release (one script); see :meth:`BudgetLedger.settle`."""
        return _state(*await self._run("settle", workflow_id, reservation_id, used_tokens))

    async def state(self, workflow_id: str) -> LedgerState:
        """The account now (one script); see :meth:`BudgetLedger.state`."""
        return _state(*await self._run("state", workflow_id))

    async def set_limit(self, workflow_id: str, limit: int | None) -> LedgerState:
        """Store a new limit (one script); see :meth:`BudgetLedger.set_limit`."""
        raw = -1 if limit is None else limit
        return _state(*await self._run("state", workflow_id, raw))

    async def reservations(self, workflow_id: str) -> list[HeldReservation]:
        """Live reservations (one script); see :meth:`BudgetLedger.reservations`."""
        flat = await self._run("held", workflow_id)
        rows = []
        for i in range(0, len(flat), 3):
            tokens, _, holder = flat[i + 1].decode().partition("|")
            rows.append(HeldReservation(flat[i].decode(), int(tokens), holder, flat[i + 2] / 1000))
        return rows

    async def delete(self, workflow_id: str) -> None:
        """Delete the account's keys; see :meth:`BudgetLedger.delete`."""
        try:
            await self._client().delete(*self._keys(workflow_id))
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise BrokerError(
                f"cannot reach the budget ledger at {mask_url(self.url)} ({error})",
                url=mask_url(self.url),
            ) from None

    async def close(self) -> None:
        """Close this event loop's connections (another loop's close when that loop ends)."""
        await self._clients.aclose()
