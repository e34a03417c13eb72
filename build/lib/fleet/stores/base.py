"""The journal contract every store implements, and the decoding they share.

A store keeps, per workflow id, a small *meta* document
(``{"schema_version": 1, "workflow_id": ...}``) and one JSON record per completed step.
Appending a step touches only that step's record, so journaling costs the same at step
10,000 as at step 1. Loading reassembles a :class:`~fleet.checkpoint.WorkflowCheckpoint`
and refuses, with :class:`~fleet.errors.CheckpointError`, anything it cannot trust.
"""

from __future__ import annotations

import asyncio
import gc
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from ..checkpoint import WORKFLOW_CHECKPOINT_SCHEMA_VERSION, WorkflowCheckpoint, WorkflowStepRecord
from ..errors import CheckpointError
from ..perloop import PerLoop
from ..spec import describe_validation_error

__all__ = ["CheckpointStore", "GroupCommit", "decode_checkpoint", "encode_meta"]

Batch = list[tuple[str, WorkflowStepRecord]]
"""``(workflow_id, record)`` pairs written together."""


class CheckpointStore(ABC):
    """Where workflow journals live. All methods are coroutines; use one store per event loop.

    Stores are async context managers: ``async with SQLiteCheckpointStore(path) as store:``
    closes the store on exit.
    """

    @abstractmethod
    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        """The journal for ``workflow_id``, or ``None`` when there is none.

        The result has passed :meth:`WorkflowCheckpoint.ensure_loadable`.

        Raises:
            CheckpointError: the journal is unreadable, belongs to another workflow id, has
                a future schema version, or the store cannot be reached.
        """

    @abstractmethod
    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        """Append (or replace) the record of one completed step; O(1) in the journal size.

        Creates the journal, with this build's schema version, if it does not exist.
        """

    @abstractmethod
    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        """Replace the whole journal of ``checkpoint.workflow_id`` with ``checkpoint``.

        For importing or seeding a journal; a running workflow appends with
        :meth:`record_step` instead.
        """

    @abstractmethod
    async def delete(self, workflow_id: str) -> bool:
        """Remove the journal of ``workflow_id``, readable or not.

        Returns:
            Whether there was a journal to remove (deleting a missing one succeeds).
        """

    @abstractmethod
    async def list_workflows(self) -> list[str]:
        """The workflow ids that have a journal, sorted."""

    async def close(self) -> None:  # noqa: B027 - stores without resources need no close
        """Release connections and file handles; the store is unusable afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def encode_meta(workflow_id: str, schema_version: int = WORKFLOW_CHECKPOINT_SCHEMA_VERSION) -> str:
    """The meta document stored beside a journal's records."""
    return json.dumps(
        {"schema_version": schema_version, "workflow_id": workflow_id}, separators=(",", ":")
    )


def _decode_meta(workflow_id: str, raw: str | bytes | None) -> int:
    """Check a meta document and return its schema version (0 when absent)."""
    if raw is None:
        return 0
    try:
        meta: Any = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(
            f"workflow checkpoint {workflow_id!r} is unreadable: its meta document is not "
            f"valid JSON ({type(error).__name__})",
            workflow_id=workflow_id,
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"workflow checkpoint {workflow_id!r} is unreadable: its meta document is a "
            f"{type(meta).__name__}, not a JSON object",
            workflow_id=workflow_id,
        )
    version = meta.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"workflow checkpoint {workflow_id!r} is unreadable: schema_version is "
            f"{version!r}, not an integer",
            workflow_id=workflow_id,
        )
    owner = meta.get("workflow_id")
    if owner != workflow_id:
        raise CheckpointError(
            f"workflow checkpoint key mismatch: requested workflow {workflow_id!r}, "
            f"payload belongs to {owner!r}",
            workflow_id=workflow_id,
        )
    return version


def _decode_record(workflow_id: str, key: str, raw: str | bytes) -> WorkflowStepRecord:
    try:
        record = WorkflowStepRecord.model_validate_json(raw)
    except ValidationError as error:
        problem = describe_validation_error(error, "WorkflowStepRecord")
        raise CheckpointError(
            f"workflow checkpoint {workflow_id!r} is unreadable: the record for step "
            f"{key!r} is corrupt ({problem})",
            workflow_id=workflow_id,
        ) from None
    if record.task_id != key:
        raise CheckpointError(
            f"workflow checkpoint {workflow_id!r} has task id mismatch for step {key!r}: "
            f"the record stored under it is for {record.task_id!r}",
            workflow_id=workflow_id,
        )
    return record


def decode_checkpoint(
    workflow_id: str,
    meta: str | bytes | None,
    records: Iterable[tuple[str, str | bytes]],
) -> WorkflowCheckpoint:
    """Assemble and check a journal from its stored meta and ``(task_id, record JSON)`` pairs.

    Raises:
        CheckpointError: malformed meta or record, key mismatch, future schema version.
    """
    version = _decode_meta(workflow_id, meta)
    if version > WORKFLOW_CHECKPOINT_SCHEMA_VERSION:
        # Refuse on the version alone: a future format's records need not parse here.
        WorkflowCheckpoint(schema_version=version, workflow_id=workflow_id).ensure_loadable()
    # Decoding a long journal allocates many objects at once; pausing the cyclic collector
    # for this synchronous stretch (no awaits) spares repeated full passes over the heap.
    collecting = gc.isenabled()
    gc.disable()
    try:
        steps = [_decode_record(workflow_id, key, raw) for key, raw in records]
    finally:
        if collecting:
            gc.enable()
    checkpoint = WorkflowCheckpoint.from_records(workflow_id, steps, schema_version=version)
    checkpoint.ensure_loadable()
    return checkpoint


class _Ticket:
    __slots__ = ("error", "settled")

    def __init__(self) -> None:
        self.settled = False
        self.error: BaseException | None = None


class _Queue:
    __slots__ = ("lock", "pending")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.pending: list[tuple[str, WorkflowStepRecord, _Ticket]] = []


class GroupCommit:
    """Coalesces concurrent ``record_step`` calls into one write (a group commit).

    Each caller returns only once its own record has been written, exactly as if it had
    written alone, and raises if that write failed; callers that arrive while a write is
    in flight share the next one. A fan-out whose lanes finish together thus pays one
    round trip or one transaction instead of one each. One instance per store.

    Args:
        write: persists a batch of ``(workflow_id, record)`` pairs atomically, or raises.
    """

    def __init__(self, write: Callable[[Batch], Awaitable[None]]) -> None:
        self._write = write
        # One queue per event loop: a store may outlive an asyncio.run().
        self._queues: PerLoop[_Queue] = PerLoop(_Queue)

    async def submit(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        """Write ``record`` (with whatever else is waiting) and return once it is stored."""
        ticket = _Ticket()
        queue = self._queues.get()
        queue.pending.append((workflow_id, record, ticket))
        async with queue.lock:
            if not ticket.settled:
                await asyncio.sleep(0)  # let steps finishing right now join this batch
                batch, queue.pending = queue.pending, []
                try:
                    await self._write([(wid, rec) for wid, rec, _ in batch])
                except BaseException as error:
                    for _, _, other in batch:
                        other.settled, other.error = True, error
                    raise
                for _, _, other in batch:
                    other.settled = True
        if ticket.error is not None:
            raise CheckpointError(
                f"journal write for step {record.task_id!r} failed: "
                f"{type(ticket.error).__name__}: {ticket.error}",
                workflow_id=workflow_id,
            ) from ticket.error
