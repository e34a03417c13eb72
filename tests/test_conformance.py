"""One conformance suite, two hosts: every combinator behaves the same in-process and on Celery.

Each test runs against ``LocalExecutor`` and against ``CeleryExecutor`` driving two real
worker processes (threads pool) on the session's Redis, with the same agents
(tests/agents.toml). Pipelines on Celery run both as Celery chains (stages registered
by name) and host-driven (the same stages wrapped in closures).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet import (
    AgentExecutor,
    AgentStepSpec,
    LocalExecutor,
    LoopDecision,
    StepOutcome,
    execute_loop,
    execute_pipeline,
    execute_steps_parallel,
    load_agents,
)
from fleet.celery import CeleryExecutor
from fleet.checkpoint import WorkflowCheckpoint, WorkflowStepRecord, step_identity
from fleet.events import StepFinished
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import CheckpointStore, MemoryCheckpointStore, RedisCheckpointStore
from tests import pipeline_stages as stages
from tests.celery_support import AGENTS_FILE, CeleryWorkers, fleet_settings, running_workers

pytestmark = [pytest.mark.redis, pytest.mark.celery]


# --------------------------------------------------------------------------- hosts


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


@pytest.fixture(scope="module")
def gauge_env(redis_url: str) -> dict[str, str]:
    return {
        "FLEET_TEST_GAUGE_URL": redis_url,
        "FLEET_TEST_GAUGE_KEY": f"fleet-test-gauge-{uuid.uuid4().hex[:8]}",
    }


@pytest.fixture(scope="module")
def workers(
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    counter_dir: Path,
    gauge_env: dict[str, str],
) -> Iterator[CeleryWorkers]:
    settings = fleet_settings(redis_url, claim_timeout_s=5.0, step_lease_s=2.0)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), **gauge_env}
    directory = tmp_path_factory.mktemp("workers")
    with running_workers(settings, directory, "worker1", "worker2", concurrency=3, env=env) as w:
        yield w


@dataclass
class Host:
    """Makes executors of one kind with a given concurrency hint."""

    kind: str
    workers: CeleryWorkers | None
    made: list[AgentExecutor] = field(default_factory=list)

    def executor(self, hint: int = 4) -> AgentExecutor:
        made: AgentExecutor
        if self.workers is None:
            made = LocalExecutor(agents=load_agents(AGENTS_FILE), max_concurrency=hint)
        else:
            made = self.workers.executor(max_in_flight=max(hint, 1))
        self.made.append(made)
        return made

    async def close(self) -> None:
        for made in self.made:
            if isinstance(made, CeleryExecutor):
                await made.aclose()


@pytest.fixture(params=["local", "celery"])
async def host(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    counter_dir: Path,
    gauge_env: dict[str, str],
) -> AsyncIterator[Host]:
    # The in-process host sees the same environment the workers were started with.
    monkeypatch.setenv("FLEET_TEST_COUNTER_DIR", str(counter_dir))
    for name, value in gauge_env.items():
        monkeypatch.setenv(name, value)
    clear(counter_dir)
    made = Host(
        request.param,
        request.getfixturevalue("workers") if request.param == "celery" else None,
    )
    try:
        yield made
    finally:
        await made.close()


def clear(directory: Path) -> None:
    for old in directory.iterdir():
        old.unlink()


@pytest.fixture
def gauge(redis_url: str, gauge_env: dict[str, str]) -> Iterator[Callable[[], int]]:
    """Resets the concurrency gauge; calling it returns the peak since."""
    client = redis.Redis.from_url(redis_url)
    key = gauge_env["FLEET_TEST_GAUGE_KEY"]
    client.delete(f"{key}:now", f"{key}:peak")
    yield lambda: int(client.get(f"{key}:peak") or 0)
    client.close()


def runs(counter_dir: Path) -> Counter[str]:
    """How many times each count_where step ran."""
    return Counter(
        {p.name: len(p.read_text().splitlines()) for p in counter_dir.iterdir() if p.is_file()}
    )


def spec(task_id: str, agent: str = "slow_echo", prompt: str | None = None) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description=f"step {task_id}", prompt=prompt or f"p-{task_id}"
    )


def view(outcome: StepOutcome | None) -> Any:
    """What must be identical across hosts (not where or how long a step ran)."""
    if outcome is None:
        return None
    return outcome.model_dump(exclude={"duration_s", "worker"})


# --------------------------------------------------------------------------- fan-out


async def test_fans_out_in_input_order(host: Host) -> None:
    """Results come back in input order whatever order steps finish in."""
    specs = [spec("a", "sleep_prompt", "0.3"), spec("b", "sleep_prompt", "0"), spec("c")]
    outcomes = await execute_steps_parallel(host.executor(8), specs)
    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    assert [o.output for o in outcomes] == ["0.3", "0", "p-c"]
    assert all(o.success and o.error is None for o in outcomes)


async def test_peak_concurrency_never_exceeds_the_hint(
    host: Host, gauge: Callable[[], int]
) -> None:
    """Hint 2, six 50 ms steps: never more than two run at once."""
    outcomes = await execute_steps_parallel(
        host.executor(2), [spec(f"g{i}", "gauge") for i in range(6)]
    )
    assert all(o.success for o in outcomes)
    assert 1 <= gauge() <= 2


async def test_hint_of_one_runs_serially_in_order(host: Host, gauge: Callable[[], int]) -> None:
    """The smallest hint still makes progress, one step at a time, in order."""
    outcomes = await execute_steps_parallel(
        host.executor(1), [spec(f"g{i}", "gauge") for i in range(3)]
    )
    assert [o.output for o in outcomes] == ["p-g0", "p-g1", "p-g2"]
    assert gauge() == 1


async def test_isolates_failed_and_crashed_steps(host: Host) -> None:
    """[ok, fail, boom, unknown, ok2]: failures are values with their kind; siblings succeed."""
    specs = [spec("ok"), spec("f", "fail"), spec("b", "boom"), spec("u", "nope"), spec("ok2")]
    outcomes = await execute_steps_parallel(host.executor(), specs)
    assert [o.success for o in outcomes] == [True, False, False, False, True]
    assert [o.error for o in outcomes] == [None, "failed", "crashed", "unknown_agent", None]
    assert [o.agent for o in outcomes] == ["slow_echo", "fail", "boom", "nope", "slow_echo"]
    assert "boom" in outcomes[2].output and "RuntimeError" in outcomes[2].output
    assert "'slow_echo'" in outcomes[3].output  # lists what is registered


async def test_empty_inputs_return_empty(host: Host) -> None:
    """No specs, no items: empty results; no stages: None per item."""
    executor = host.executor()
    assert await execute_steps_parallel(executor, []) == []
    assert await execute_pipeline(executor, [], [stages.draft]) == []
    assert await execute_pipeline(executor, ["a", "b"], []) == [None, None]


async def test_duplicate_ids_both_run_in_plain_fanout(host: Host, counter_dir: Path) -> None:
    """Plain fan-out does not de-duplicate: both steps run, each keeps its own output."""
    specs = [spec("dup", "count_where", "first"), spec("dup", "count_where", "second")]
    outcomes = await execute_steps_parallel(host.executor(), specs)
    assert [o.output for o in outcomes] == ["first", "second"]
    assert runs(counter_dir) == Counter({"dup": 2})


async def test_same_task_id_runs_again_in_a_later_round(host: Host, counter_dir: Path) -> None:
    """A non-journaled round never reuses an earlier round's result for the same task id."""
    executor = host.executor()
    for _ in range(2):
        (outcome,) = await execute_steps_parallel(executor, [spec("again", "count_where")])
        assert outcome.success
    assert runs(counter_dir) == Counter({"again": 2})


