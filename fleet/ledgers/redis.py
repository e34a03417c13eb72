"""The fleet-wide ledger: accounts in Redis, every operation one atomic Lua script.

Keys of one account (``P`` is the key prefix, ``A`` the workflow id or account name, in
braces: the Redis Cluster hash tag that keeps an account's keys in one slot, see
:mod:`fleet.redis.keys`)::

    P:budget:{A}:account   hash   limit, ulimit (-1 = uncapped; absent = not set), consumed,
                                reserved, uconsumed, ureserved (u = micro-dollars), parents
    P:budget:{A}:held      hash   reservation id -> "<tokens>|<micros>|<holder>"
    P:budget:{A}:leases    zset   reservation id -> lease expiry (Redis server time, ms)
    P:budget:{A}:settled   hash   reservation id -> "<tokens>|<micros>" (settle is idempotent)
    P:budget:{A}:children  hash   "t:W" / "u:W" -> tokens / micro-dollars workflow W consumed

A reservation is taken from a chain of accounts, the workflow first and then every
ancestor, in **one** script: ``KEYS`` holds five keys per account of the chain (so a chain of
several accounts spans hash slots: on Redis Cluster only one-account chains run). In an
ancestor the reservation is held under ``W/ID`` (workflow id, reservation id) with the
same lease, so each account releases a dead holder's amounts on its own. ``parents``
is the newline-joined list of the accounts directly above.

Each call is one ``EVALSHA`` round trip (the scripts are ``fleet/redis/lua/ledger_*.lua``,
run by :mod:`fleet.redis.scripts`). Amounts are written from their decimal text,
never through a Lua number's ``%.14g`` form, and compared as Lua numbers (doubles),
which are exact up to 2**53 (tokens, or micro-dollars: nine billion dollars). Lease
times come from the Redis server's clock (``TIME``), so hosts with skewed clocks agree
on when a lease ends. Every script first releases the reservations whose lease has
expired, so a dead holder's amounts return to the budget without any sweeper process.

A little over our usual ~400 lines, on purpose: this docstring is the key layout and the
rules every ledger script keeps, written once beside the calls that rely on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import mask_url
from ..errors import BrokerError, ConfigError
from ..perloop import PerLoop
from ..redis.clients import async_client
from ..redis.keys import Keys
from ..redis.scripts import Script, execute_async, script
from ..redis.sentinel import is_sentinel
from .base import (
    KEEP,
    BudgetLedger,
    ChildUsage,
    HeldReservation,
    Keep,
    LedgerState,
    ReserveResult,
    ReserveStatus,
)

__all__ = ["LEDGER_CONNECTIONS", "REPLICA_WAIT_MS", "RedisLedger", "UNREPLICATED_BACKOFF_S"]

LEDGER_CONNECTIONS = 32
"""Redis connections one ledger keeps per event loop; more callers wait for one."""

REPLICA_WAIT_MS = 100
"""On Sentinel, how long a ledger write waits for one replica to acknowledge it."""

UNREPLICATED_BACKOFF_S = 1.0
"""After a write no replica acknowledged, writes skip the wait for this long."""

_WRITES = frozenset({"reserve", "settle", "renew", "state"})
"""Scripts that may write (``state`` writes when it configures an account)."""

_STATUS: tuple[ReserveStatus, ...] = ("granted", "wait", "refused")
_KEY_CACHE_SIZE = 1024


def _limit(raw: int) -> tuple[int | None, bool]:
    """Decode a stored limit: -2 not set, -1 uncapped, else the number."""
    if raw == -2:
        return None, False
    if raw == -1:
        return None, True
    return int(raw), True


def _state(row: Sequence[Any]) -> LedgerState:
    """Decode ``consumed, reserved, limit, uconsumed, ureserved, ulimit, parents``."""
    consumed, reserved, raw_limit, uconsumed, ureserved, raw_ulimit, parents = row
    limit, limit_set = _limit(raw_limit)
    ulimit, ulimit_set = _limit(raw_ulimit)
    text = parents.decode() if isinstance(parents, bytes) else str(parents)
    return LedgerState(
        int(consumed),
        int(reserved),
        limit,
        limit_set,
        int(uconsumed),
        int(ureserved),
        ulimit,
        ulimit_set,
        tuple(name for name in text.split("\n") if name),
    )


CLOSE_WAIT_S = 5.0
"""How long closing a ledger waits for its calls in flight (a keeper's renewal) to end."""


async def _close_pair(pair: tuple[aioredis.Redis, asyncio.Semaphore]) -> None:
    """Close a loop's client once its calls in flight have ended (up to CLOSE_WAIT_S).

    A call the close overtook would retry on the closed client and open connections
    nobody closes (a budget keeper's renewal may still be in flight when its holder's
    program closes the ledger).
    """
    client, slots = pair
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_WAIT_S):
            for _ in range(LEDGER_CONNECTIONS):
                await slots.acquire()
    await client.aclose(close_connection_pool=True)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _stored(limit: int | None) -> int:
    return -1 if limit is None else limit


