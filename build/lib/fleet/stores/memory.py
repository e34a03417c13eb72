"""A journal in this process's memory: for tests and for workflows that need no durability."""

from __future__ import annotations

from ..checkpoint import WorkflowCheckpoint, WorkflowStepRecord
from .base import CheckpointStore, decode_checkpoint, encode_meta

__all__ = ["MemoryCheckpointStore"]


class _Journal:
    __slots__ = ("meta", "steps")

    def __init__(self, meta: str) -> None:
        self.meta = meta
        self.steps: dict[str, str] = {}


class MemoryCheckpointStore(CheckpointStore):
    """Journals kept in a dict, as JSON text, exactly as the durable stores keep them.

    Storing the encoded form means a loaded checkpoint never shares objects with the
    writer, and loading runs the same checks as SQLite and Redis. Lost when the process
    exits.
    """

    def __init__(self) -> None:
        self._journals: dict[str, _Journal] = {}

    def __repr__(self) -> str:
        return f"MemoryCheckpointStore(workflows={len(self._journals)})"

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        """The journal for ``workflow_id``, or ``None``; raises ``CheckpointError`` if bad."""
        journal = self._journals.get(workflow_id)
        if journal is None:
            return None
        return decode_checkpoint(workflow_id, journal.meta, list(journal.steps.items()))

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        """Append or replace one step's record."""
        journal = self._journals.get(workflow_id)
        if journal is None:
            journal = self._journals[workflow_id] = _Journal(encode_meta(workflow_id))
        journal.steps[record.task_id] = record.to_json()

    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        """Replace the journal of ``checkpoint.workflow_id`` with ``checkpoint``."""
        journal = _Journal(encode_meta(checkpoint.workflow_id, checkpoint.schema_version))
        for record in checkpoint.steps:
            journal.steps[record.task_id] = record.to_json()
        self._journals[checkpoint.workflow_id] = journal

    async def delete(self, workflow_id: str) -> bool:
        """Remove the journal; returns whether there was one."""
        return self._journals.pop(workflow_id, None) is not None

    async def list_workflows(self) -> list[str]:
        """Workflow ids with a journal, sorted."""
        return sorted(self._journals)
