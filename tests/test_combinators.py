"""The grammar: fan-out, pipelines and loops (orchestration-semantics §4.1, §4.2, §4.9)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fleet import (
    AgentExecutor,
    AgentStepSpec,
    LoopDecision,
    StepOutcome,
    execute_loop,
    execute_pipeline,
    execute_steps_parallel,
)
from tests.celery_support import until


def spec(task_id: str, agent: str = "echo", prompt: str | None = None) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description=f"step {task_id}", prompt=prompt or f"p-{task_id}"
    )


class MockExecutor(AgentExecutor):
    """Sleeps, then echoes; agent 'fail' fails, 'boom' raises (breaking the contract on purpose)."""

    def __init__(self, hint: int = 4, delay: float = 0.015) -> None:
        self.hint = hint
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.ran: list[str] = []
        self.started: list[str] = []

    def concurrency_hint(self) -> int:
        return self.hint

    async def execute_step(self, spec: AgentStepSpec, events: object = None) -> StepOutcome:
        self.started.append(spec.task_id)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            delay = float(spec.prompt.split("sleep=")[1]) if "sleep=" in spec.prompt else self.delay
            await asyncio.sleep(delay)
            if spec.agent == "boom":
                raise RuntimeError("kaboom")
            self.ran.append(spec.task_id)
            if spec.agent == "fail":
                return StepOutcome.failed(spec.task_id, spec.agent, "refused", error="failed")
            return StepOutcome(
                task_id=spec.task_id,
                session_id=f"task-run-{spec.task_id}",
                agent=spec.agent,
                output=f"ran: {spec.prompt}",
                success=True,
            )
        finally:
            self.active -= 1


class BareExecutor(AgentExecutor):
    async def execute_step(self, spec: AgentStepSpec, events: object = None) -> StepOutcome:
        raise NotImplementedError


async def test_fans_out_in_input_order() -> None:
    """Results come back in input order whatever order steps finish in."""
    executor = MockExecutor(hint=8)
    specs = [spec("a", prompt="sleep=0.05"), spec("b", prompt="sleep=0.0"), spec("c")]
    outcomes = await execute_steps_parallel(executor, specs)
    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    assert all(o.success for o in outcomes)
    assert outcomes[2].output == "ran: p-c"


async def test_respects_concurrency_hint_exactly() -> None:
    """Peak concurrency equals the hint (2 of 6)."""
    executor = MockExecutor(hint=2)
    await execute_steps_parallel(executor, [spec(str(i)) for i in range(6)])
    assert executor.peak == 2


async def test_sliding_window_not_batches() -> None:
    """A slow step does not hold back the next ones: the window slides as each step ends."""
    executor = MockExecutor(hint=2)
    specs = [spec("slow", prompt="sleep=0.3")] + [
        spec(f"f{i}", prompt="sleep=0.01") for i in range(5)
    ]
    await execute_steps_parallel(executor, specs)
    # With batches of 2, f2.. would wait for 'slow'; with a window they all finish first.
    assert executor.ran[:5] == ["f0", "f1", "f2", "f3", "f4"]
    assert executor.ran[-1] == "slow"
    assert executor.started == [s.task_id for s in specs]


async def test_isolates_failed_and_crashed_steps() -> None:
    """A failing and a crashing step fail alone; the crash keeps its task id and agent."""
    executor = MockExecutor(hint=8)
    outcomes = await execute_steps_parallel(
        executor, [spec("ok"), spec("f", "fail"), spec("x", "boom"), spec("ok2")]
    )
    assert [o.success for o in outcomes] == [True, False, False, True]
    crashed = outcomes[2]
    assert (crashed.task_id, crashed.agent, crashed.error) == ("x", "boom", "crashed")
    assert "kaboom" in crashed.output
    assert outcomes[1].error == "failed"


def test_default_concurrency_hint_is_eight() -> None:
    """A bare executor's hint is the framework default."""
    assert BareExecutor().concurrency_hint() == 8


