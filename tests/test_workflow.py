"""The Workflow facade: verbs, durable phases, events, budget reporting (semantics §4.4)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, LocalExecutor, LoopDecision, StepOutcome
from fleet.agents import AgentContext
from fleet.budget import WorkflowBudget
from fleet.checkpoint import WorkflowStepRecord
from fleet.events import (
    BudgetExhausted,
    LogEvent,
    PhaseEnd,
    PhaseStart,
    StepFinished,
    StepStarted,
    parse_event,
)
from fleet.executor import AgentExecutor
from fleet.stores import CheckpointStore, open_store
from fleet.workflow import Lagged, Workflow, WorkflowClosedError, event_stream_key

REPO = Path(__file__).resolve().parents[1]


def spec(
    task_id: str, agent: str = "rec", prompt: str | None = None, **extra: Any
) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description=task_id, prompt=prompt or task_id, **extra
    )


class Recorder:
    """Agents that record which task ids ran (the reference tests' EchoExecutor)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def rec(self, spec: AgentStepSpec, ctx: AgentContext) -> str:
        self.ran.append(spec.task_id)
        await asyncio.sleep(0.005)
        return spec.prompt

    def executor(self, **options: Any) -> LocalExecutor:
        return LocalExecutor(
            agents={
                "rec": self.rec,
                "fail": "tests.agents:fail",
                "boom": "tests.agents:boom",
                "spend": "tests.agents:spend",
            },
            max_concurrency=4,
            **options,
        )


async def collected(subscription: Any) -> list[Any]:
    return [event async for event in subscription]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        target = "memory"
    elif request.param == "sqlite":
        target = f"sqlite:{tmp_path / 'journal.db'}"
    else:
        target = request.getfixturevalue("redis_url")
    opened = open_store(target, key_prefix=key_prefix)
    try:
        yield opened
    finally:
        await opened.close()


# --- §4.4 ported -------------------------------------------------------------------------


async def test_agent_runs_a_single_step() -> None:
    """`agent` runs one step and returns its echoed outcome."""
    recorder = Recorder()
    workflow = Workflow.builder(recorder.executor()).build()
    outcome = await workflow.agent(spec("a", prompt="hello"))
    assert (outcome.task_id, outcome.output, outcome.success) == ("a", "hello", True)
    assert recorder.ran == ["a"]


async def test_parallel_preserves_order_and_isolates_failure() -> None:
    """[a, fail, c] keeps its order and only the middle step fails."""
    workflow = Workflow.builder(Recorder().executor()).build()
    outcomes = await workflow.parallel([spec("a"), spec("b", "fail"), spec("c")])
    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    assert [o.success for o in outcomes] == [True, False, True]


async def test_phase_emits_start_and_end_milestones() -> None:
    """A phase with one failing step reports PhaseStart{review,0,2} and PhaseEnd{1 ok, 1 failed}."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    await workflow.phase("review", [spec("a"), spec("b", "fail")])
    await workflow.close()
    milestones = [e for e in await collected(events) if isinstance(e, PhaseStart | PhaseEnd)]
    assert milestones == [
        PhaseStart(name="review", index=0, step_count=2),
        PhaseEnd(name="review", index=0, succeeded=1, failed=1),
    ]


async def test_phase_event_order_brackets_its_step_events() -> None:
    """phase_start comes before every step event of the phase, phase_end after all of them."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    await workflow.phase("draft", [spec("a"), spec("b"), spec("c")])
    await workflow.close()
    kinds = [(e.type, getattr(e, "task_id", None)) for e in await collected(events)]
    assert kinds[0] == ("phase_start", None)
    assert kinds[-1] == ("phase_end", None)
    middle = kinds[1:-1]
    assert sorted(middle) == sorted(
        [("step_started", t) for t in "abc"] + [("step_finished", t) for t in "abc"]
    )
    for task in "abc":
        assert middle.index(("step_started", task)) < middle.index(("step_finished", task))


async def test_phases_get_monotonic_indices() -> None:
    """Two phases are numbered 0 and 1."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    await workflow.phase("one", [spec("a")])
    await workflow.phase("two", [spec("b")])
    await workflow.close()
    starts = [e for e in await collected(events) if isinstance(e, PhaseStart)]
    assert [(e.name, e.index) for e in starts] == [("one", 0), ("two", 1)]


async def test_phase_with_store_resumes_from_journal(store: CheckpointStore) -> None:
    """A journal pre-seeded at "root/implement" with step a means only b runs."""
    seeded = spec("a")
    await store.record_step(
        "root/implement",
        WorkflowStepRecord.for_outcome(
            "root/implement",
            seeded,
            StepOutcome(
                task_id="a", session_id="s-a", agent="rec", output="from journal", success=True
            ),
        ),
    )
    recorder = Recorder()
    workflow = Workflow.builder(recorder.executor()).with_store(store).with_root_id("root").build()
    events = workflow.subscribe()
    outcomes = await workflow.phase("implement", [seeded, spec("b")])
    assert recorder.ran == ["b"]
    assert [(o.task_id, o.output) for o in outcomes] == [("a", "from journal"), ("b", "b")]
    await workflow.close()
    ends = [e for e in await collected(events) if isinstance(e, PhaseEnd)]
    assert ends == [PhaseEnd(name="implement", index=0, succeeded=2, failed=0)]


async def test_pipeline_chains_stages_per_item() -> None:
    """The pipeline verb chains each item's stages and returns its last outcome."""
    workflow = Workflow.builder(Recorder().executor()).build()

    def first(_previous: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"{item}-1", prompt=item.upper())

    def second(previous: StepOutcome | None, item: str) -> AgentStepSpec | None:
        assert previous is not None
        return None if item == "skip" else spec(f"{item}-2", prompt=previous.output + "!")

    results = await workflow.pipeline(["x", "skip", "y"], [first, second])
    assert [r.output if r else None for r in results] == ["X!", "SKIP", "Y!"]


async def test_log_emits_a_log_event() -> None:
    """log("info", "hello", k=1) sends Log{info, hello, {"k": 1}}."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    workflow.log("info", "hello", k=1)
    await workflow.close()
    assert await collected(events) == [LogEvent(level="info", message="hello", fields={"k": 1})]


async def test_log_never_fails_on_odd_fields_or_after_close() -> None:
    """Fields JSON cannot hold become strings; logging after close is a silent no-op."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    workflow.log("debug", "odd", when=object, path=Path("/tmp/x"))
    await workflow.close()
    workflow.log("info", "late")
    (event,) = await collected(events)
    assert event.fields["path"] == "/tmp/x"
    assert isinstance(event.fields["when"], str)


async def test_phase_emits_budget_exhausted_when_capped() -> None:
    """Limit 10 and a step that spends 12: after the phase, budget_exhausted; consumed = 12."""
    budget = WorkflowBudget(10)
    workflow = Workflow.builder(Recorder().executor(budget=budget)).with_budget(budget).build()
    events = workflow.subscribe()
    await workflow.phase("spend", [spec("s", "spend", prompt="12", max_tokens=10)])
    snapshot = await workflow.budget_snapshot()
    assert snapshot is not None and snapshot.consumed_tokens == 12 and snapshot.is_exhausted
    await workflow.close()
    exhausted = [e for e in await collected(events) if isinstance(e, BudgetExhausted)]
    assert exhausted == [
        BudgetExhausted(
            resource="workflow_tokens",
            reason="workflow token budget exhausted (12 / 10 tokens)",
        )
    ]


async def test_budget_exhausted_is_emitted_once_per_workflow() -> None:
    """Later phases whose steps are refused do not repeat budget_exhausted; copies share it."""
    budget = WorkflowBudget(10)
    workflow = Workflow.builder(Recorder().executor(budget=budget)).with_budget(budget).build()
    events = workflow.subscribe()
    await workflow.phase("one", [spec("s1", "spend", prompt="12", max_tokens=10)])
    refused = await workflow.phase("two", [spec("s2", "spend", prompt="1", max_tokens=1)])
    assert refused[0].error == "budget_exhausted"
    await workflow.copy().phase("three", [spec("s3", "spend", prompt="1", max_tokens=1)])
    await workflow.close()
    seen = await collected(events)
    assert sum(isinstance(e, BudgetExhausted) for e in seen) == 1
    # It follows the first phase's end, where the budget ran out.
    position = next(i for i, e in enumerate(seen) if isinstance(e, BudgetExhausted))
    assert seen[position - 1] == PhaseEnd(name="one", index=0, succeeded=1, failed=0)


async def test_refused_step_reports_exhaustion_before_the_account_is_spent() -> None:
    """A step refused for asking more than is left also triggers budget_exhausted."""
    budget = WorkflowBudget(100)
    workflow = Workflow.builder(Recorder().executor(budget=budget)).with_budget(budget).build()
    events = workflow.subscribe()
    (outcome,) = await workflow.phase("big", [spec("s", "spend", prompt="5", max_tokens=500)])
    assert outcome.error == "budget_exhausted"
    await workflow.close()
    (exhausted,) = [e for e in await collected(events) if isinstance(e, BudgetExhausted)]
    assert "refused" in exhausted.reason and "0 / 100" in exhausted.reason


async def test_no_budget_means_no_snapshot_and_no_exhausted_event() -> None:
    """Without a budget: snapshot is None and no budget_exhausted event is sent."""
    workflow = Workflow.builder(Recorder().executor()).build()
    events = workflow.subscribe()
    await workflow.phase("p", [spec("a")])
    assert await workflow.budget_snapshot() is None
    await workflow.close()
    assert not [e for e in await collected(events) if isinstance(e, BudgetExhausted)]


class FailingExecutor(AgentExecutor):
    async def execute_step(self, spec: AgentStepSpec, events: Any = None) -> StepOutcome:
        return StepOutcome.failed(spec.task_id, spec.agent, "host said no", error="unavailable")


async def test_agent_returns_failed_outcome_when_executor_yields_one() -> None:
    """An executor's failed outcome comes back from `agent` unchanged (id kept)."""
    workflow = Workflow.builder(FailingExecutor()).build()
    outcome = await workflow.agent(spec("x"))
    assert (outcome.task_id, outcome.success, outcome.error) == ("x", False, "unavailable")


# --- fleet additions ---------------------------------------------------------------------


async def test_loop_verb_runs_rounds_until_dry() -> None:
    """The loop verb runs rounds until the predicate asks for nothing more."""
    recorder = Recorder()
    workflow = Workflow.builder(recorder.executor()).build()

    def next_round(outcomes: list[StepOutcome]) -> Any:
        depth = len(outcomes[0].task_id)
        return LoopDecision.Continue([spec("r" * (depth + 1))] if depth < 3 else [])

    last = await workflow.loop([spec("r")], 10, next_round)
    assert [o.task_id for o in last] == ["rrr"]
    assert recorder.ran == ["r", "rr", "rrr"]


async def test_repeated_phase_names_get_numbered_journals(store: CheckpointStore) -> None:
    """A name used twice in one run is journaled as name, then name#2; finish() clears both."""
    workflow = Workflow.builder(Recorder().executor()).with_store(store).with_root_id("rr").build()
    await workflow.phase("check", [spec("a")])
    await workflow.phase("check", [spec("b")])
    assert await store.list_workflows() == ["rr/check", "rr/check#2"]
    await workflow.finish()
    assert await store.list_workflows() == []


async def test_copies_share_numbering_bus_and_journal_names(store: CheckpointStore) -> None:
    """Phases run through copies continue one numbering and one event stream."""
    workflow = Workflow.builder(Recorder().executor()).with_store(store).with_root_id("cp").build()
    events = workflow.subscribe()
    helper = workflow.copy()
    other = copy.copy(workflow)
    await workflow.phase("a", [spec("x")])
    await helper.phase("b", [spec("y")])
    await other.phase("a", [spec("z")])
    assert helper.root_id == other.root_id == "cp"
    await helper.close()
    assert workflow.closed
    starts = [(e.name, e.index) for e in await collected(events) if isinstance(e, PhaseStart)]
    assert starts == [("a", 0), ("b", 1), ("a", 2)]
    assert await store.list_workflows() == ["cp/a", "cp/a#2", "cp/b"]


async def test_completed_phases_stay_journaled_until_finish(tmp_path: Path) -> None:
    """A second run with the same root id re-runs nothing of phases that completed."""
    target = f"sqlite:{tmp_path / 'journal.db'}"
    first = Recorder()
    async with open_store(target) as store:
        workflow = Workflow.builder(first.executor()).with_store(store).with_root_id("r1").build()
        await workflow.phase("one", [spec("a"), spec("b")])
        await workflow.phase("two", [spec("c")])
        await workflow.close()  # the "crash": closed without finishing
    second = Recorder()
    async with open_store(target) as store:
        workflow = Workflow.builder(second.executor()).with_store(store).with_root_id("r1").build()
        async with workflow:
            outcomes = await workflow.phase("one", [spec("a"), spec("b")])
            await workflow.phase("two", [spec("c")])
            await workflow.phase("three", [spec("d")])
        assert [o.success for o in outcomes] == [True, True]
        assert second.ran == ["d"]
        assert await store.list_workflows() == []


async def test_async_with_keeps_journals_when_the_program_fails(tmp_path: Path) -> None:
    """An exception inside `async with workflow` keeps the journals for a resume."""
    async with open_store(f"sqlite:{tmp_path / 'j.db'}") as store:
        workflow = (
            Workflow.builder(Recorder().executor()).with_store(store).with_root_id("f").build()
        )
        with pytest.raises(RuntimeError, match="program bug"):
            async with workflow:
                await workflow.phase("one", [spec("a")])
                raise RuntimeError("program bug")
        assert await store.list_workflows() == ["f/one"]
        with pytest.raises(WorkflowClosedError, match="'f' is finished"):
            await workflow.phase("two", [spec("b")])


async def test_random_root_id_when_none_given() -> None:
    """Without with_root_id each build gets its own wf-<uuid> id."""
    builder = Workflow.builder(Recorder().executor())
    one, two = builder.build().root_id, builder.build().root_id
    assert one.startswith("wf-") and two.startswith("wf-") and one != two


async def test_step_events_reach_the_bus_and_the_step_sink() -> None:
    """Executor step events go to subscribers and to the builder's step-event sink."""
    seen: list[Any] = []
    workflow = Workflow.builder(Recorder().executor()).with_step_events(seen.append).build()
    events = workflow.subscribe()
    await workflow.parallel([spec("a"), spec("b", "fail")])
    await workflow.close()
    on_bus = [e for e in await collected(events)]
    assert [type(e) for e in on_bus] == [type(e) for e in seen]
    finished = {e.task_id: e.success for e in seen if isinstance(e, StepFinished)}
    assert finished == {"a": True, "b": False}
    assert {e.task_id for e in seen if isinstance(e, StepStarted)} == {"a", "b"}


async def test_lagging_subscriber_does_not_slow_the_workflow() -> None:
    """A subscriber nobody reads never blocks the workflow; it is told how many it lost."""
    workflow = Workflow.builder(Recorder().executor()).build()
    stuck = workflow.subscribe(capacity=5)
    reader_released = asyncio.Event()
    received: list[Any] = []

    async def slow_reader() -> None:
        await reader_released.wait()  # only reads after the workflow is done
        async for event in stuck:
            received.append(event)

    async with asyncio.TaskGroup() as group:
        group.create_task(slow_reader())
        for round_number in range(4):
            workflow.log("info", f"round {round_number}")
            await workflow.phase(f"p{round_number}", [spec(f"t{round_number}")])
        # 4 × (log + phase_start + 2 step events + phase_end) = 20 events, 5 kept.
        await workflow.close()
        reader_released.set()
    assert isinstance(received[0], Lagged) and received[0].missed == 15
    assert stuck.lost == 15
    assert received[1:] == [
        LogEvent(level="info", message="round 3"),
        PhaseStart(name="p3", index=3, step_count=1),
        *received[3:5],
        PhaseEnd(name="p3", index=3, succeeded=1, failed=0),
    ]
    assert [e.type for e in received[3:5]] == ["step_started", "step_finished"]


async def test_subscribers_only_see_later_events_and_end_on_close() -> None:
    """A subscription sees events after it was made; iteration ends when the workflow closes."""
    workflow = Workflow.builder(Recorder().executor()).build()
    workflow.log("info", "before")
    events = workflow.subscribe()
    workflow.log("info", "after")
    await workflow.finish()
    assert [e.message for e in await collected(events)] == ["after"]
    assert await collected(workflow.subscribe()) == []


async def test_events_are_appended_to_a_redis_stream(redis_url: str, key_prefix: str) -> None:
    """With an event stream, another process can read every event from Redis, framed by markers."""
    from redis.asyncio import Redis

    workflow = (
        Workflow.builder(Recorder().executor())
        .with_root_id("streamed")
        .with_event_stream(redis_url, key_prefix=key_prefix, maxlen=1000)
        .build()
    )
    local = workflow.subscribe()
    async with workflow:
        workflow.log("info", "hi", n=2)
        await workflow.phase("p", [spec("a")])
    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(event_stream_key("streamed", key_prefix=key_prefix))
    finally:
        await client.aclose()
    fields = [{k.decode(): v.decode() for k, v in entry.items()} for _id, entry in entries]
    assert fields[0]["control"] == "start"
    assert fields[-1]["control"] == "end" and fields[-1]["status"] == "finished"
    assert [parse_event(f["event"]) for f in fields[1:-1]] == await collected(local)


def test_one_workflow_streams_events_from_two_event_loops(redis_url: str, key_prefix: str) -> None:
    """A workflow (and its event stream) used from two asyncio.run() calls streams both runs."""
    import redis as redis_sync

    store = open_store(redis_url, key_prefix=key_prefix)
    workflow = (
        Workflow.builder(Recorder().executor())
        .with_store(store)
        .with_root_id("two-loops")
        .with_event_stream(redis_url, key_prefix=key_prefix, maxlen=1000)
        .build()
    )
    first = asyncio.run(workflow.phase("one", [spec("a")]))
    second = asyncio.run(workflow.phase("two", [spec("b")]))
    asyncio.run(workflow.finish())
    assert [o.success for o in first + second] == [True, True]
    client = redis_sync.Redis.from_url(redis_url)
    try:
        entries = client.xrange(event_stream_key("two-loops", key_prefix=key_prefix))
    finally:
        client.close()
    fields = [{k.decode(): v.decode() for k, v in entry.items()} for _id, entry in entries]
    assert fields[0]["control"] == "start"
    assert fields[-1]["control"] == "end" and fields[-1]["status"] == "finished"
    phases = [
        event.name
        for event in (parse_event(f["event"]) for f in fields[1:-1])
        if isinstance(event, PhaseStart)
    ]
    assert phases == ["one", "two"]


async def test_an_unreachable_event_stream_never_fails_the_workflow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Events for a Redis nobody listens on are dropped with a warning; the run goes on."""
    from fleet.redis_server import free_port

    workflow = (
        Workflow.builder(Recorder().executor())
        .with_event_stream(f"redis://127.0.0.1:{free_port()}/0")
        .build()
    )
    local = workflow.subscribe()
    async with workflow:
        outcomes = await workflow.phase("p", [spec("a"), spec("b")])
    assert [o.success for o in outcomes] == [True, True]
    assert len(await collected(local)) == 6
    assert "cannot append workflow events to Redis stream" in caplog.text


# --- durable phases across processes -----------------------------------------------------

FLOW = '''
"""Three phases; phase 3's "hang" step blocks forever while FLOW_HANG=1."""

import asyncio
import os
from pathlib import Path

from fleet import AgentStepSpec
from tests.agents import count_and_echo


async def hang(spec, ctx):
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    with open(directory / spec.task_id, "a") as handle:
        handle.write("x")
    if os.environ.get("FLOW_HANG") == "1":
        (directory / "reached-phase-3").touch()
        await asyncio.sleep(3600)
    return spec.prompt


AGENTS = {"count": count_and_echo, "hang": hang}


def step(task_id, agent="count"):
    return AgentStepSpec(task_id=task_id, agent=agent, description=task_id, prompt=task_id)


async def main(workflow):
    await workflow.phase("gather", [step("g1"), step("g2"), step("g3")])
    await workflow.phase("review", [step("r1"), step("r2")])
    done = await workflow.phase("publish", [step("p1", "hang")])
    return [o.output for o in done]
'''


def fleet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


def flow_env(counters: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        FLEET_TEST_COUNTER_DIR=str(counters),
        FLEET_AGENTS_FILE=str(counters / "no-agents.toml"),
        **extra,
    )
    return env


def counts(counters: Path) -> dict[str, int]:
    return {
        path.name: len(path.read_text())
        for path in counters.iterdir()
        if path.suffix == "" and not path.name.startswith("reached")
    }


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    process: subprocess.Popen[str],
    what: str = "phase 3",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"child exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child never reached {what} in {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.faults
def test_killed_in_phase_3_resumes_without_rerunning_phases_1_and_2(tmp_path: Path) -> None:
    """kill -9 in phase 3, run again with the same root id: phases 1–2 do not run again."""
    flow = tmp_path / "three_phases.py"
    flow.write_text(FLOW)
    counters = tmp_path / "counters"
    counters.mkdir()
    command = fleet_command(
        "run", f"{flow}:main", "--root-id", "durable-1", "--store", f"sqlite:{tmp_path / 'j.db'}"
    )
    child = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=flow_env(counters, FLOW_HANG="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for((counters / "reached-phase-3").exists, 60, child)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert counts(counters) == {"g1": 1, "g2": 1, "g3": 1, "r1": 1, "r2": 1, "p1": 1}

    rerun = subprocess.run(
        command,
        cwd=tmp_path,
        env=flow_env(counters),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert counts(counters) == {"g1": 1, "g2": 1, "g3": 1, "r1": 1, "r2": 1, "p1": 2}
    assert "1 step run (0 failed), 5 served from the journal" in rerun.stdout
    assert 'result: [\n  "p1"\n]' in rerun.stdout