async def test_step_events_are_emitted_per_step(host: Host) -> None:
    """Each step reports step_started then step_finished (with its error kind)."""
    seen: list[Any] = []
    await execute_steps_parallel(
        host.executor(), [spec("a"), spec("f", "fail")], events=seen.append
    )
    kinds = Counter((e.type, e.task_id) for e in seen)
    assert kinds == Counter(
        {
            ("step_started", "a"): 1,
            ("step_finished", "a"): 1,
            ("step_started", "f"): 1,
            ("step_finished", "f"): 1,
        }
    )
    finished = {e.task_id: e for e in seen if isinstance(e, StepFinished)}
    assert finished["f"].error == "failed" and finished["a"].success


async def test_results_identical_across_hosts(host: Host) -> None:
    """The same round gives the same outcomes on either host (but for where and how long)."""
    specs = [spec("a"), spec("f", "fail"), spec("b", "boom"), spec("e", "echo", "hello")]
    reference = LocalExecutor(agents=load_agents(AGENTS_FILE))
    expected = [view(o) for o in await execute_steps_parallel(reference, specs)]
    assert [view(o) for o in await execute_steps_parallel(host.executor(), specs)] == expected


# --------------------------------------------------------------------------- pipelines


@pytest.fixture(params=["registered", "closures"])
def as_stages(request: pytest.FixtureRequest) -> Callable[..., list[Any]]:
    """Registered stages (Celery chains) or the same stages in closures (host-driven)."""
    if request.param == "registered":
        return lambda *fns: list(fns)
    return lambda *fns: [lambda prev, item, fn=fn: fn(prev, item) for fn in fns]


