"""Output deltas: ctx.emit_delta, their channel (memory / Redis stream), subscribe(deltas=True)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet import AgentContext, AgentStepSpec, LocalExecutor, load_agents
from fleet.deltas import (
    LiveText,
    MemoryDeltaChannel,
    RedisDeltaChannel,
    read_deltas,
)
from fleet.deltawriter import DeltaWriter
from fleet.eventbus import delta_stream_key
from fleet.events import StepDelta, StepFinished
from fleet.workflow import Workflow
from tests.agents import BLOCKING_ENDED, stream_words


def spec(task_id: str, prompt: str, agent: str = "stream") -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent=agent, description=task_id, prompt=prompt)


async def collected(subscription: Any) -> list[Any]:
    return [event async for event in subscription]


def workflow(**agents: Any) -> Workflow:
    return Workflow.builder(LocalExecutor(agents={"stream": stream_words, **agents})).build()


async def test_local_deltas_arrive_in_order_and_join_to_the_output() -> None:
    """Each step's deltas, folded in order, are its output, and all come before its step_finished."""
    flow = workflow()
    events = flow.subscribe(deltas=True)
    specs = [spec(f"s{i}", f"alpha beta gamma delta epsilon {i}") for i in range(4)]
    outcomes = await flow.parallel(specs)
    await flow.close()
    seen = await collected(events)
    live = LiveText()
    for event in seen:
        if isinstance(event, StepDelta):
            live.fold(event)
            assert not any(
                isinstance(e, StepFinished) and e.task_id == event.task_id
                for e in seen[: seen.index(event)]
            ), "a delta came after its step finished"
    assert all(outcome.success for outcome in outcomes)
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}


async def test_deltas_of_one_step_are_coalesced() -> None:
    """200 pieces emitted at once reach the subscriber as a couple of deltas, not 200."""

    async def burst(spec: AgentStepSpec, ctx: AgentContext) -> str:
        for index in range(200):
            ctx.emit_delta(f"{index},")
        await asyncio.sleep(0.12)
        return "".join(f"{index}," for index in range(200))

    flow = workflow(burst=burst)
    events = flow.subscribe(deltas=True)
    [outcome] = await flow.parallel([spec("b", "", agent="burst")])
    await flow.close()
    deltas = [e for e in await collected(events) if isinstance(e, StepDelta)]
    assert "".join(d.text for d in deltas) == outcome.output
    assert len(deltas) <= 3


async def test_only_delta_subscribers_get_deltas_and_the_event_log_never_does(
    tmp_path: Path,
) -> None:
    """A plain subscriber and the run's event log see no step_delta; a deltas=True one does."""
    log = tmp_path / "events.db"
    flow = (
        Workflow.builder(LocalExecutor(agents={"stream": stream_words}))
        .with_event_stream(f"sqlite:{log}")
        .build()
    )
    plain = flow.subscribe()
    live = flow.subscribe(deltas=True)
    await flow.phase("p", [spec("a", "one two three")])
    await flow.close()
    assert not [e for e in await collected(plain) if e.type == "step_delta"]
    assert [e for e in await collected(live) if e.type == "step_delta"]
    rows = sqlite3.connect(log).execute("SELECT entry FROM fleet_events").fetchall()
    assert rows and not [r for r in rows if "step_delta" in json.loads(r[0]).get("event", "")]


async def test_replace_starts_the_text_over() -> None:
    """emit_delta(replace=True) makes the live text start again (a new model call)."""

    async def two_calls(spec: AgentStepSpec, ctx: AgentContext) -> str:
        ctx.emit_delta("draft answer")
        await asyncio.sleep(0.06)
        ctx.emit_delta("final", replace=True)
        await asyncio.sleep(0.06)
        ctx.emit_delta(" answer")
        return "final answer"

    flow = workflow(two=two_calls)
    events = flow.subscribe(deltas=True)
    [outcome] = await flow.parallel([spec("t", "", agent="two")])
    await flow.close()
    live = LiveText()
    for event in await collected(events):
        if isinstance(event, StepDelta):
            live.fold(event)
    assert live.text["t"] == outcome.output == "final answer"


async def test_emit_delta_without_a_workflow_is_a_no_op() -> None:
    """A step run straight on an executor may call emit_delta; nothing is sent, nothing fails."""
    outcome = await LocalExecutor(agents={"stream": stream_words}).execute_step(spec("x", "a b"))
    assert outcome.success and outcome.output == "a b"
    assert MemoryDeltaChannel().publisher("x") is None  # nobody reads: no publisher


