"""The worker's tasks: ``fleet.run_step`` (one step) and ``fleet.run_stage`` (one chain link).

Both are sync shims at the edge: each decodes its JSON message (a poison message is
rejected with a logged reason and never executed), claims the step (a done-marker or
a live lease elsewhere means this delivery is a duplicate: the agent does not run
twice), runs the shared step body :func:`fleet.step.run_agent` on this thread's event
loop, records the outcome and tells the host on its reply list. Everything on the wire
(messages, notices, keys, ids, TTLs, Lua) comes from :mod:`fleet.celery.protocol`.

The raw Celery tasks the benchmarks measure fleet against are registered by the
benchmarks' own app (``bench/celery_app.py``), never here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery
from celery.exceptions import Reject

from fleet.cancel.signal import cancelled_outcome
from fleet.celery.protocol import (
    STAGE_TASK,
    STEP_TASK,
    Finished,
    PipelineContext,
    StageMessage,
    Started,
    StepMessage,
    Stopped,
    decode,
    stage_link_id,
)
from fleet.errors import PoisonMessageError, SpecError
from fleet.spec import StepOutcome

from .runtime import WorkerRuntime

__all__ = [
    "PoisonMessage",
    "WorkerRuntime",
    "register_tasks",
]

logger = logging.getLogger("fleet.worker")

PoisonMessage = PoisonMessageError
"""The old name of :class:`fleet.errors.PoisonMessageError` (still importable here)."""


# --------------------------------------------------------------------------- tasks


def _summary(outcome: StepOutcome, what: str = "") -> str:
    """What a task returns (and Flower shows as its result): never the output or the prompt.

    One line (``step s1 (llm): succeeded``) rather than a dict: Celery renders every
    return value for its ``task-succeeded`` event, and a dict costs that over ten times
    what a string does, on every step.
    """
    return _said(outcome.task_id, outcome.agent, what or _state(outcome))


def _said(task_id: str, agent: str, what: str) -> str:
    return f"step {task_id} ({agent}): {what}"


def _state(outcome: StepOutcome) -> str:
    return "succeeded" if outcome.success else f"failed ({outcome.error})"


def run_step(runtime: WorkerRuntime, request: Any, payload: object) -> str:
    """The body of ``fleet.run_step``."""
    tid, worker = request.id, request.hostname or "worker"
    try:
        message = decode(StepMessage, payload)
        runtime.check_reply(message.reply)
    except PoisonMessageError as error:
        logger.error("rejected %s message %s: %s; it will not run", STEP_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    spec = message.spec
    notice = ""
    if message.announce:
        notice = Started(id=tid, task_id=spec.task_id, agent=spec.agent, worker=worker).to_json()
    steps = message.record or message.nonce
    status, value = runtime.claim(tid, message.nonce, message.reply, notice, message.cancel, steps)
    if status == "cancelled":
        # The workflow (or this round) was cancelled while the message waited: drop it.
        dropped = Finished(id=tid, outcome=cancelled_outcome(spec, value, worker=worker))
        runtime.notify(message.reply, dropped.to_json())
        logger.info("step %s (task %s) was cancelled; dropped unrun", spec.task_id, tid)
        return _said(spec.task_id, spec.agent, "cancelled before it ran")
    if status == "done":
        # A duplicate of a step that already finished: hand back the recorded outcome.
        recorded = Finished(id=tid, outcome=StepOutcome.from_json(value))
        runtime.notify(message.reply, recorded.to_json())
        logger.info("step %s (task %s) already ran; not running it again", spec.task_id, tid)
        return _said(spec.task_id, spec.agent, "duplicate (already ran)")
    if status == "held":
        logger.info("step %s (task %s) is running elsewhere; duplicate dropped", spec.task_id, tid)
        return _said(spec.task_id, spec.agent, "duplicate (running elsewhere)")
    if status == "over":
        logger.info(
            "step %s (task %s) already ran and was read; duplicate dropped", spec.task_id, tid
        )
        return _said(spec.task_id, spec.agent, "duplicate (already read)")
    try:
        lease = runtime.keys.lease(tid)
        outcome = runtime.execute(
            spec, worker, message, tid=tid, markers=message.cancel, lease=lease
        )
    except BaseException:
        runtime.abandon(tid, value)  # let the lease lapse: the host will send the step again
        raise
    # Any outcome answers duplicates of this dispatch; a journaled success also answers a
    # host that resumes the workflow (a failure runs again on resume). Only while this
    # attempt's lease holds (fencing): else another attempt owns the step.
    journal = None
    if message.journal and message.workflow_id and outcome.success:
        journal = runtime.journal_write(message.workflow_id, spec, outcome)
    hold = message.budget
    resumable = outcome.success and message.workflow_id is not None
    # With a hold, recorded and settled in one script: the notice says the host need not settle.
    notice = Finished(
        id=tid, outcome=outcome, settled=hold is not None, journaled=journal is not None
    ).to_json()
    counted = runtime.finish(
        tid, message.nonce, value, outcome.to_json(), message.reply, notice,
        resumable=resumable, steps=steps, journal=journal,
        hold=hold, used_tokens=outcome.usage.total_tokens,
    )  # fmt: skip
    if not counted:
        logger.warning(
            "step %s (task %s): its lease lapsed before it was recorded; its outcome "
            "is dropped (the host sends the step again)",
            spec.task_id,
            tid,
        )
        return _summary(outcome, f"{_state(outcome)}, dropped (lease lapsed)")
    return _summary(outcome)


def _stop_chain(request: Any) -> None:
    """Send no further link of this chain (Celery reads ``request.chain`` after we return)."""
    request.chain = None
    request.callbacks = None


def run_stage(runtime: WorkerRuntime, request: Any, pointer: object) -> str | dict[str, Any]:
    """The body of ``fleet.run_stage``: one stage of one item's chain.

    Returns the pointer the next link receives, or stops the chain (the stage returned
    ``None``, crashed, or its step failed, or this delivery is a duplicate).
    """
    tid, worker = request.id, request.hostname or "worker"
    try:
        message = decode(StageMessage, pointer)
    except PoisonMessageError as error:
        logger.error("rejected %s message %s: %s; it will not run", STAGE_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    i, k = message.item, message.stage
    link = stage_link_id(message.pipe, i, k)
    status, context_raw, item_raw, prev_raw, owner = runtime.begin_link(message)
    if status == "expired":
        logger.warning("pipeline %s item #%d: its context expired; chain dropped", message.pipe, i)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "expired": True}
    if status != "claimed":
        logger.info("link %s already ran or is running; duplicate dropped", link)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "duplicate": True}
    try:
        context = PipelineContext.from_json(context_raw)
        reply, names = context.reply, context.stages
        runtime.check_reply(reply)
        stage = runtime.stages[names[k]]
    except (PoisonMessageError, SpecError, IndexError, KeyError) as error:
        runtime.abandon(link, owner)
        logger.error("rejected %s message %s: %s; it will not run", STAGE_TASK, tid, error)
        raise Reject(f"poison message: {error}", requeue=False) from None
    prev = StepOutcome.from_json(prev_raw) if k else None
    try:
        spec = stage(prev, json.loads(item_raw))
        crashed = False
    except Exception as error:
        logger.warning(
            "pipeline %s item #%d stage %r crashed: %s: %s",
            message.pipe,
            i,
            names[k],
            type(error).__name__,
            error,
        )
        spec, crashed = None, True
    if spec is not None and context.announce:
        started = Started(id=link, task_id=spec.task_id, agent=spec.agent, worker=worker)
        runtime.notify(reply, started.to_json())
    if spec is None:
        stop = Stopped(id=link, outcome=None if crashed else prev).to_json()
        runtime.finish(link, context.nonce, owner, stop, reply, stop)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "stopped": True}
    reason = runtime.cancel_reason(context.cancel)
    try:
        if reason is not None:  # the pipeline was cancelled while this link waited
            outcome = cancelled_outcome(spec, reason, worker=worker)
        else:
            lease = runtime.keys.lease(link)
            outcome = runtime.execute(
                spec, worker, None, markers=context.cancel, lease=lease, deltas=context.deltas
            )
    except BaseException:
        runtime.abandon(link, owner)
        raise
    record = outcome.to_json()
    notice = Finished(id=link, outcome=outcome).to_json()
    if not runtime.finish(link, context.nonce, owner, record, reply, notice):
        logger.warning("link %s: its lease lapsed before it was recorded; dropped", link)
        _stop_chain(request)
        return {"pipe": message.pipe, "item": i, "stage": k, "fenced": True}
    if not outcome.success or k + 1 >= len(names):
        _stop_chain(request)
        return _summary(outcome)
    return message.next().to_json()


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register fleet's tasks on ``app``, bound to ``runtime``."""

    # shared=False: a shared task would be added to every Celery app created later in this
    # process, bound to this runtime (and clash with that app's own registration).
    @app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
        name=STEP_TASK,
        bind=True,
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def fleet_run_step(self: Any, payload: object) -> str:
        return run_step(runtime, self.request, payload)

    @app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
        name=STAGE_TASK,
        bind=True,
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def fleet_run_stage(self: Any, pointer: object) -> str | dict[str, Any]:
        return run_stage(runtime, self.request, pointer)

    _ = (fleet_run_step, fleet_run_stage)