@pytest.mark.parametrize("hint", [0, -3])
async def test_zero_or_negative_hint_still_makes_progress(hint: int) -> None:
    """A hint below 1 behaves as 1: everything runs, serially, in order."""
    executor = MockExecutor(hint=hint)
    outcomes = await execute_steps_parallel(executor, [spec("a"), spec("b"), spec("c")])
    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    assert executor.peak == 1


async def test_empty_inputs_return_empty() -> None:
    """Empty fan-out and pipeline return [] without touching the executor."""
    executor = MockExecutor()
    assert await execute_steps_parallel(executor, []) == []
    assert await execute_pipeline(executor, [], [lambda prev, item: spec(item)]) == []
    assert executor.started == []


async def test_empty_stages_give_none_per_item() -> None:
    """With no stages every item's result is None."""
    assert await execute_pipeline(MockExecutor(), ["a", "b"], []) == [None, None]


async def test_duplicate_ids_are_not_deduplicated_in_plain_fanout() -> None:
    """The plain fan-out runs duplicate ids both times; results stay by index."""
    executor = MockExecutor()
    outcomes = await execute_steps_parallel(
        executor, [spec("d", prompt="one"), spec("d", prompt="two")]
    )
    assert [o.output for o in outcomes] == ["ran: one", "ran: two"]


def review_stages() -> list:
    def draft(prev: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"draft-{item}", prompt=item)

    def review(prev: StepOutcome | None, item: str) -> AgentStepSpec:
        assert prev is not None
        return spec(f"review-{item}", prompt=f"review of: {prev.output.removeprefix('ran: ')}")

    return [draft, review]


async def test_each_item_chains_through_stages() -> None:
    """Later stages see the prior stage's output."""
    outcomes = await execute_pipeline(MockExecutor(), ["alpha", "beta"], review_stages())
    assert [o.output for o in outcomes if o] == ["ran: review of: alpha", "ran: review of: beta"]
    assert [o.task_id for o in outcomes if o] == ["review-alpha", "review-beta"]


