"""Fencing on a worker: a lapsed attempt is stopped and its writes are refused by Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from fleet import AgentContext, AgentStepSpec, StepOutcome, TokenUsage
from fleet.agents import AgentRegistry
from fleet.errors import AgentError
from fleet.keeper import Held
from tests.celery_support import fleet_settings
from workers.fencing import Fence, Fences
from workers.runtime import WorkerRuntime

pytestmark = [pytest.mark.redis]

CALLS: list[float] = []


async def calls_forever(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Makes a model call every 50 ms, each checked first, until something stops it."""
    while True:
        ctx.check_tokens(1)
        CALLS.append(time.monotonic())
        await asyncio.sleep(0.05)
        ctx.charge(TokenUsage(completion_tokens=1))


def test_a_lapsed_attempt_records_nothing_and_the_new_owner_records(redis_url: str) -> None:
    """finish.lua writes result, done-marker, journal and notice only for the lease's token.

    Two worker processes' runtimes: the first still believes it holds the step (its fence
    has not tripped), so only Redis can refuse its write.
    """
    settings = fleet_settings(redis_url, step_lease_s=5.0)
    runtime, other = (
        WorkerRuntime(settings, AgentRegistry(), {}),
        WorkerRuntime(settings, AgentRegistry(), {}),
    )
    client, keys = runtime.redis(), runtime.keys
    spec = AgentStepSpec(task_id="f1", agent="echo", description="", prompt="x")
    reply = keys.reply("fencing")
    status, first = runtime.claim("tid-f1", "n1", reply, "", [], "wf-f")
    assert status == "claimed"
    client.delete(keys.lease("tid-f1"))  # its lease lapsed...
    status, second = other.claim("tid-f1", "n1", reply, "", [], "wf-f")  # ...and was retaken
    assert status == "claimed" and second != first

    def finish(worker: WorkerRuntime, owner: str, output: str) -> bool:
        outcome = StepOutcome(
            task_id="f1", session_id="s", agent="echo", output=output, success=True
        )
        journal = runtime.journal_write("wf-f", spec, outcome)
        record = outcome.to_json()
        return worker.finish(
            "tid-f1",
            "n1",
            owner,
            record,
            reply,
            record,
            resumable=True,
            steps="wf-f",
            journal=journal,
        )

    assert finish(runtime, first, "stale") is False
    journal_key = runtime.journal().key("wf-f")
    assert client.get(keys.result("tid-f1", "n1")) is None
    assert client.hget(keys.steps("wf-f"), "done:tid-f1") is None
    assert client.exists(journal_key) == 0
    assert client.llen(reply) == 0
    assert client.get(keys.lease("tid-f1")) == second.encode()  # the new owner keeps it

    assert finish(other, second, "counted") is True
    assert StepOutcome.from_json(client.get(keys.result("tid-f1", "n1"))).output == "counted"
    assert client.hget(keys.steps("wf-f"), "done:tid-f1") is not None
    assert b"counted" in client.hget(journal_key, "step:f1")
    assert client.llen(reply) == 1
    assert client.exists(keys.lease("tid-f1")) == 0


def test_a_step_whose_lease_is_lost_is_stopped_and_makes_no_more_calls(redis_url: str) -> None:
    """The renewal finds the lease gone: the agent is interrupted, nothing is recorded."""
    settings = fleet_settings(redis_url, step_lease_s=0.6)
    runtime = WorkerRuntime(settings, AgentRegistry({"calls_forever": calls_forever}), {})
    spec = AgentStepSpec(task_id="f2", agent="calls_forever", description="", prompt="x")
    reply = runtime.keys.reply("fencing2")
    status, owner = runtime.claim("tid-f2", "n2", reply, "", [], "wf-f2")
    assert status == "claimed"
    lease = runtime.keys.lease("tid-f2")
    runtime.redis().set(lease, "someone-else")  # another worker owns the step now
    CALLS.clear()
    began = time.monotonic()
    outcome = runtime.execute(spec, "w", None, tid="tid-f2", lease=lease)
    stopped = time.monotonic()
    assert outcome.error == "cancelled" and "could not renew its lease" in outcome.output
    assert stopped - began < settings.step_lease_s  # the first renewal (a third in) tells
    assert CALLS and max(CALLS) <= stopped
    assert runtime.finish("tid-f2", "n2", owner, outcome.to_json(), reply) is False
    assert runtime.redis().get(lease) == b"someone-else"
    assert runtime.redis().llen(reply) == 0


def test_a_fence_trips_before_the_lease_would_lapse_and_refuses_calls() -> None:
    """Without a renewal the fence trips at 90 % of the lease; a renewal moves it on."""
    fences = Fences()
    held = Held.start(None, "a step lease", 0.4)
    began = time.monotonic()
    fence = fences.open("k", "t", held)
    reasons: list[str] = []
    fence.on_trip(reasons.append)
    held.renewed(began + 0.1)  # the lease thread's renewal: deadline 0.1 + 0.36 s after began
    fence.check()  # still held
    while not reasons and time.monotonic() - began < 5:
        time.sleep(0.01)
    tripped = time.monotonic() - began
    assert reasons and "attempt t" in reasons[0]
    assert 0.46 <= tripped < 0.5 + 0.2
    with pytest.raises(AgentError) as refused:
        fence.check()
    assert refused.value.kind == "cancelled"
    assert fences.close("k", "other") is None and fences.close("k", "t") is fence


def test_the_fence_watch_sleeps_until_the_earliest_deadline() -> None:
    """Many long leases cost the watch thread no look until one nears its deadline.

    A fence opened later with a sooner deadline wakes it, and trips on time.
    """
    fences = Fences()
    for i in range(100):
        fences.open(f"long-{i}", "t", Held.start(None, f"lease {i}", 60.0))
    time.sleep(0.2)
    looked = fences.wakeups
    time.sleep(1.0)
    assert fences.wakeups == looked  # no deadline within the second: no look

    began = time.monotonic()
    fence = fences.open("short", "t", Held.start(None, "a short lease", 0.3))
    reasons: list[str] = []
    fence.on_trip(reasons.append)
    while not reasons and time.monotonic() - began < 5:
        time.sleep(0.01)
    assert reasons and 0.27 <= time.monotonic() - began < 0.27 + 0.2
    assert fences.wakeups - looked <= 3  # woken by the open, then at the deadline
    assert all(fences.get(f"long-{i}").tripped_at is None for i in range(100))


def test_a_fence_opened_after_its_lease_lapsed_trips_at_once() -> None:
    """A claim whose answer came back after the lease time (a paused worker) is stopped."""
    held = Held.start(None, "a step lease", 0.2)
    held.expires_at = time.monotonic() - 1.0  # taken (claim sent) a second ago
    fence = Fence("t", held)
    assert fence.lapsed()
    with pytest.raises(AgentError):
        fence.check()
    assert fence.tripped_at is not None