def test_writer_coalesces_caps_and_expires_the_stream(redis_url: str, key_prefix: str) -> None:
    """A DeltaWriter writes a step's text in a few entries, with a TTL and a MAXLEN cap."""
    client = redis.Redis.from_url(redis_url)
    key = delta_stream_key("root", key_prefix=key_prefix)
    writer = DeltaWriter(lambda: client, maxlen=50, ttl_s=600)
    publisher = writer.publisher(key, "t1")
    for index in range(500):
        publisher.emit(f"{index} ")
    publisher.close()
    entries = read_deltas(client, key, "0")
    assert "".join(d.text for d in entries) == "".join(f"{index} " for index in range(500))
    assert len(entries) <= 3
    assert 0 < client.ttl(key) <= 600
    many = DeltaWriter(lambda: client, interval_s=0.0, maxlen=50)
    for index in range(400):
        one = many.publisher(key, f"m{index}")
        one.emit("x")
        one.close()
    assert client.xlen(key) < 300  # trimmed (approximately) to its MAXLEN


def test_many_steps_streaming_through_one_writer_cost_few_redis_writes_per_step(
    redis_url: str, key_prefix: str
) -> None:
    """64 steps streaming for 0.5 s cost under 3 Redis commands a step: one XADD a tick for all."""
    client = redis.Redis.from_url(redis_url)
    key = delta_stream_key("batched", key_prefix=key_prefix)
    writer = DeltaWriter(lambda: client)
    publishers = [writer.publisher(key, f"s{index}") for index in range(64)]
    for word in range(50):  # about 10 ticks of the writer, every step emitting all along
        for publisher in publishers:
            publisher.emit(f"w{word} ")
        time.sleep(0.01)
    for publisher in publishers:
        publisher.close()
    live = LiveText()
    for delta in read_deltas(client, key, "0", count=100_000):
        live.fold(delta)
    assert live.text == {f"s{index}": "".join(f"w{w} " for w in range(50)) for index in range(64)}
    assert writer.commands < 3 * len(publishers)
    assert client.xlen(key) < 3 * len(publishers)


def test_a_reader_that_resumes_from_its_last_id_misses_nothing_and_repeats_nothing(
    redis_url: str, key_prefix: str
) -> None:
    """Reading in pages and reconnecting with the last id yields exactly the stream's deltas."""
    client = redis.Redis.from_url(redis_url)
    key = delta_stream_key("resume", key_prefix=key_prefix)
    writer = DeltaWriter(lambda: client, interval_s=0.0)
    for index in range(60):
        publisher = writer.publisher(key, f"t{index % 3}")
        publisher.emit(f"piece {index}")
        publisher.close()
    everything = read_deltas(client, key, "0", count=1000)
    assert len(everything) == 60
    got, cursor = [], "0"
    while True:
        reconnected = redis.Redis.from_url(redis_url)  # a new connection each time
        page = read_deltas(reconnected, key, cursor, count=7)
        reconnected.close()
        if not page:
            break
        got.extend(page)
        cursor = page[-1].id
    assert [d.id for d in got] == [d.id for d in everything]
    assert [d.text for d in got] == [f"piece {index}" for index in range(60)]


async def test_redis_channel_delivers_in_order_and_marks_a_restart(
    redis_url: str, key_prefix: str
) -> None:
    """The workflow's Redis reader delivers a step's deltas in order; a new attempt is a restart."""
    client = redis.Redis.from_url(redis_url)
    key = delta_stream_key("chan", key_prefix=key_prefix)
    channel = RedisDeltaChannel(redis_url, key)
    got: list[StepDelta] = []
    await channel.start(got.append)
    writer = DeltaWriter(lambda: client)
    first = writer.publisher(key, "s")
    first.emit("half of the ")
    await asyncio.to_thread(first.close)  # the worker died here; the step runs again
    second = writer.publisher(key, "s")
    for word in ["the ", "whole ", "answer"]:
        second.emit(word)
        await asyncio.sleep(0.02)
    await asyncio.to_thread(second.close)
    started = time.monotonic()
    await channel.stop()
    assert time.monotonic() - started < 2.0
    live = LiveText()
    restarts = [live.fold(d) for d in got]
    assert live.text["s"] == "the whole answer"
    assert [d.restart for d in got] == restarts
    assert restarts.count(True) == 1 and got[restarts.index(True)].offset == 0


