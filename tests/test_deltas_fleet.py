"""Output deltas on a real fleet: Celery worker processes write them, the workflow reads them."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.provider import ProviderProcess
from fleet import AgentStepSpec, WorkflowBudget
from fleet.deltas import LiveText, read_deltas
from fleet.events import StepDelta, StepFinished
from fleet.ledgers import RedisLedger
from fleet.redis.keys import Keys
from fleet.workflow import Workflow
from tests import pipeline_stages
from tests.celery_support import (
    REPO,
    BrokerLog,
    CeleryWorkers,
    broker_holds,
    fleet_settings,
    running_workers,
    step_ids,
    until,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.timeout(300)]

MANY = 256


def spec(task_id: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="stream_words", description="d", prompt=prompt)


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorkers]:
    settings = fleet_settings(redis_url, max_in_flight=MANY)
    with running_workers(
        settings, tmp_path_factory.mktemp("w"), "worker1", concurrency=MANY
    ) as fleet:
        yield fleet


async def run_collecting(
    workers: CeleryWorkers, specs: list[AgentStepSpec], root: str, **options: Any
) -> tuple[list[Any], list[Any]]:
    async with workers.executor(**options) as executor:
        flow = Workflow.builder(executor).with_root_id(root).build()
        events = flow.subscribe(deltas=True, capacity=1_000_000)
        outcomes = await flow.parallel(specs)
        await flow.close()
        return outcomes, [event async for event in events]


async def test_fleet_deltas_arrive_in_order_and_join_to_the_output(
    workers: CeleryWorkers,
) -> None:
    """Deltas a worker wrote reach subscribe(deltas=True) in order and join to each output."""
    specs = [spec(f"s{i}", f"the quick brown fox jumps over dog {i}") for i in range(5)]
    outcomes, events = await run_collecting(workers, specs, "fleet-join")
    live = LiveText()
    for event in events:
        if isinstance(event, StepDelta):
            live.fold(event)
            assert not event.restart
    assert all(outcome.success for outcome in outcomes), outcomes
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    assert not [e for e in events if isinstance(e, StepFinished) and not e.success]


async def test_256_streaming_steps_on_one_worker_all_complete_with_coalesced_writes(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """256 steps streaming 40 words each on one worker all finish; their text is complete.

    And coalesced: far fewer deltas than the 256 x 40 pieces emitted, in under 3 stream
    entries a step (one ``XADD`` a flush for all the worker's steps).
    """
    specs = [spec(f"m{i}", "40/0.01") for i in range(MANY)]
    outcomes, events = await run_collecting(workers, specs, "fleet-many", max_in_flight=MANY)
    assert [outcome.success for outcome in outcomes] == [True] * MANY, outcomes[:3]
    live = LiveText()
    for event in events:
        if isinstance(event, StepDelta):
            live.fold(event)
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    key = Keys(workers.settings.key_prefix).deltas("fleet-many")
    client = redis.Redis.from_url(redis_url)
    deltas = len(read_deltas(client, key, "0", count=100_000))
    assert MANY <= deltas < MANY * 40 / 2
    # A step's first piece and its last go out at once; in between, one entry a flush
    # carries every step's text (one per step and flush would be 8 or more a step).
    assert client.xlen(key) < 3 * MANY
    assert client.ttl(key) > 0


async def test_cancel_mid_stream_ends_the_steps_and_their_text_within_2_s(
    workers: CeleryWorkers, redis_url: str
) -> None:
    """A cancel while steps stream ends them cancelled within 2 s; no delta is written after."""
    specs = [spec(f"c{i}", "300/0.05") for i in range(3)]
    key = Keys(workers.settings.key_prefix).deltas("fleet-cancel")
    async with workers.executor() as executor:
        flow = Workflow.builder(executor).with_root_id("fleet-cancel").build()
        events = flow.subscribe(deltas=True, capacity=100_000)
        with BrokerLog(redis_url) as log:
            running = asyncio.create_task(flow.parallel(specs))
            async for event in events:
                if isinstance(event, StepDelta):
                    break
            cancelled_at = time.monotonic()
            await flow.cancel("enough")
            outcomes = await running
            ended = time.monotonic() - cancelled_at
        await flow.close()
    assert [outcome.error for outcome in outcomes] == ["cancelled"] * 3
    assert ended <= 2.0
    client = redis.Redis.from_url(redis_url)
    written = len(read_deltas(client, key, "0", count=100_000))
    # The worker acknowledges each message once its task returned (late acks): when none
    # is held any more, nothing it wrote after that could have been missed.
    tasks = set(step_ids(log, workers.settings.queue).values())
    await until(
        lambda: not broker_holds(workers.settings, tasks),
        10.0,
        "the worker to end every cancelled step",
    )
    assert len(read_deltas(client, key, "0", count=100_000)) == written
    client.close()


async def test_a_worker_killed_mid_stream_restarts_the_text_and_says_so(
    redis_url: str, tmp_path: Path
) -> None:
    """The re-run on another worker streams from the start as a new attempt marked restart."""
    settings = fleet_settings(redis_url, claim_timeout_s=2.0, step_lease_s=1.0)
    with running_workers(settings, tmp_path, "doomed", concurrency=4) as fleet:
        async with fleet.executor() as executor:
            flow = Workflow.builder(executor).with_root_id("fleet-kill").build()
            events = flow.subscribe(deltas=True, capacity=100_000)
            running = asyncio.create_task(flow.parallel([spec("k", "30/0.1")]))
            seen: list[Any] = []
            async for event in events:
                seen.append(event)
                if isinstance(event, StepDelta) and "w3" in event.text:
                    break
            await asyncio.to_thread(fleet.kill, "doomed")
            await asyncio.to_thread(fleet.start, "rescuer")
            [outcome] = await running
            await flow.close()
            seen.extend([event async for event in events])
    deltas = [event for event in seen if isinstance(event, StepDelta)]
    assert outcome.success, outcome
    restarts = [d for d in deltas if d.restart]
    assert len(restarts) == 1 and restarts[0].offset == 0
    assert len({d.attempt for d in deltas}) == 2
    live = LiveText()
    for delta in deltas:
        live.fold(delta)
    assert live.text["k"] == outcome.output


class Watcher:
    """A `fleet watch` process whose stdout lines are kept with the time each was read."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for _, line in self.lines):
            assert self.process.poll() is None, self.lines
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.05)

    def finish(self) -> str:
        self.process.wait(60)
        self._reader.join(10)
        assert self.process.stderr is not None
        assert self.process.returncode == 0, self.process.stderr.read()
        return "\n".join(line for _, line in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._reader.join(10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def test_fleet_watch_output_follows_each_steps_text_live_and_one_step_whole(
    workers: CeleryWorkers, redis_url: str, tmp_path: Path
) -> None:
    """`fleet watch ROOT --output`, started first, prints steps' text while they stream.

    ``--step`` writes that one step's text, each piece once.
    """
    prefix = workers.settings.key_prefix
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        FLEET_REDIS_URL=redis_url,
        FLEET_KEY_PREFIX=prefix,
        FLEET_RUN_INDEX=str(tmp_path / "runs.db"),
    )
    command = [sys.executable, "-m", "fleet", "watch", "watched-live", "--executor", "celery"]
    every = Watcher([*command, "--output", "--timeout", "90"], env)
    one = Watcher([*command, "--step", "t1", "--timeout", "90"], env)
    try:
        for watcher in (every, one):
            watcher.wait_for("waiting for workflow watched-live", 60.0)

        async def run() -> tuple[list[Any], float]:
            async with workers.executor() as executor:
                flow = (
                    Workflow.builder(executor)
                    .with_root_id("watched-live")
                    .with_event_stream(redis_url, key_prefix=prefix)
                    .build()
                )
                specs = [spec(f"t{i}", f"12/0.3/s{i}w") for i in range(3)]
                outcomes = await flow.phase("talk", specs)
                ran_until = time.monotonic()  # before the log's end: the watch still follows
                await flow.finish()
                return outcomes, ran_until

        outcomes, ran_until = asyncio.run(run())
        shown = every.finish()
        whole = one.finish()
    finally:
        every.stop()
        one.stop()
    live = [line for at, line in every.lines if at < ran_until and line.startswith("  > t")]
    assert live, shown  # text shown while the steps still streamed
    for outcome in outcomes:
        assert f"  > {outcome.task_id}: {outcome.output}" in shown.splitlines()
    # Its pieces, each once and in order (event lines may come in between, live).
    assert re.findall(r"s\d+w\d+", whole) == outcomes[1].output.split()


async def test_256_openai_streams_on_one_worker_join_and_charge_the_providers_usage(
    redis_url: str, tmp_path: Path
) -> None:
    """256 SSE answers at once on one worker: every step's text arrives, usage is the provider's."""
    with ProviderProcess(latency_s=0.2, token_interval_s=0.02, completion_tokens=30) as server:
        agents = tmp_path / "agents.toml"
        agents.write_text(
            f'[agents.llm]\nkind = "openai"\nbase_url = "{server.base_url}"\nmodel = "m"\n'
            f'max_tokens = 30\nmax_concurrent = {MANY}\nstream = true\nunknown_price = "allow"\n'
        )
        # A lease as long as a deployment's (10 s by default), not the suite's 1 s: 256 steps
        # claimed at once by a worker that has just started can starve its lease thread past
        # 1 s on a busy 2-core machine, and a lapsed lease re-runs a step, which this test,
        # about streams and usage, would count as extra requests. Lapses have their own tests.
        settings = fleet_settings(
            redis_url, agents_file=agents, max_in_flight=MANY, step_lease_s=5.0
        )
        ledger = RedisLedger(redis_url, key_prefix=settings.key_prefix)
        budget = WorkflowBudget(10_000_000, ledger=ledger, workflow_id="fleet-sse")
        specs = [
            AgentStepSpec(task_id=f"q{i}", agent="llm", description="d", prompt=f"q{i}")
            for i in range(MANY)
        ]
        with running_workers(settings, tmp_path, "worker1", concurrency=MANY) as fleet:
            outcomes, events = await run_collecting(fleet, specs, "fleet-sse", budget=budget)
        log = server.stats()["log"]
        snapshot = await budget.snapshot()
        await ledger.close()
    assert [outcome.error for outcome in outcomes] == [None] * MANY
    live = LiveText()
    for event in events:
        if isinstance(event, StepDelta):
            live.fold(event)
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    assert len(log) == MANY and all("first_token_at" in entry for entry in log)
    provider_tokens = sum(entry["total_tokens"] for entry in log)
    assert sum(outcome.usage.total_tokens for outcome in outcomes) == provider_tokens
    assert snapshot.consumed_tokens == provider_tokens and snapshot.reserved_tokens == 0


async def test_a_pipeline_chain_on_the_workers_streams_too(workers: CeleryWorkers) -> None:
    """Steps of a registered stage, run as Celery chain links, publish their deltas as well."""
    items = ["one two three", "four five six"]
    async with workers.executor() as executor:
        flow = Workflow.builder(executor).with_root_id("fleet-chain").build()
        events = flow.subscribe(deltas=True, capacity=100_000)
        results = await flow.pipeline(items, [pipeline_stages.streamed])
        await flow.close()
        seen = [event async for event in events]
    live = LiveText()
    for event in seen:
        if isinstance(event, StepDelta):
            live.fold(event)
    assert [result.output for result in results if result is not None] == items
    assert live.text == {f"streamed-{item}": item for item in items}
