"""Resumable barrier fan-out: an interrupted round picks up where it stopped.

Each successful step is journaled the moment it finishes (one O(1) record). Re-running the
round with the same ``workflow_id`` serves journaled steps from the journal without calling
the executor, on this machine or any other that reads the same store. A journal that
cannot be trusted stops the round before anything runs: re-running work whose side
effects may already have happened could do them twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from .checkpoint import WorkflowStepRecord
from .combinators import run_round
from .events import EventSink
from .executor import AgentExecutor
from .spec import AgentStepSpec, StepOutcome
from .stores.base import CheckpointStore

__all__ = ["execute_steps_parallel_resumable"]

logger = logging.getLogger(__name__)


def _refuse_all(
    specs: Sequence[AgentStepSpec], workflow_id: str, error: Exception
) -> list[StepOutcome]:
    reason = str(error) if error.args else type(error).__name__
    message = (
        f"workflow checkpoint cannot be resumed: {reason}. The journal was left in place; "
        f"inspect it with `fleet journal show {workflow_id}` and remove it with "
        f"`fleet journal rm {workflow_id}` to start this round over."
    )
    return [
        StepOutcome.failed(spec.task_id, spec.agent, message, error="checkpoint") for spec in specs
    ]


def _duplicate(spec: AgentStepSpec) -> StepOutcome:
    return StepOutcome.failed(
        spec.task_id,
        spec.agent,
        f"workflow step id {spec.task_id!r} is duplicated; refusing all steps with this id "
        "(give every step of a round its own task_id)",
        error="duplicate_task_id",
    )


async def execute_steps_parallel_resumable(
    executor: AgentExecutor,
    specs: Sequence[AgentStepSpec],
    workflow_id: str,
    store: CheckpointStore,
    *,
    events: EventSink | None = None,
    keep_journal: bool = False,
) -> list[StepOutcome]:
    """Fan ``specs`` out like ``execute_steps_parallel``, journaled under ``workflow_id``.

    - Steps already journaled are returned unchanged from the journal, without running
      and without events. Journaled steps absent from ``specs`` are ignored (kept).
    - Only successful steps are journaled, each as soon as it finishes; a failed step
      runs again next time. A record that cannot be saved is logged and the run goes on.
    - A task id occurring more than once is refused: every occurrence fails with
      ``error="duplicate_task_id"`` and none of them runs.
    - If the journal is unreadable, belongs to another id, has a future schema version,
      or holds a step whose identity (agent, prompt, description, max_steps,
      parent_session_id, output_schema) changed ("stale"), nothing runs: every outcome
      fails with ``error="checkpoint"`` and "cannot be resumed", and the journal is left
      for you to inspect (``fleet journal show``) or remove (``fleet journal rm``).
    - When every outcome succeeded the journal is deleted, unless ``keep_journal``.

    Args:
        executor: runs the pending steps (through its native round shape if it has one).
        specs: the round's steps.
        workflow_id: the journal's key; the same id resumes the same journal.
        store: where the journal lives.
        events: sink for the executor's step events.
        keep_journal: keep the journal after full success (the ``Workflow`` facade does,
            until ``finish()``).

    Returns:
        One outcome per spec, in input order.
    """
    specs = list(specs)
    counts = Counter(spec.task_id for spec in specs)
    duplicated = {task_id for task_id, count in counts.items() if count > 1}

    try:
        checkpoint = await store.load(workflow_id)
        if checkpoint is not None:
            checkpoint.validate_for_specs(workflow_id, specs)
    except Exception as error:
        logger.warning(
            "workflow %r: journal cannot be resumed, running nothing: %s", workflow_id, error
        )
        return _refuse_all(specs, workflow_id, error)
    cached = {} if checkpoint is None else checkpoint.completed()

    pending = [
        index
        for index, spec in enumerate(specs)
        if spec.task_id not in duplicated and spec.task_id not in cached
    ]
    pending_specs = [specs[index] for index in pending]

    async def journal(position: int, outcome: StepOutcome) -> None:
        if not outcome.success:
            return
        spec = pending_specs[position]
        try:
            record = WorkflowStepRecord.for_outcome(workflow_id, spec, outcome)
            await store.record_step(workflow_id, record)
        except Exception as error:
            # Losing a journal record must not fail the live run; the step re-runs on resume.
            logger.warning(
                "workflow %r: could not journal step %r (%s: %s); it will run again on resume",
                workflow_id,
                spec.task_id,
                type(error).__name__,
                error,
            )

    fresh = await run_round(
        executor, pending_specs, events=events, on_outcome=journal, workflow_id=workflow_id
    )

    results: list[StepOutcome | None] = [None] * len(specs)
    for index, outcome in zip(pending, fresh, strict=True):
        results[index] = outcome
    for index, spec in enumerate(specs):
        if spec.task_id in duplicated:
            results[index] = _duplicate(spec)
        elif results[index] is None:
            results[index] = cached[spec.task_id]
    outcomes = [outcome for outcome in results if outcome is not None]

    if not keep_journal and all(outcome.success for outcome in outcomes):
        try:
            await store.delete(workflow_id)
        except Exception as error:
            logger.warning(
                "workflow %r finished but its journal could not be deleted (%s: %s)",
                workflow_id,
                type(error).__name__,
                error,
            )
    return outcomes
