"""The journal's serialisable view: which steps of a workflow completed, and with what result.

A journal holds one :class:`WorkflowStepRecord` per successfully completed step. Each
record carries a *step identity*: a SHA-256 digest over the workflow id and the spec's
identity fields (agent, prompt, description, ...). On resume the digest is recomputed from
the current spec; a task id reused for a different invocation is refused as stale instead
of being served someone else's result. The digest needs no prompt or output plaintext.

Stores (``fleet.stores``) persist records one at a time; :class:`WorkflowCheckpoint` is
what they load. Unknown keys are ignored on read; a missing ``schema_version`` reads as 0
(pre-v1) and loads; a future version is refused by :meth:`WorkflowCheckpoint.ensure_loadable`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, Self

from pydantic import Field

from .errors import CheckpointError
from .spec import AgentStepSpec, FleetModel, StepOutcome

__all__ = [
    "STEP_IDENTITY_DOMAIN",
    "WORKFLOW_CHECKPOINT_SCHEMA_VERSION",
    "WorkflowCheckpoint",
    "WorkflowStepRecord",
    "canonical_json",
    "now_ms",
    "step_identity",
]

WORKFLOW_CHECKPOINT_SCHEMA_VERSION = 1
"""The journal format this build writes, and the newest it will read."""

STEP_IDENTITY_DOMAIN = "fleet.workflow-step.identity.v1"
"""Domain string the step identity digest is computed under."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def now_ms() -> int:
    """Wall-clock time as Unix epoch milliseconds."""
    return time.time_ns() // 1_000_000


def canonical_json(value: Any) -> str:
    """Compact JSON with object keys sorted recursively and non-ASCII kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def step_identity(workflow_id: str, spec: AgentStepSpec) -> str:
    """The digest binding a journaled result to this exact invocation of a step.

    SHA-256 over ``STEP_IDENTITY_DOMAIN``, a 0x00 byte and the canonical JSON of
    ``workflow_id`` plus :meth:`AgentStepSpec.identity` (task id, agent, description,
    prompt, max_steps, parent_session_id, output_schema; unset ones as ``null``).

    Returns:
        ``"sha256:"`` followed by 64 lowercase hex digits.
    """
    payload = {"workflow_id": workflow_id, **spec.identity()}
    digest = hashlib.sha256(STEP_IDENTITY_DOMAIN.encode())
    digest.update(b"\x00")
    digest.update(canonical_json(payload).encode())
    return "sha256:" + digest.hexdigest()


class WorkflowStepRecord(FleetModel):
    """One completed step in a journal."""

    task_id: str
    """The step's task id; must equal ``outcome.task_id``."""
    outcome: StepOutcome
    """The result served, unchanged, when the workflow is resumed."""
    identity: str | None = None
    """``step_identity`` of the spec that produced it; ``None`` on legacy records, which
    are served without an identity check."""
    recorded_ms: int = 0
    """When the step was journaled, Unix epoch milliseconds."""

    @classmethod
    def for_outcome(
        cls, workflow_id: str, spec: AgentStepSpec, outcome: StepOutcome
    ) -> WorkflowStepRecord:
        """The record that journals ``outcome`` as the result of ``spec``.

        Raises:
            CheckpointError: ``outcome`` belongs to another task id (such a record would
                make the whole journal unloadable).
        """
        if outcome.task_id != spec.task_id:
            raise CheckpointError(
                f"cannot journal step {spec.task_id!r}: its outcome names task id "
                f"{outcome.task_id!r}; an executor must return the spec's task id",
                workflow_id=workflow_id,
            )
        return cls(
            task_id=spec.task_id,
            outcome=outcome,
            identity=step_identity(workflow_id, spec),
            recorded_ms=now_ms(),
        )