async def test_each_item_chains_through_stages(host: Host, as_stages: Any) -> None:
    """2 items x 2 stages: later stages see the earlier output."""
    outcomes = await execute_pipeline(
        host.executor(), ["alpha", "beta"], as_stages(stages.draft, stages.review)
    )
    assert [o.output if o else None for o in outcomes] == ["review of: alpha", "review of: beta"]
    assert [o.task_id if o else None for o in outcomes] == ["review-alpha", "review-beta"]


async def test_chain_stops_on_failure_and_on_none_stage(host: Host, as_stages: Any) -> None:
    """alpha fails at stage 1 (that outcome returned); beta stops at stage 2 (stage 1 returned)."""
    outcomes = await execute_pipeline(
        host.executor(), ["alpha", "beta", "gamma"], as_stages(stages.fail_alpha, stages.stop_beta)
    )
    alpha, beta, gamma = outcomes
    assert alpha is not None and not alpha.success and alpha.task_id == "draft-alpha"
    assert beta is not None and beta.success and beta.task_id == "draft-beta"
    assert gamma is not None and gamma.output == "review of: gamma"


async def test_first_stage_none_yields_none(host: Host, as_stages: Any) -> None:
    """An item whose first stage declines gets None; the other item succeeds."""
    outcomes = await execute_pipeline(
        host.executor(), ["skip", "keep"], as_stages(stages.skip_first, stages.review)
    )
    assert outcomes[0] is None
    assert outcomes[1] is not None and outcomes[1].output == "review of: keep"


async def test_crashing_stage_isolates_to_its_chain(host: Host, as_stages: Any) -> None:
    """The middle item's stage raises: its result is None, its neighbours succeed."""
    outcomes = await execute_pipeline(
        host.executor(), ["a", "boom", "c"], as_stages(stages.draft, stages.crash_middle)
    )
    assert outcomes[1] is None
    assert [o.output if o else None for o in (outcomes[0], outcomes[2])] == [
        "review of: a",
        "review of: c",
    ]


async def test_pipeline_concurrency_bounded_by_hint(
    host: Host, as_stages: Any, gauge: Callable[[], int]
) -> None:
    """8 items x 2 stages with hint 4: never more than four steps at once."""
    items = [f"i{n}" for n in range(8)]
    outcomes = await execute_pipeline(
        host.executor(4), items, as_stages(stages.gauged, stages.gauged)
    )
    assert [o.task_id if o else None for o in outcomes] == [f"g2-i{n}" for n in range(8)]
    assert 1 <= gauge() <= 4


async def test_no_barrier_between_stages(host: Host, as_stages: Any) -> None:
    """A fast item finishes both stages while a slow item is still in stage 1."""
    seen: list[Any] = []
    outcomes = await execute_pipeline(
        host.executor(4),
        ["slow:0.8", "fast:0"],
        as_stages(stages.sleepy, stages.review),
        events=seen.append,
    )
    assert [o.output if o else None for o in outcomes] == ["review of: 0.8", "review of: 0"]
    finished = [e.task_id for e in seen if isinstance(e, StepFinished)]
    assert finished.index("review-fast:0") < finished.index("sleep-slow")


async def test_pipeline_results_identical_across_hosts(host: Host, as_stages: Any) -> None:
    """The same pipeline gives the same outcomes on either host."""
    items = ["alpha", "beta", "gamma"]
    fns = (stages.fail_alpha, stages.stop_beta)
    reference = LocalExecutor(agents=load_agents(AGENTS_FILE))
    expected = [view(o) for o in await execute_pipeline(reference, items, list(fns))]
    got = await execute_pipeline(host.executor(), items, as_stages(*fns))
    assert [view(o) for o in got] == expected