async def test_the_workflows_reader_reads_a_busy_stream_in_few_commands(
    redis_url: str, key_prefix: str
) -> None:
    """Entries written every few ms reach the workflow in order, read at most every 25 ms."""
    from tests.celery_support import BrokerLog

    client = redis.Redis.from_url(redis_url)
    key = delta_stream_key("paced", key_prefix=key_prefix)
    channel = RedisDeltaChannel(redis_url, key)
    got: list[StepDelta] = []
    await channel.start(got.append)
    writer = DeltaWriter(lambda: client, interval_s=0.0)  # every piece its own entry
    publisher = writer.publisher(key, "s")
    with BrokerLog(redis_url) as log:
        started = time.monotonic()
        for index in range(100):
            publisher.emit(f"{index} ")
            await asyncio.sleep(0.004)
        await asyncio.to_thread(publisher.close)
        await channel.stop()
        elapsed = time.monotonic() - started
    live = LiveText()
    for delta in got:
        live.fold(delta)
    assert live.text["s"] == "".join(f"{index} " for index in range(100))
    reads = [c for c in log.commands if c.name == "XREAD" and key.encode() in c.args]
    assert len(reads) <= elapsed / 0.025 + 4
    assert client.xlen(key) > 2 * len(reads)


def test_a_worker_writes_deltas_only_under_its_fleets_prefix(
    redis_url: str, key_prefix: str
) -> None:
    """A step message naming a delta stream outside the fleet's key prefix gets no publisher."""
    from fleet.agents import AgentRegistry
    from fleet.celery.protocol import PROTOCOL_VERSION, StepMessage
    from fleet.config import FleetSettings
    from fleet.redis.keys import Keys
    from workers.runtime import WorkerRuntime

    runtime = WorkerRuntime(
        FleetSettings(redis_url=redis_url, key_prefix=key_prefix), AgentRegistry(), {}
    )

    def message(deltas: str | None) -> StepMessage:
        return StepMessage(
            v=PROTOCOL_VERSION, spec=spec("t", "x"), reply="r", nonce="n", deltas=deltas
        )

    ours = Keys(key_prefix).deltas("root")
    assert runtime.delta_publisher(message(ours).deltas, "t") is not None
    assert runtime.delta_publisher(message("elsewhere:deltas:{root}").deltas, "t") is None
    assert runtime.delta_publisher(message(None).deltas, "t") is None


def blocking_agents(tmp_path: Path) -> Any:
    agents = tmp_path / "agents.toml"
    agents.write_text(
        '[agents.plain]\ntarget = "tests.agents:stream_words_blocking"\nblocking = true\n'
    )
    return load_agents(agents)


async def test_a_blocking_agent_streams_from_its_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A blocking = true agent's emit_delta, from its thread, joins to its output, no error."""
    flow = Workflow.builder(LocalExecutor(agents=blocking_agents(tmp_path))).build()
    events = flow.subscribe(deltas=True)
    specs = [spec(f"t{uuid.uuid4().hex[:6]}", "15/0.02", agent="plain") for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger="fleet.deltas"):
        outcomes = await flow.parallel(specs)
        await flow.close()
    seen = await collected(events)
    live = LiveText()
    for event in seen:
        if isinstance(event, StepDelta):
            live.fold(event)
    assert all(outcome.success for outcome in outcomes)
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    assert not caplog.records


async def test_a_blocking_agents_thread_outliving_its_cancelled_step_sends_nothing_after(
    tmp_path: Path,
) -> None:
    """After a cancel ended the step, its still-running thread's pieces are not delivered."""
    task = f"c{uuid.uuid4().hex[:6]}"
    flow = Workflow.builder(LocalExecutor(agents=blocking_agents(tmp_path))).build()
    events = flow.subscribe(deltas=True)
    running = asyncio.create_task(flow.parallel([spec(task, "16/0.08", agent="plain")]))
    async for event in events:
        if isinstance(event, StepDelta):
            break
    await flow.cancel("enough")
    [outcome] = await running
    assert outcome.error == "cancelled"
    assert await asyncio.to_thread(BLOCKING_ENDED[task].wait, 10.0)  # it emitted on, then ended
    await flow.close()
    seen = await collected(events)
    finished = next(i for i, e in enumerate(seen) if isinstance(e, StepFinished))
    assert not [e for e in seen[finished:] if isinstance(e, StepDelta)]
