"""What a worker spends per step besides the step: task events in batches, no INFO line, a short result."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import signals

from fleet import AgentContext, AgentStepSpec, execute_steps_parallel
from fleet.agents import AgentRegistry
from fleet.celery import PROTOCOL_VERSION, STEP_TASK, StepMessage
from tests.celery_support import BrokerLog, fleet_settings, running_workers
from tests.test_security import EventTap, wait_until
from workers.app import (
    GC_THRESHOLDS,
    PER_STEP_LOGGERS,
    create_app,
    freeze_startup_objects,
    quiet_per_step_lines,
)
from workers.events import FLUSH_INTERVAL_S
from workers.runtime import WorkerRuntime
from workers.tasks import run_step

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


async def test_task_events_go_out_in_batches_and_all_arrive(redis_url: str, tmp_path: Path) -> None:
    """60 quick steps on -c 8: task-event publishes come a flush interval apart, none lost.

    The host's ``task-sent`` events arrive too, one message per batch of sends.

    The worker runs at ``--loglevel INFO``: its log has no line per step.
    """
    settings = fleet_settings(redis_url)
    specs = [
        AgentStepSpec(task_id=f"e{i}", agent="noop", description="d", prompt="p") for i in range(60)
    ]
    with running_workers(settings, tmp_path, "worker1", concurrency=8) as fleet:
        executor = fleet.executor()
        try:
            with EventTap(settings) as tap, BrokerLog(settings.redis_url) as log:
                outcomes = await execute_steps_parallel(executor, specs)
                # The host's task-sent events linger (up to 50 ms, more on a busy loop), so
                # the last of them may arrive after the workers' task-succeeded.
                await asyncio.to_thread(
                    wait_until,
                    lambda: all(
                        sum(e.get("type") == kind for e in tap.events) >= 60
                        for kind in ("task-sent", "task-succeeded")
                    ),
                    10,
                )
        finally:
            await executor.aclose()
        worker_log = fleet.workers["worker1"].log_text()
    assert "fleet.run_step[" not in worker_log, worker_log[-2000:]  # "received", "succeeded"
    assert "ready." in worker_log  # the worker's other INFO lines still show
    assert all(outcome.success for outcome in outcomes)
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert sum(e.get("type") == kind for e in tap.events) == 60, kind
    sent = [e for e in tap.events if e.get("type") == "task-sent"]
    assert {e["name"] for e in sent} == {STEP_TASK} and len({e["uuid"] for e in sent}) == 60
    assert all(e["queue"] == settings.queue and e["hostname"] for e in sent)
    # The host's task-sent events go out in one message per batch of sends, not one each.
    published = [c for c in log.commands if c.name == "PUBLISH" and b"celeryev" in c.args[1]]
    assert len(published) < 30, [c.args[1] for c in published]
    batches = sorted(
        c.at
        for c in log.commands
        if c.name == "PUBLISH"
        and b"celeryev" in c.args[1]
        and c.args[1].endswith(b"task.multi")
        and "task-sent" not in _event_types(c.args[2])  # the host's (it lingers on its own)
    )
    assert len(batches) >= 2
    gaps = [later - earlier for earlier, later in zip(batches, batches[1:], strict=False)]
    assert min(gaps) >= FLUSH_INTERVAL_S / 2, gaps  # Redis's clock: the timer's pace


def _event_types(payload: bytes) -> set[str]:
    """The types of the Celery events in one published kombu message."""
    message = json.loads(payload)
    body = json.loads(base64.b64decode(message["body"]))
    return {event["type"] for event in (body if isinstance(body, list) else [body])}


def test_celerys_per_step_lines_show_at_debug_only() -> None:
    """The worker's ``after_setup_logger`` hook: quiet at INFO and WARNING, on at DEBUG."""
    try:
        for level, shown in [(logging.INFO, False), ("WARNING", False), (logging.DEBUG, True)]:
            quiet_per_step_lines(loglevel=level)
            for name in PER_STEP_LOGGERS:
                logger = logging.getLogger(name)
                assert (logger.level in (logging.NOTSET, logging.DEBUG)) is shown, (level, name)
    finally:
        for name in PER_STEP_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_ready_worker_moves_its_startup_objects_out_of_full_collections(
    redis_url: str,
) -> None:
    """The ``worker_ready`` hook freezes what start built and collects the young less often."""
    create_app(fleet_settings(redis_url))
    hooks = [
        receiver() if isinstance(receiver, weakref.ReferenceType) else receiver
        for _, receiver in signals.worker_ready.receivers
    ]
    assert freeze_startup_objects in hooks
    before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    try:
        freeze_startup_objects(sender=None)
        assert gc.get_freeze_count() > before
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _answer(spec: AgentStepSpec, ctx: AgentContext) -> str:
    return f"the answer to {spec.prompt}"


def test_a_step_task_returns_one_line_without_output_or_prompt(redis_url: str) -> None:
    """What Flower shows as the result: ``step ID (AGENT): succeeded``, a string.

    Celery renders every return value for its ``task-succeeded`` event; a string is the
    cheap one to render.
    """
    settings = fleet_settings(redis_url)
    runtime = WorkerRuntime(settings, AgentRegistry({"answer": _answer}), {})
    spec = AgentStepSpec(task_id="r1", agent="answer", description="d", prompt="secret-q")
    message = StepMessage(
        v=PROTOCOL_VERSION, spec=spec, reply=runtime.keys.reply("r"), nonce="n-r1"
    )
    request = SimpleNamespace(id="tid-r1", hostname="w@h")
    assert run_step(runtime, request, message.to_json()) == "step r1 (answer): succeeded"
    again = run_step(runtime, request, message.to_json())
    assert again == "step r1 (answer): duplicate (already ran)"