async def test_celery_runs_registered_stages_as_chains_only(host: Host) -> None:
    """Registered stages take the Celery-chain shape; closures and odd items are declined."""
    executor = host.executor()
    if not isinstance(executor, CeleryExecutor):
        assert await executor.native_pipeline(["a"], [stages.draft]) is None
        return
    native = await executor.native_pipeline(["a"], [stages.draft])
    assert native is not None and native[0] is not None and native[0].output == "a"
    assert await executor.native_pipeline(["a"], [lambda p, i: stages.draft(p, i)]) is None
    assert await executor.native_pipeline([("a", 1)], [stages.draft]) is None  # tuple != list


# --------------------------------------------------------------------------- loops


async def test_loop_stops_when_predicate_says_stop(host: Host) -> None:
    """Continue twice, then Stop: three rounds, the last one returned."""
    calls = 0

    def next_round(outcomes: list[StepOutcome]) -> Any:
        nonlocal calls
        calls += 1
        if calls < 3:
            return LoopDecision.Continue([spec(f"r{calls}")])
        return LoopDecision.Stop()

    last = await execute_loop(host.executor(), [spec("r0")], 10, next_round)
    assert calls == 3
    assert [o.task_id for o in last] == ["r2"]


async def test_loop_is_hard_capped(host: Host) -> None:
    """An always-Continue predicate with cap 3: called exactly three times."""
    calls = 0

    def always(outcomes: list[StepOutcome]) -> Any:
        nonlocal calls
        calls += 1
        return LoopDecision.Continue([spec(f"r{calls}")])

    last = await execute_loop(host.executor(), [spec("r0")], 3, always)
    assert calls == 3 and [o.task_id for o in last] == ["r2"]


async def test_loop_with_empty_initial_runs_nothing(host: Host) -> None:
    """Empty initial: [] and the predicate is never called."""

    def never(outcomes: list[StepOutcome]) -> Any:
        raise AssertionError("predicate called")

    assert await execute_loop(host.executor(), [], 5, never) == []


async def test_loop_stops_when_dry(host: Host) -> None:
    """Continue([]) after round one ends the loop with round one's outcomes."""
    last = await execute_loop(
        host.executor(), [spec("a"), spec("b")], 5, lambda _: LoopDecision.Continue([])
    )
    assert [o.output for o in last] == ["p-a", "p-b"]


# --------------------------------------------------------------------------- resumable


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_url: str, key_prefix: str
) -> AsyncIterator[CheckpointStore]:
    made: CheckpointStore = (
        MemoryCheckpointStore()
        if request.param == "memory"
        else RedisCheckpointStore(redis_url, key_prefix=key_prefix)
    )
    try:
        yield made
    finally:
        await made.close()


def cached(workflow_id: str, s: AgentStepSpec, output: str) -> WorkflowStepRecord:
    outcome = StepOutcome(
        task_id=s.task_id,
        session_id="original-session",
        agent=s.agent,
        output=output,
        success=True,
        worker="worker9@elsewhere",
    )
    return WorkflowStepRecord.for_outcome(workflow_id, s, outcome)


async def test_resumable_skips_completed_then_clears_on_success(
    host: Host, store: CheckpointStore, counter_dir: Path
) -> None:
    """A journaled step is served unchanged without running; full success deletes the journal."""
    a, b = spec("a", "count_where"), spec("b", "count_where")
    await store.record_step("wf", cached("wf", a, "CACHED"))
    outcomes = await execute_steps_parallel_resumable(host.executor(), [a, b], "wf", store)
    assert runs(counter_dir) == Counter({"b": 1})
    assert [o.output for o in outcomes] == ["CACHED", "p-b"]
    assert outcomes[0].session_id == "original-session"
    assert await store.load("wf") is None


async def test_resumable_fences_a_stale_step(host: Host, store: CheckpointStore) -> None:
    """Same task id, new prompt: nothing runs, every step fails as stale, the journal stays."""
    await store.record_step("wf", cached("wf", spec("a", prompt="old"), "old"))
    outcomes = await execute_steps_parallel_resumable(
        host.executor(), [spec("a", prompt="new"), spec("b")], "wf", store
    )
    assert [(o.success, o.error) for o in outcomes] == [(False, "checkpoint")] * 2
    assert "stale" in outcomes[0].output
    assert await store.load("wf") is not None