async def test_chain_stops_on_failure_and_on_none_stage() -> None:
    """A failed stage-1 step is the item's result; a None stage 2 returns the stage-1 outcome."""
    executor = MockExecutor()

    def first(prev: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"s1-{item}", "fail" if item == "bad" else "echo")

    def second(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
        return None if item == "stop" else spec(f"s2-{item}")

    bad, stop = await execute_pipeline(executor, ["bad", "stop"], [first, second])
    assert bad is not None and (bad.task_id, bad.success) == ("s1-bad", False)
    assert stop is not None and (stop.task_id, stop.success) == ("s1-stop", True)
    assert "s2-bad" not in executor.started and "s2-stop" not in executor.started


async def test_first_stage_none_yields_none() -> None:
    """An item whose first stage declines gets None; the other item succeeds."""

    def first(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
        return None if item == "skip" else spec(item)

    skipped, ran = await execute_pipeline(MockExecutor(), ["skip", "go"], [first])
    assert skipped is None
    assert ran is not None and ran.success


async def test_pipeline_concurrency_bounded_by_hint() -> None:
    """8 items × 2 stages with hint 4: never more than 4 steps at once."""
    executor = MockExecutor(hint=4)
    outcomes = await execute_pipeline(executor, [str(i) for i in range(8)], review_stages())
    assert all(o is not None and o.success for o in outcomes)
    assert executor.peak == 4


async def test_no_barrier_between_stages() -> None:
    """A fast item finishes every stage while a slow item is still in stage 1."""
    executor = MockExecutor(hint=4)

    def stage(n: int):
        def build(prev: StepOutcome | None, item: str) -> AgentStepSpec:
            delay = 0.4 if (item == "slow" and n == 1) else 0.01
            return spec(f"{item}-{n}", prompt=f"sleep={delay}")

        return build

    await execute_pipeline(executor, ["slow", "fast"], [stage(1), stage(2), stage(3)])
    assert executor.ran.index("fast-3") < executor.ran.index("slow-1")


async def test_crashing_stage_isolates_to_its_chain() -> None:
    """A stage function or step that raises gives None for that item only."""

    def first(prev: StepOutcome | None, item: str) -> AgentStepSpec:
        if item == "raise":
            raise ValueError("stage bug")
        return spec(item, "boom" if item == "boom" else "echo")

    outcomes = await execute_pipeline(MockExecutor(), ["a", "raise", "boom", "b"], [first])
    assert outcomes[0] is not None and outcomes[0].success
    assert outcomes[1] is None and outcomes[2] is None
    assert outcomes[3] is not None and outcomes[3].success


async def test_loop_stops_when_predicate_says_stop() -> None:
    """Continue twice then Stop: 3 rounds; the last round is returned."""
    calls: list[int] = []

    def decide(outcomes: list[StepOutcome]):
        calls.append(len(outcomes))
        if len(calls) < 3:
            return LoopDecision.Continue([spec(f"r{len(calls)}")])
        return LoopDecision.Stop()

    last = await execute_loop(MockExecutor(), [spec("a"), spec("b")], 10, decide)
    assert calls == [2, 1, 1]
    assert [o.task_id for o in last] == ["r2"]


async def test_loop_is_hard_capped() -> None:
    """An always-Continue predicate with cap 3 is called exactly 3 times."""
    executor = MockExecutor()
    calls = 0

    def always(outcomes: list[StepOutcome]):
        nonlocal calls
        calls += 1
        return LoopDecision.Continue([spec(f"again{calls}")])

    last = await execute_loop(executor, [spec("a")], 3, always)
    assert calls == 3
    assert len(executor.started) == 3
    assert [o.task_id for o in last] == ["again2"]


@pytest.mark.parametrize("cap", [0, -1])
async def test_loop_cap_below_one_runs_one_round(cap: int) -> None:
    """max_iterations < 1 is taken as 1."""
    executor = MockExecutor()
    await execute_loop(executor, [spec("a")], cap, lambda o: LoopDecision.Continue([spec("b")]))
    assert executor.started == ["a"]


async def test_loop_with_empty_initial_runs_nothing() -> None:
    """Empty initial: returns [], the predicate is never called."""

    def never(outcomes: Sequence[StepOutcome]):
        raise AssertionError("predicate must not be called")

    assert await execute_loop(MockExecutor(), [], 5, never) == []


async def test_loop_stops_when_dry() -> None:
    """Continue([]) after round 1 ends the loop and returns round 1."""
    last = await execute_loop(
        MockExecutor(), [spec("a")], 5, lambda outcomes: LoopDecision.Continue([])
    )
    assert [o.task_id for o in last] == ["a"]


async def test_loop_accepts_an_async_predicate() -> None:
    """The predicate may be a coroutine function."""
    rounds = 0

    async def decide(outcomes: list[StepOutcome]):
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0)
        return LoopDecision.Stop() if rounds == 2 else LoopDecision.Continue([spec("n")])

    await execute_loop(MockExecutor(), [spec("a")], 9, decide)
    assert rounds == 2


async def test_loop_rejects_a_wrong_decision_type() -> None:
    """A predicate returning something else fails loudly, naming the fix."""
    with pytest.raises(TypeError, match="LoopDecision.Continue"):
        await execute_loop(MockExecutor(), [spec("a")], 3, lambda outcomes: True)


async def test_cancelling_the_caller_cancels_in_flight_steps() -> None:
    """Cancelling a fan-out cancels every running step and leaves no task behind."""
    executor = MockExecutor(hint=4)
    before = asyncio.all_tasks()
    task = asyncio.create_task(
        execute_steps_parallel(executor, [spec(str(i), prompt="sleep=5") for i in range(8)])
    )
    await until(lambda: executor.active >= 4, 10.0, "the first steps to start")
    assert executor.active == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert executor.active == 0
    assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()