class WorkflowCheckpoint(FleetModel):
    """Everything a journal holds for one workflow id: its completed steps."""

    schema_version: int = 0
    """Format version; written as ``WORKFLOW_CHECKPOINT_SCHEMA_VERSION``, 0 when absent."""
    workflow_id: str
    """The id the journal is keyed by."""
    steps: tuple[WorkflowStepRecord, ...] = ()
    """Completed steps; their order carries no meaning."""
    checkpoint_ms: int = Field(default=0)
    """When the journal was last written, Unix epoch milliseconds."""

    @classmethod
    def from_records(
        cls, workflow_id: str, records: Iterable[WorkflowStepRecord], *, schema_version: int = 1
    ) -> Self:
        """A checkpoint of ``records``, stamped with the newest record's time."""
        steps = tuple(records)
        stamp = max((record.recorded_ms for record in steps), default=0)
        return cls(
            schema_version=schema_version,
            workflow_id=workflow_id,
            steps=steps,
            checkpoint_ms=stamp,
        )

    def completed(self) -> dict[str, StepOutcome]:
        """Task id to cached outcome (a later record for the same id wins)."""
        return {record.task_id: record.outcome for record in self.steps}

    def ensure_loadable(self) -> None:
        """Check that this build can trust the checkpoint at all.

        Raises:
            CheckpointError: a future ``schema_version``, a record whose task id differs
                from its outcome's, or a malformed identity digest.
        """
        wid = self.workflow_id
        if self.schema_version > WORKFLOW_CHECKPOINT_SCHEMA_VERSION:
            raise CheckpointError(
                f"workflow checkpoint {wid!r} has schema version {self.schema_version} but "
                f"this build supports at most {WORKFLOW_CHECKPOINT_SCHEMA_VERSION}; refusing "
                "to resume from an incompatible future checkpoint (upgrade fleet to resume it)",
                workflow_id=wid,
            )
        if self.schema_version < 0:
            raise CheckpointError(
                f"workflow checkpoint {wid!r} has invalid schema version {self.schema_version}",
                workflow_id=wid,
            )
        for record in self.steps:
            if record.task_id != record.outcome.task_id:
                raise CheckpointError(
                    f"workflow checkpoint {wid!r} has task id mismatch for step "
                    f"{record.task_id!r}: its outcome belongs to {record.outcome.task_id!r}",
                    workflow_id=wid,
                )
            if record.identity is not None and not _DIGEST.fullmatch(record.identity):
                raise CheckpointError(
                    f"workflow checkpoint {wid!r} has a malformed identity for step "
                    f"{record.task_id!r} (expected 'sha256:' and 64 hex digits)",
                    workflow_id=wid,
                )

    def validate_for_specs(self, workflow_id: str, specs: Sequence[AgentStepSpec]) -> None:
        """Check that the journaled results may be served for ``specs`` under ``workflow_id``.

        Every record whose task id appears in ``specs`` and carries an identity must match
        the identity recomputed from the first spec with that id. Legacy records (no
        identity) and records for ids not in ``specs`` pass unchecked.

        Raises:
            CheckpointError: not loadable (see :meth:`ensure_loadable`), keyed to another
                workflow id, or a stale identity (the task id was reused for a different
                agent, prompt, description, max_steps, parent_session_id or output_schema).
        """
        self.ensure_loadable()
        if self.workflow_id != workflow_id:
            raise CheckpointError(
                f"workflow checkpoint is keyed to {self.workflow_id!r}, not {workflow_id!r}",
                workflow_id=workflow_id,
            )
        first: dict[str, AgentStepSpec] = {}
        for spec in specs:
            first.setdefault(spec.task_id, spec)
        for record in self.steps:
            current = first.get(record.task_id)
            if current is None or record.identity is None:
                continue
            if step_identity(workflow_id, current) != record.identity:
                raise CheckpointError(
                    f"workflow checkpoint {workflow_id!r} has a stale result identity for step "
                    f"{record.task_id!r}: it was journaled for a different agent, prompt, "
                    "description, max_steps, parent_session_id or output_schema; give the "
                    "changed step a new task id, or remove the journal to start over",
                    workflow_id=workflow_id,
                )
