"""The run registry in the fleet's Redis: what ``fleet cancel`` writes and workers read.

Keys (``{p}`` is the key prefix):

* ``{p}:workflow:{root_id}`` — hash, the latest run of a root id: ``run``, ``status``,
  ``started``, ``ended``, ``reason`` and ``beat`` (the host's last heartbeat, on the Redis
  server's clock, so hosts and readers need not agree on the time); no expiry while the
  run is live, then kept :data:`RUN_RECORD_TTL_S` after it ended (the run's retention,
  :mod:`fleet.retention`, sets its own);
* ``{p}:cancel:{run_id}`` — string, a :class:`~fleet.runs.CancelNotice` as JSON, kept
  :data:`~fleet.runs.CANCEL_TTL_S`; its presence cancels every step message of the run
  (workers check it with ``EXISTS`` when they claim a step and while it runs).

Key names come from :class:`fleet.redis.keys.Keys`; the scripts are
``fleet/redis/lua/run_*.lua``. The hash's fields are the ones the cancel board wrote
before it became this registry, so runs recorded by an earlier version still read.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping
from typing import Any

from ..config import mask_url
from ..redis.clients import broker_call, per_loop
from ..redis.keys import Keys, untagged
from ..redis.scripts import script
from .base import (
    CANCEL_TTL_S,
    CancelNotice,
    RunRecord,
    RunRegistry,
    RunState,
    cancel_marker_key,
    newest_first,
    run_record_key,
)

__all__ = ["RUN_RECORD_TTL_S", "RedisRunRegistry"]

RUN_RECORD_TTL_S = 7 * 86_400
"""How long ``fleet status`` can tell about a run after it last changed."""


class RedisRunRegistry(RunRegistry):
    """The run registry in the fleet's Redis.

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
        return f"RedisRunRegistry({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _client(self) -> Any:
        return self._clients.get()

    def _record_key(self, root_id: str) -> str:
        return run_record_key(root_id, key_prefix=self.key_prefix)

    async def begin(self, root_id: str, run_id: str) -> None:
        """Register the live run (replacing the record of any earlier run).

        A live run's record has no expiry: ``fleet gc --older-than`` tells an abandoned
        one from a running one by it.
        """
        keys = [self._record_key(root_id)]
        begin = script("run_begin").run(self._client(), keys, [run_id, time.time()])
        await broker_call(self.url, "register workflow run", begin)

    async def heartbeat(self, root_id: str, run_id: str) -> None:
        """Refresh the live run's heartbeat (on the server's clock)."""
        keys = [self._record_key(root_id)]
        beat = script("run_beat").run(self._client(), keys, [run_id])
        await broker_call(self.url, "refresh workflow heartbeat", beat)

    async def request(
        self, root_id: str, reason: str, *, run_id: str | None = None
    ) -> CancelNotice | None:
        """Cancel the live run of ``root_id`` (one atomic script); ``None`` when none is live."""
        now = time.time()
        # The notice without its run id, which the script reads and appends atomically.
        head = json.dumps({"root_id": root_id, "reason": reason, "at": now})[:-1] + ',"run_id":'
        keys = [self._record_key(root_id), cancel_marker_key("", key_prefix=self.key_prefix)]
        args = [reason, now, self.marker_ttl_s, RUN_RECORD_TTL_S, run_id or "", head]
        request = script("run_request").run(self._client(), keys, args)
        raw = await broker_call(self.url, "cancel workflow", request)
        return None if raw is None else CancelNotice.from_json(raw)

    async def check(self, run_id: str) -> CancelNotice | None:
        """The marker of ``run_id``, if one was left."""
        key = cancel_marker_key(run_id, key_prefix=self.key_prefix)
        raw = await broker_call(self.url, "read cancel marker", self._client().get(key))
        return None if raw is None else CancelNotice.from_json(raw)

    async def end(self, root_id: str, run_id: str, status: RunState) -> None:
        """Record how the run ended (a cancelled or superseded record is left alone)."""
        keys = [self._record_key(root_id)]
        args = [run_id, status, time.time(), RUN_RECORD_TTL_S]
        end = script("run_end").run(self._client(), keys, args)
        await broker_call(self.url, "record workflow end", end)

    async def latest(self, root_id: str) -> RunRecord | None:
        """The latest run of ``root_id``."""
        pipe = self._client().pipeline(transaction=False)
        pipe.hgetall(self._record_key(root_id))
        pipe.time()
        raw, (seconds, micros) = await broker_call(self.url, "read workflow run", pipe.execute())
        return _parsed(root_id, raw, seconds + micros / 1e6)

    async def list(self, *, limit: int = 100) -> builtins.list[RunRecord]:
        """The latest run of each root id with a record here, newest start first."""
        head = Keys(self.key_prefix).head("workflow")
        names = await broker_call(self.url, "list workflow runs", self._scan(head + "*"))
        client = self._client()
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        pipe.time()
        *raws, (seconds, micros) = await broker_call(self.url, "read workflow runs", pipe.execute())
        records = []
        for name, raw in zip(names, raws, strict=True):
            root_id = untagged(name.decode()[len(head) :])
            record = _parsed(root_id, raw, seconds + micros / 1e6)
            if record is not None:
                records.append(record)
        return newest_first(records, limit)

    async def _scan(self, match: str) -> builtins.list[bytes]:
        return [name async for name in self._client().scan_iter(match=match, count=500)]

    async def close(self) -> None:
        """Close this loop's connections."""
        await self._clients.aclose()


def _parsed(root_id: str, raw: Mapping[bytes, bytes], read_at: float) -> RunRecord | None:
    """The record in a run hash's fields, ``None`` for an empty (missing) hash."""
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
        read_at=read_at,
    )