class RedisLedger(BudgetLedger):
    """Accounts in Redis, shared by every process and machine that uses the same server.

    Args:
        url: ``redis://``, ``rediss://`` or ``sentinel://`` URL (password in the URL).
        key_prefix: prefix of every key (``{key_prefix}:budget:{{account}}:...``).

    Accounts outlive the process: a resumed workflow (same workflow id) continues
    where it stopped. Works from any event loop: each gets its own connection pool, made
    on first use and closed when that loop ends, so one ledger may serve successive
    ``asyncio.run()`` calls.

    On a sentinel URL the ledger retries through a failover (each script is idempotent
    by reservation id: a repeated reserve renews, a repeated settle charges nothing) and
    waits for one replica after each write; :attr:`unreplicated_writes` counts the
    writes no replica acknowledged in time.
    """

    unreplicated_writes: int = 0

    def __init__(self, url: str, *, key_prefix: str = "fleet") -> None:
        self.url = url
        self.key_prefix = key_prefix
        # A burst of reservations (a host-driven pipeline of hundreds of items) waits for
        # one of LEDGER_CONNECTIONS slots instead of failing "Too many connections". The
        # slots are a semaphore, not redis-py's BlockingConnectionPool: that pool takes a
        # condition and arms a timeout on every call, a cost on the order of the reserve
        # round trip itself.
        # On Sentinel the client retries through a failover (every script is idempotent
        # by reservation id) and each write waits for one replica (see _run).
        self.replicated = is_sentinel(url)
        self._clients: PerLoop[tuple[aioredis.Redis, asyncio.Semaphore]] = PerLoop(
            lambda: (
                async_client(url, retry=self.replicated),
                asyncio.Semaphore(LEDGER_CONNECTIONS),
            ),
            close=_close_pair,
        )
        self._unreplicated_until = 0.0
        self._key_cache: dict[str, tuple[bytes, ...]] = {}

    def __repr__(self) -> str:
        return f"RedisLedger({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _client(self) -> tuple[aioredis.Redis, asyncio.Semaphore]:
        try:
            return self._clients.get()
        except ValueError as error:  # e.g. an unknown scheme or a port out of range
            raise ConfigError(
                f"invalid budget ledger Redis URL {mask_url(self.url)}: {error}",
                key="redis_url",
            ) from None

    def _keys(self, account_id: str) -> tuple[bytes, ...]:
        keys = self._key_cache.get(account_id)
        if keys is None:
            if len(self._key_cache) >= _KEY_CACHE_SIZE:
                self._key_cache.clear()
            named = Keys(self.key_prefix).budget(account_id)
            keys = self._key_cache[account_id] = tuple(key.encode() for key in named)
        return keys

    def _unreachable(self, error: Exception) -> BrokerError:
        return BrokerError(
            f"cannot reach the budget ledger at {mask_url(self.url)} ({error}); "
            "is Redis running and is FLEET_REDIS_URL right?",
            url=mask_url(self.url),
        )

    async def _run(self, name: str, chain: Sequence[str], *args: str | int) -> Any:
        """Run one script over a chain of accounts: one EVALSHA round trip.

        On Sentinel a writing script is pipelined with ``WAIT 1 REPLICA_WAIT_MS`` on the
        same connection (still one round trip), so a write the caller sees acknowledged
        is on a replica too and survives a failover (see ``docs/RELIABILITY.md``).
        """
        client, slots = self._client()
        keys = [key for account_id in chain for key in self._keys(account_id)]
        wait = name in _WRITES and self.write_waits()
        try:
            async with slots:
                return await self._eval(client, script(f"ledger_{name}"), keys, args, wait)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise self._unreachable(error) from None

    async def _eval(
        self,
        client: aioredis.Redis,
        lua: Script,
        keys: list[bytes],
        args: Sequence[str | int],
        wait: bool,
    ) -> Any:
        if not wait:
            return await lua.run(client, keys, args)
        async with client.pipeline(transaction=False) as pipe:
            lua.queue(pipe, keys, args)
            pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
            row, replicas = await execute_async(pipe)
        self.acknowledged(replicas)
        return row

    def write_waits(self) -> bool:
        """Whether a ledger write sent now is followed by ``WAIT 1 REPLICA_WAIT_MS``.

        On Sentinel, unless no replica acknowledged a write lately. A caller that
        writes the ledger in a script of its own (a worker's ``finish_settle``) asks
        this, and reports the ``WAIT`` reply to :meth:`acknowledged`.
        """
        return self.replicated and time.monotonic() >= self._unreplicated_until

    def acknowledged(self, replicas: int) -> None:
        """What ``WAIT`` answered after a ledger write: how many replicas have it."""
        if int(replicas) < 1:
            # No replica acknowledged within the wait: none is connected (right after a
            # failover, until the old master rejoins) or it lags. Stop paying the wait
            # on every write for a while; the next write after that asks again.
            self.unreplicated_writes += 1
            self._unreplicated_until = time.monotonic() + UNREPLICATED_BACKOFF_S

    async def reserve(
        self,
        workflow_id: str,
        reservation_id: str,
        tokens: int,
        *,
        holder: str,
        lease_s: float,
        initial_limit: int | None,
        micros: int = 0,
        initial_limit_micros: int | None = None,
        ancestors: Sequence[str] = (),
    ) -> ReserveResult:
        """Try to hold the amounts in the whole chain (one script); see the contract."""
        chain = (workflow_id, *ancestors)
        row = await self._run(
            "reserve",
            chain,
            workflow_id,
            reservation_id,
            tokens,
            micros,
            holder,
            _ms(lease_s),
            _stored(initial_limit),
            _stored(initial_limit_micros),
        )
        status, held, held_micros = row[0], int(row[1]), int(row[2])
        who, unit, retry_ms, room = row[10], row[11], row[12], row[13]
        result = ReserveResult(
            _STATUS[status],
            held,
            _state(row[3:10]),
            max(retry_ms, 0) / 1000 if status == 1 else None,
            micros=held_micros,
            room_micros=None if room < 0 else int(room),
        )
        if status == 0:
            return result
        return ReserveResult(
            result.status,
            0,
            result.state,
            result.retry_after_s,
            blocked_by=chain[who - 1],
            blocked_unit="usd" if unit == 1 else "tokens",
            blocked_state=_state(row[14:21]),
            room_micros=result.room_micros,
        )

    async def renew(
        self,
        workflow_id: str,
        reservation_id: str,
        *,
        lease_s: float,
        ancestors: Sequence[str] = (),
    ) -> bool:
        """Extend a live lease in the whole chain (one script); see the contract."""
        chain = (workflow_id, *ancestors)
        return bool(await self._run("renew", chain, workflow_id, reservation_id, _ms(lease_s)))

    def renewal(
        self,
        workflow_id: str,
        reservation_id: str,
        *,
        lease_s: float,
        ancestors: Sequence[str] = (),
    ) -> tuple[Script, list[bytes], list[str | int]]:
        """The renew script, its keys and arguments, for a caller's own (blocking) client.

        A worker's lease thread renews every reservation of its process in one pipeline
        with this; the script answers 1 when the reservation is live (and renewed), 0
        when it is gone, as :meth:`renew` does.
        """
        chain = (workflow_id, *ancestors)
        keys = [key for account_id in chain for key in self._keys(account_id)]
        return script("ledger_renew"), keys, [workflow_id, reservation_id, _ms(lease_s)]

    async def settle(
        self,
        workflow_id: str,
        reservation_id: str,
        used_tokens: int,
        *,
        used_micros: int = 0,
        ancestors: Sequence[str] = (),
    ) -> LedgerState:
        """Charge once and release in the whole chain (one script); see the contract."""
        chain = (workflow_id, *ancestors)
        row = await self._run(
            "settle", chain, workflow_id, reservation_id, used_tokens, used_micros
        )
        return _state(row)

    async def state(self, account_id: str) -> LedgerState:
        """The account now (one script); see :meth:`BudgetLedger.state`."""
        return _state(await self._run("state", (account_id,)))

    async def configure(
        self,
        account_id: str,
        *,
        limit: int | None | Keep = KEEP,
        limit_micros: int | None | Keep = KEEP,
        parents: Sequence[str] | Keep = KEEP,
    ) -> LedgerState:
        """Create or change an account (one script); see :meth:`BudgetLedger.configure`."""
        pairs: list[str | int] = []
        if not isinstance(limit, Keep):
            pairs += ["limit", _stored(limit)]
        if not isinstance(limit_micros, Keep):
            pairs += ["ulimit", _stored(limit_micros)]
        if not isinstance(parents, Keep):
            pairs += ["parents", "\n".join(parents)]
        return _state(await self._run("state", (account_id,), *pairs))

    async def reservations(self, account_id: str) -> list[HeldReservation]:
        """Live reservations (one script); see :meth:`BudgetLedger.reservations`."""
        flat = await self._run("held", (account_id,))
        rows = []
        for i in range(0, len(flat), 3):
            value = flat[i + 1]
            text = value.decode() if isinstance(value, bytes) else str(value)
            tokens, micros, holder = text.split("|", 2)
            rows.append(
                HeldReservation(
                    flat[i].decode(), int(tokens), holder, flat[i + 2] / 1000, int(micros)
                )
            )
        return rows

    async def children(self, account_id: str) -> list[ChildUsage]:
        """Consumption per workflow (one read); see :meth:`BudgetLedger.children`."""
        try:
            client, slots = self._client()
            async with slots:
                raw = await client.hgetall(self._keys(account_id)[4])
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise self._unreachable(error) from None
        usage: dict[str, list[int]] = {}
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            unit, _, workflow_id = name.partition(":")
            usage.setdefault(workflow_id, [0, 0])[0 if unit == "t" else 1] = int(value)
        rows = [ChildUsage(wid, tokens, micros) for wid, (tokens, micros) in usage.items()]
        return sorted(rows, key=lambda row: (-row.micros, -row.tokens, row.workflow_id))

    async def delete(self, account_id: str) -> None:
        """Delete the account's keys; see :meth:`BudgetLedger.delete`."""
        try:
            client, slots = self._client()
            async with slots:
                await client.delete(*self._keys(account_id))
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise self._unreachable(error) from None

    async def close(self) -> None:
        """Close this event loop's connections (another loop's close when that loop ends)."""
        await self._clients.aclose()
