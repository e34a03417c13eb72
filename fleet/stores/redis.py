"""The fleet journal: one Redis hash per workflow, shared by the host and every worker.

Layout: key ``{key_prefix}:journal:{workflow_id}`` with the workflow's root id (the part
before the first ``/``) in braces, its Redis Cluster hash tag (:mod:`fleet.redis.keys`:
``fleet:journal:{nightly}/review``); field ``meta`` holds
``{"schema_version":1,"workflow_id":...}``; field ``step:{task_id}`` holds one step's record
JSON. Recording a step is one round trip (a small Lua script that creates ``meta`` if it is
missing and sets the step's field), O(1) however long the journal already is; steps that
finish while a write is in flight share the next round trip (a group commit).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from ..checkpoint import WorkflowCheckpoint, WorkflowStepRecord
from ..config import mask_url
from ..errors import CheckpointError, ConfigError
from ..redis.clients import per_loop
from ..redis.keys import Keys, untagged
from ..redis.scripts import execute_async, script
from ..redis.sentinel import is_sentinel, parse_sentinel_url
from .base import Batch, CheckpointStore, GroupCommit, decode_checkpoint, encode_meta

__all__ = ["RedisCheckpointStore"]

_STEP = "step:"
_CHUNK = 1000  # records per script call (Lua's unpack() has a stack limit)


class RedisCheckpointStore(CheckpointStore):
    """Journals in Redis (``redis://`` or ``rediss://``; a password may be in the URL).

    Args:
        url: the Redis URL, e.g. ``redis://:secret@host:6379/0``.
        key_prefix: prefix of every key this store writes.
        client_options: extra keyword arguments for ``redis.asyncio.from_url``
            (e.g. ``ssl_ca_certs`` for ``rediss://``).

    The store works from any event loop (each gets its own client, made on first use and
    closed when that loop ends), so one store may serve successive ``asyncio.run()`` calls.

    Raises:
        ConfigError: ``url`` is not a usable Redis URL.
    """

    def __init__(self, url: str, *, key_prefix: str = "fleet", **client_options: Any) -> None:
        self.url = url
        self.key_prefix = key_prefix
        try:
            if is_sentinel(url):
                parse_sentinel_url(url)
            else:
                parse_url(url)
        except ValueError as error:  # e.g. an unknown scheme or a port out of range
            raise ConfigError(
                f"invalid Redis journal URL {mask_url(url)}: {error}", key="store"
            ) from None
        self._clients = per_loop(url, retry=is_sentinel(url), **client_options)
        self._group = GroupCommit(self._write_batch)

    @property
    def _client(self) -> Any:  # redis-py's command annotations reject plain str mappings
        """The running event loop's client."""
        return self._clients.get()

    def __repr__(self) -> str:
        return f"RedisCheckpointStore({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def key(self, workflow_id: str) -> str:
        """The hash key holding ``workflow_id``'s journal."""
        return Keys(self.key_prefix).journal(workflow_id)

    def _error(self, action: str, workflow_id: str | None, error: RedisError) -> CheckpointError:
        return CheckpointError(
            f"cannot {action} in the Redis journal at {mask_url(self.url)}: "
            f"{type(error).__name__}: {error}",
            workflow_id=workflow_id,
        )

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        """The journal for ``workflow_id``, or ``None``; raises ``CheckpointError`` if bad."""
        try:
            fields: dict[bytes, bytes] = await self._client.hgetall(self.key(workflow_id))
        except RedisError as error:
            raise self._error("read a workflow", workflow_id, error) from error
        if not fields:
            return None
        meta: bytes | None = None
        steps: list[tuple[str, bytes]] = []
        for name, value in fields.items():
            try:
                field = name.decode()
            except UnicodeDecodeError:
                field = repr(name)
            if field == "meta":
                meta = value
            elif field.startswith(_STEP):
                steps.append((field[len(_STEP) :], value))
            else:
                raise CheckpointError(
                    f"workflow checkpoint {workflow_id!r} is unreadable: unexpected field "
                    f"{field!r} in {self.key(workflow_id)!r}",
                    workflow_id=workflow_id,
                )
        return decode_checkpoint(workflow_id, meta, steps)

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        """Append or replace one step's record; returns once Redis has it."""
        await self._group.submit(workflow_id, record)

    async def _write_batch(self, batch: Batch) -> None:
        calls: list[tuple[str, list[str]]] = []
        by_workflow: dict[str, list[str]] = {}
        for workflow_id, record in batch:
            by_workflow.setdefault(workflow_id, []).extend(
                (_STEP + record.task_id, record.to_json())
            )
        for workflow_id, fields in by_workflow.items():
            meta = encode_meta(workflow_id)
            for start in range(0, len(fields), 2 * _CHUNK):
                calls.append((self.key(workflow_id), [meta, *fields[start : start + 2 * _CHUNK]]))
        client = self._client
        journal = script("journal_record")
        try:
            if len(calls) == 1:
                key, args = calls[0]
                await journal.run(client, [key], args)
                return
            async with client.pipeline(transaction=False) as pipe:
                for key, args in calls:
                    journal.queue(pipe, [key], args)
                await execute_async(pipe)
        except RedisError as error:
            raise self._error("record a step", batch[0][0], error) from error

    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        """Replace the journal of ``checkpoint.workflow_id`` with ``checkpoint`` (atomically)."""
        key = self.key(checkpoint.workflow_id)
        mapping = {"meta": encode_meta(checkpoint.workflow_id, checkpoint.schema_version)}
        for record in checkpoint.steps:
            mapping[_STEP + record.task_id] = record.to_json()
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                await pipe.execute()
        except RedisError as error:
            raise self._error("save a workflow", checkpoint.workflow_id, error) from error

    async def delete(self, workflow_id: str) -> bool:
        """Remove the journal; returns whether there was one."""
        try:
            removed: int = await self._client.delete(self.key(workflow_id))
        except RedisError as error:
            raise self._error("delete a workflow", workflow_id, error) from error
        return removed > 0

    async def list_workflows(self) -> list[str]:
        """Workflow ids with a journal under this store's prefix, sorted (uses ``SCAN``)."""
        head = Keys(self.key_prefix).head("journal")
        pattern = _glob_escape(head) + "*"
        found: list[str] = []
        try:
            async for name in self._client.scan_iter(match=pattern, count=1000):
                found.append(untagged(name.decode(errors="replace")[len(head) :]))
        except RedisError as error:
            raise self._error("list workflows", None, error) from error
        return sorted(found)

    async def close(self) -> None:
        """Close this event loop's connection pool (another loop's closes with its loop)."""
        await self._clients.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
