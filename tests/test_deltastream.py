"""Reading output deltas: folding them into text (gaps marked), where a run's reader starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from fleet import AgentStepSpec, LocalExecutor
from fleet.deltas import START_MARGIN_S, LiveText, encode_entry, start_cursor
from fleet.eventbus import (
    DEFAULT_DELTA_SUBSCRIBER_CAPACITY,
    DEFAULT_SUBSCRIBER_CAPACITY,
    Lagged,
    delta_stream_key,
    event_stream_key,
)
from fleet.events import StepDelta
from fleet.workflow import Workflow
from tests.agents import stream_words

REPO = Path(__file__).resolve().parents[1]


def spec(task_id: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="stream", description=task_id, prompt=prompt)


def workflow() -> Workflow:
    return Workflow.builder(LocalExecutor(agents={"stream": stream_words})).build()


async def collected(subscription: Any) -> list[Any]:
    return [event async for event in subscription]


def test_live_text_marks_a_step_whose_text_lost_a_piece_incomplete() -> None:
    """A delta beyond the text held, or a lagged marker naming a step, marks it incomplete."""
    live = LiveText()
    live.fold(StepDelta(task_id="a", text="one ", attempt="x", offset=0))
    live.fold(StepDelta(task_id="a", text="two ", attempt="x", offset=4))
    assert live.text["a"] == "one two " and not live.incomplete
    live.fold(StepDelta(task_id="a", text="four", attempt="x", offset=12))  # "three " lost
    assert live.incomplete == {"a"} and live.text["a"] == "one two four"
    live.fold(StepDelta(task_id="a", text="again", attempt="x", offset=0))  # starts over
    assert not live.incomplete and live.text["a"] == "again"
    live.fold(StepDelta(task_id="b", text="late", attempt="y", offset=7))  # its start lost
    assert live.incomplete == {"b"}
    live.fold(StepDelta(task_id="b", text="whole", attempt="z", offset=0))  # a new attempt
    assert not live.incomplete
    live.fold(Lagged(missed=3, steps=("a",)))  # a's last delta was dropped: nothing follows
    assert live.incomplete == {"a"} and live.text["a"] == "again"


async def test_a_delta_subscriber_that_falls_behind_is_told_which_steps_lost_text() -> None:
    """Deltas dropped from a full queue come back as a lagged marker naming their steps."""
    flow = workflow()
    events = flow.subscribe(deltas=True, capacity=8)
    outcomes = await flow.parallel([spec("slow", "12/0.06"), spec("quiet", "a")])
    await flow.close()
    seen = await collected(events)
    lagged = [event for event in seen if isinstance(event, Lagged)]
    assert lagged and "slow" in lagged[0].steps
    live = LiveText()
    for event in seen:
        if isinstance(event, StepDelta | Lagged):
            live.fold(event)
    assert "slow" in live.incomplete
    assert live.text["slow"] != outcomes[0].output  # what the marker warns about


async def test_the_default_delta_subscriber_keeps_every_delta_of_many_steps() -> None:
    """With deltas=True the default queue holds 64 streaming steps' deltas read only at the end."""
    flow = workflow()
    events = flow.subscribe(deltas=True)
    assert events.capacity == DEFAULT_DELTA_SUBSCRIBER_CAPACITY
    outcomes = await flow.parallel([spec(f"s{i}", "6/0.06") for i in range(64)])
    await flow.close()
    seen = await collected(events)
    assert len(seen) > DEFAULT_SUBSCRIBER_CAPACITY  # what the plain default would cut
    assert not [event for event in seen if isinstance(event, Lagged)]
    live = LiveText()
    for event in seen:
        if isinstance(event, StepDelta):
            live.fold(event)
    assert live.text == {outcome.task_id: outcome.output for outcome in outcomes}
    assert not live.incomplete


def log_skewed_runs(redis_url: str, key_prefix: str, root_id: str) -> None:
    """Log two runs of ``root_id`` as hosts do, the second's host clock 2 minutes ahead.

    Each run's step ``s`` streams its text; the second run's first delta is written just
    before its log's ``start`` entry (a worker quicker than the host's first log write).
    """
    client = redis.Redis.from_url(redis_url)
    events = event_stream_key(root_id, key_prefix=key_prefix)
    deltas = delta_stream_key(root_id, key_prefix=key_prefix)

    def start(run: str, at: float) -> None:
        client.xadd(events, {"control": "start", "run": run, "at": f"{at:.3f}"})

    def end(run: str, at: float) -> None:
        client.xadd(events, {"control": "end", "run": run, "status": "finished", "at": f"{at:.3f}"})

    def delta(attempt: str, offset: int, text: str) -> None:  # as a worker writes one
        client.xadd(deltas, encode_entry([("s", attempt, offset, text)]))

    start("old", time.time())
    delta("a1", 0, "an earlier run's text")
    time.sleep(0.005)  # a host writes these milliseconds apart, at least
    end("old", time.time())
    time.sleep(0.005)
    ahead = time.time() + 120
    delta("a2", 0, "the new ")
    start("new", ahead)
    delta("a2", 8, "run's whole text")
    end("new", ahead + 1)
    client.close()


def test_fleet_watch_output_starts_on_redis_clock_not_the_hosts(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A host clock 2 minutes ahead loses no delta; an earlier run's text is not shown."""
    log_skewed_runs(redis_url, key_prefix, "skewed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        PYTHONPATH=str(REPO),
        FLEET_REDIS_URL=redis_url,
        FLEET_KEY_PREFIX=key_prefix,
        FLEET_RUN_INDEX=str(tmp_path / "runs.db"),
    )
    command = [sys.executable, "-m", "fleet", "watch", "skewed", "--executor", "celery"]
    watched = subprocess.run(
        [*command, "--output", "--timeout", "30"], env=env, capture_output=True, text=True
    )
    assert watched.returncode == 0, watched.stderr
    assert "  > s: the new run's whole text" in watched.stdout.splitlines(), watched.stdout
    assert "earlier" not in watched.stdout


def test_start_cursor_is_a_margin_before_the_start_entry_and_after_earlier_runs() -> None:
    """The cursor reads from START_MARGIN_S before the start entry, or the previous entry's ms."""
    start = 1_000_000_000
    first = start - int(START_MARGIN_S * 1000)
    assert start_cursor(f"{start}-3") == f"{first - 1}-{2**64 - 1}"
    assert start_cursor(f"{start}-3", f"{start - 5}-7") == f"{start - 6}-{2**64 - 1}"
    assert start_cursor(f"{start}-3", f"{first - 1}-0") == f"{first - 1}-{2**64 - 1}"
    assert start_cursor("5-0") == "0-0"
