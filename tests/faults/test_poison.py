"""Poison messages published with kombu straight onto the steps queue.

Each trial: its own redis-server and one worker. Four messages that must never run are
published with a bare kombu producer (no fleet host, no Celery app):

* a task message whose body is not valid JSON (valid JSON with trailing garbage);
* a well-formed task whose step argument is not valid JSON (a truncated step message);
* a step message with an unknown schema version (``v: 99``);
* a pickle message (``application/x-python-serialize``) carrying a valid step.

Every one of them names an agent that would leave a counter file if it ran. Each must be
refused with its reason in the worker's log, never executed, and taken off the queue
for good (not left unacknowledged for redelivery); the worker keeps serving: a valid
step sent afterwards succeeds on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from fleet import AgentStepSpec, execute_steps_parallel
from fleet.celery import PROTOCOL_VERSION, CeleryExecutor, StepMessage
from fleet.config import FleetSettings
from tests.celery_support import step_task_headers, until
from tests.faults.support import (
    attempts,
    fresh_redis,
    fresh_workers,
    run_trials,
    specs,
    trial_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults]

TRIALS = 3


PROMPT = "confidential-prompt-7f3a"
"""The poison messages' prompt: it must not reach the worker's log."""


def step_message(settings: FleetSettings, task_id: str, **changes: Any) -> str:
    """A valid step message for ``task_id`` (agent ``attempt``), with ``changes`` applied."""
    spec = AgentStepSpec(task_id=task_id, agent="attempt", description="poison", prompt=PROMPT)
    message = StepMessage(
        v=PROTOCOL_VERSION, spec=spec, reply=f"{settings.key_prefix}:reply:poison", nonce="n"
    ).to_dict()
    return json.dumps({**message, **changes})


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def publish_poison(settings: FleetSettings) -> None:
    with Connection(settings.redis_url) as connection:
        producer = connection.Producer()

        def publish(task_id: str, body: Any, **options: Any) -> None:
            producer.publish(
                body,
                exchange="",
                routing_key=settings.queue,
                headers=step_task_headers(task_id, argsrepr=task_id, origin="faults"),
                correlation_id=task_id,
                **options,
            )

        good = step_message(settings, "poison-body")
        raw = json.dumps([[good], {}, EMBED]) + " trailing garbage"
        publish(
            "poison-body",
            raw.encode(),
            content_type="application/json",
            content_encoding="utf-8",
        )
        truncated = step_message(settings, "poison-json")[:-1]
        publish("poison-json", [[truncated], {}, EMBED], serializer="json")
        future = step_message(settings, "poison-version", v=99)
        publish("poison-version", [[future], {}, EMBED], serializer="json")
        pickled = step_message(settings, "poison-pickle")
        publish("poison-pickle", ([pickled], {}, EMBED), serializer="pickle")


async def one_trial(directory: Path, logs: list[str] | None = None) -> str:
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    with fresh_redis(directory) as server:
        settings = trial_settings(server.url)
        with fresh_workers(settings, directory, ["worker1"], concurrency=2, env=env) as fleet:
            worker = fleet.workers["worker1"]
            publish_poison(settings)
            executor = CeleryExecutor(settings=settings)
            try:
                (after,) = await execute_steps_parallel(executor, specs(1, "after"))
            finally:
                await executor.aclose()
            client = redis.Redis.from_url(settings.redis_url)
            try:
                # Refused for good: nothing left queued or unacknowledged for redelivery.
                await until(
                    lambda: client.llen(settings.queue) == 0 and client.hlen("unacked") == 0,
                    10,
                    "the queue and the unacked set to drain",
                )
            finally:
                client.close()
            reasons = {
                "poison-body": "Can't decode message body",
                "poison-json": "rejected fleet.run_step message poison-json: not valid JSON",
                "poison-version": (
                    "rejected fleet.run_step message poison-version: unknown message schema "
                    "version 99"
                ),
                "poison-pickle": "Refusing to deserialize untrusted content of type pickle",
            }
            await until(
                lambda: all(reason in worker.log_text() for reason in reasons.values()),
                10,
                "every poison message's reason in the worker log",
            )
            alive = worker.process.poll() is None
            if logs is not None:
                logs.append(worker.log_text())

    assert after.success and after.output == "p0" and after.worker == worker.node, after
    assert alive, "the worker died"
    assert set(attempts(counter_dir)) == {"after0"}, "a poison message ran"
    return "4 poison messages refused with their reasons, none ran; the next step succeeded"


@pytest.mark.timeout(300)
async def test_poison_messages_are_refused(tmp_path: Path) -> None:
    """Malformed JSON, unknown schema version, pickle: refused, logged, never run."""
    await run_trials("poison_message", TRIALS, tmp_path, lambda n, d: one_trial(d))


async def test_refused_poison_message_does_not_log_its_prompt(tmp_path: Path) -> None:
    """The logged reason of a refused message names it, but never quotes its prompt."""
    logs: list[str] = []
    await one_trial(tmp_path, logs)
    (log,) = logs
    leaked = [line[:160] for line in log.splitlines() if PROMPT in line]
    assert not leaked, f"the worker log quotes a refused message's prompt: {leaked}"