async def test_resumable_keeps_only_successes_on_partial_failure(
    host: Host, store: CheckpointStore
) -> None:
    """[ok, bad]: the journal is kept and holds only ok, bound to its identity."""
    ok, bad = spec("ok"), spec("bad", "fail")
    outcomes = await execute_steps_parallel_resumable(host.executor(), [ok, bad], "wf", store)
    assert [o.success for o in outcomes] == [True, False]
    checkpoint = await store.load("wf")
    assert checkpoint is not None and list(checkpoint.completed()) == ["ok"]
    assert checkpoint.steps[0].identity == step_identity("wf", ok)


async def test_resumable_fails_closed_on_a_future_journal(
    host: Host, store: CheckpointStore, counter_dir: Path
) -> None:
    """A future-version journal: nothing runs, every outcome says it cannot be resumed."""
    await store.save(
        WorkflowCheckpoint.from_records("wf", [cached("wf", spec("a"), "x")], schema_version=2)
    )
    specs = [spec("a", "count_where"), spec("b", "count_where")]
    outcomes = await execute_steps_parallel_resumable(host.executor(), specs, "wf", store)
    assert all(not o.success and "cannot be resumed" in o.output for o in outcomes)
    assert runs(counter_dir) == Counter()


async def test_resumable_ignores_journaled_steps_absent_from_new_specs(
    host: Host, store: CheckpointStore, counter_dir: Path
) -> None:
    """Journal {a, b}, new round [b, c]: only c runs."""
    for s in (spec("a", "count_where"), spec("b", "count_where")):
        await store.record_step("wf", cached("wf", s, f"cached-{s.task_id}"))
    outcomes = await execute_steps_parallel_resumable(
        host.executor(), [spec("b", "count_where"), spec("c", "count_where")], "wf", store
    )
    assert [o.output for o in outcomes] == ["cached-b", "p-c"]
    assert runs(counter_dir) == Counter({"c": 1})


async def test_resumable_refuses_duplicate_ids(
    host: Host, store: CheckpointStore, counter_dir: Path
) -> None:
    """[dup, dup, keep]: only keep runs; both dups fail as duplicated."""
    specs = [
        spec("dup", "count_where", "first"),
        spec("dup", "count_where", "second"),
        spec("keep", "count_where"),
    ]
    outcomes = await execute_steps_parallel_resumable(host.executor(1), specs, "wf", store)
    assert [o.error for o in outcomes] == ["duplicate_task_id", "duplicate_task_id", None]
    assert all("first" not in o.output and "second" not in o.output for o in outcomes[:2])
    assert runs(counter_dir) == Counter({"keep": 1})


async def test_resume_soak_does_not_repeat_completed_steps(
    host: Host, store: CheckpointStore, counter_dir: Path
) -> None:
    """6 workflows x 2 steps; step 2 fails once; the second pass re-runs only step 2."""
    executor = host.executor(4)
    workflows = [f"soak-{n}" for n in range(6)]
    for wf in workflows:
        first = [spec("step-1", "count_where"), spec("step-2", "fail")]
        outcomes = await execute_steps_parallel_resumable(executor, first, wf, store)
        assert [o.success for o in outcomes] == [True, False]
    for wf in workflows:
        second = [spec("step-1", "count_where"), spec("step-2", "count_where")]
        outcomes = await execute_steps_parallel_resumable(executor, second, wf, store)
        assert all(o.success for o in outcomes)
        assert await store.load(wf) is None
    assert runs(counter_dir) == Counter({"step-1": 6, "step-2": 6})


async def test_a_failed_step_runs_again_when_the_round_is_resumed(
    host: Host, store: CheckpointStore, counter_dir: Path, tmp_path: Path
) -> None:
    """A failure is never served from a previous dispatch: the resumed round runs it again."""
    flaky = spec("flaky", "count_where", "x")
    executor = host.executor()
    # The same spec fails the first time only because its output does not match a schema.
    schema = {"type": "integer"}
    strict = flaky.model_copy(update={"output_schema": schema})
    outcomes = await execute_steps_parallel_resumable(executor, [strict], "wf", store)
    assert outcomes[0].error == "schema"
    outcomes = await execute_steps_parallel_resumable(executor, [strict], "wf", store)
    assert outcomes[0].error == "schema"
    assert runs(counter_dir) == Counter({"flaky": 2})
