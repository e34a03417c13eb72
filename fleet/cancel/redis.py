"""The fleet's cancel board, in Redis: what ``fleet cancel`` writes and workers read.

Keys (``{p}`` is the key prefix):

* ``{p}:workflow:{root_id}`` — hash, the latest run of a root id: ``run``, ``status``,
  ``started``, ``ended``, ``reason`` and ``beat`` (the host's last heartbeat, on the Redis
  server's clock, so hosts and readers need not agree on the time); no expiry while the
  run is live, then kept :data:`RUN_RECORD_TTL_S` after it ended (the run's retention,
  :mod:`fleet.retention`, sets its own);
* ``{p}:cancel:{run_id}`` — string, a :class:`~fleet.cancel.CancelNotice` as JSON, kept
  :data:`~fleet.cancel.CANCEL_TTL_S`; its presence cancels every step message of the run
  (workers check it with ``EXISTS`` when they claim a step and while it runs).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.exceptions import RedisError

from ..config import mask_url
from ..errors import BrokerError
from ..redis.clients import per_loop
from .board import (
    CANCEL_TTL_S,
    CancelBoard,
    CancelNotice,
    RunRecord,
    RunState,
    cancel_marker_key,
    run_record_key,
)

__all__ = ["RUN_RECORD_TTL_S", "RedisCancelBoard"]

RUN_RECORD_TTL_S = 7 * 86_400
"""How long ``fleet status`` can tell about a run after it last changed."""

_REQUEST = """
-- KEYS[1] {p}:workflow:{root_id}   the run record (hash)
-- KEYS[2] {p}:cancel:              the marker prefix (the run id is appended)
-- ARGV: reason, now, marker ttl, record ttl, only this run id ('' for any), notice json head
local run = redis.call('HGET', KEYS[1], 'run')
if not run or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
if ARGV[5] ~= '' and ARGV[5] ~= run then return false end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'ended', ARGV[2], 'reason', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local notice = ARGV[6] .. cjson.encode(run) .. '}'
redis.call('SET', KEYS[2] .. run, notice, 'EX', ARGV[3])
return notice
"""
"""Atomically: if the root id has a live run, mark it cancelled and leave its marker."""

_END = """
-- KEYS[1] {p}:workflow:{root_id}; ARGV: run id, status, now, record ttl
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'ended', ARGV[3])
-- A closed run may resume: its record stays, like its journals, until `fleet gc`.
if ARGV[2] == 'closed' then redis.call('PERSIST', KEYS[1])
else redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
"""Record how a run ended, unless a newer run replaced it or it was cancelled."""


_NOW = "local t = redis.call('TIME') local now = string.format('%d.%06d', t[1], t[2])\n"
"""Lua: ``now``, the server's clock in seconds (one clock for every host and reader)."""

_BEGIN = (
    """
-- KEYS[1] {p}:workflow:{root_id}; ARGV: run id, started (host clock)
"""
    + _NOW
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'status', 'running', 'started', ARGV[2], 'beat', now)
return 1
"""
)
"""Register a run, its first heartbeat taken now."""

_BEAT = (
    """
-- KEYS[1] {p}:workflow:{root_id}; ARGV: run id
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
"""
    + _NOW
    + """
redis.call('HSET', KEYS[1], 'beat', now)
return 1
"""
)
"""Refresh the live run's heartbeat (not a superseded or ended run's)."""


class RedisCancelBoard(CancelBoard):
    """The cancel board in the fleet's Redis.

    Args:
        url: the Redis URL (``FLEET_REDIS_URL``).
        key_prefix: the fleet's key prefix (workers must use the same).
        marker_ttl_s: how long a cancel marker lives.

    The client connects lazily, per event loop, and retries through a Redis restart.
    """

    def __init__(
        self, url: str, *, key_prefix: str = "fleet", marker_ttl_s: int = CANCEL_TTL_S
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.marker_ttl_s = int(marker_ttl_s)
        self._clients = per_loop(url)

    def __repr__(self) -> str:
        return f"RedisCancelBoard({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _client(self) -> Any:
        return self._clients.get()

    async def _call(self, action: str, command: Any) -> Any:
        try:
            return await command
        except (RedisError, OSError) as error:
            raise BrokerError(
                f"cannot {action} at {mask_url(self.url)}: {type(error).__name__}: {error}",
                url=mask_url(self.url),
            ) from error

    def _record_key(self, root_id: str) -> str:
        return run_record_key(root_id, key_prefix=self.key_prefix)

    async def begin(self, root_id: str, run_id: str) -> None:
        """Register the live run (replacing the record of any earlier run).

        A live run's record has no expiry: ``fleet gc --older-than`` tells an abandoned
        one from a running one by it.
        """
        script = self._client().register_script(_BEGIN)
        keys = [self._record_key(root_id)]
        await self._call("register workflow run", script(keys=keys, args=[run_id, time.time()]))

    async def beat(self, root_id: str, run_id: str) -> None:
        """Refresh the live run's heartbeat (on the server's clock)."""
        script = self._client().register_script(_BEAT)
        keys = [self._record_key(root_id)]
        await self._call("refresh workflow heartbeat", script(keys=keys, args=[run_id]))

    async def request(
        self, root_id: str, reason: str, *, run_id: str | None = None
    ) -> CancelNotice | None:
        """Cancel the live run of ``root_id`` (one atomic script); ``None`` when none is live."""
        now = time.time()
        # The notice without its run id, which the script reads and appends atomically.
        head = json.dumps({"root_id": root_id, "reason": reason, "at": now})[:-1] + ',"run_id":'
        client = self._client()
        script = client.register_script(_REQUEST)
        keys = [self._record_key(root_id), cancel_marker_key("", key_prefix=self.key_prefix)]
        args = [reason, now, self.marker_ttl_s, RUN_RECORD_TTL_S, run_id or "", head]
        raw = await self._call("cancel workflow", script(keys=keys, args=args))
        return None if raw is None else CancelNotice.from_json(raw)

    async def check(self, run_id: str) -> CancelNotice | None:
        """The marker of ``run_id``, if one was left."""
        key = cancel_marker_key(run_id, key_prefix=self.key_prefix)
        raw = await self._call("read cancel marker", self._client().get(key))
        return None if raw is None else CancelNotice.from_json(raw)

    async def end(self, root_id: str, run_id: str, status: RunState) -> None:
        """Record how the run ended (a cancelled or superseded record is left alone)."""
        script = self._client().register_script(_END)
        keys = [self._record_key(root_id)]
        args = [run_id, status, time.time(), RUN_RECORD_TTL_S]
        await self._call("record workflow end", script(keys=keys, args=args))

    async def record(self, root_id: str) -> RunRecord | None:
        """The latest run of ``root_id``."""
        pipe = self._client().pipeline(transaction=False)
        pipe.hgetall(self._record_key(root_id))
        pipe.time()
        raw, (seconds, micros) = await self._call("read workflow run", pipe.execute())
        if not raw:
            return None
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        return RunRecord(
            root_id=root_id,
            run_id=fields.get("run", "?"),
            status=fields.get("status", "running"),
            started_at=float(fields.get("started", 0)),
            ended_at=float(fields["ended"]) if "ended" in fields else None,
            reason=fields.get("reason"),
            beat_at=float(fields["beat"]) if "beat" in fields else None,
            read_at=seconds + micros / 1e6,
        )

    async def close(self) -> None:
        """Close this loop's connections."""
        await self._clients.aclose()
