"""LocalExecutor: the embedded default host."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleet import (
    AgentContext,
    AgentResult,
    AgentStepSpec,
    LocalExecutor,
    TokenUsage,
    execute_steps_parallel,
)
from fleet.errors import AgentError, ConfigError
from fleet.events import StepFinished, StepStarted


def spec(
    task_id: str, agent: str = "echo", prompt: str = "hello", **extra: object
) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent=agent, description="d", prompt=prompt, **extra)


async def test_echo_runs_and_reports_usage() -> None:
    """The built-in echo returns the prompt, reports a token estimate and runs 'local'."""
    outcome = await LocalExecutor().execute_step(spec("a", prompt="x" * 40))
    assert outcome.success and outcome.output == "x" * 40
    assert outcome.usage == TokenUsage(prompt_tokens=10, completion_tokens=10, total_tokens=20)
    assert outcome.worker == "local" and outcome.session_id == "task-run-a"
    assert outcome.error is None


async def test_unknown_agent_lists_registered_names() -> None:
    """An unknown agent fails the step with unknown_agent and names what is registered."""
    executor = LocalExecutor(agents={"review": "tests.agents:slow_echo"})
    outcome = await executor.execute_step(spec("a", agent="reviwe"))
    assert not outcome.success and outcome.error == "unknown_agent"
    assert (
        "'reviwe'" in outcome.output and "'echo'" in outcome.output and "'review'" in outcome.output
    )


async def test_dotted_path_agents_are_registered() -> None:
    """Agents given as 'package.module:function' run like any other."""
    executor = LocalExecutor(agents={"slow": "tests.agents:slow_echo"})
    outcome = await executor.execute_step(spec("a", agent="slow", prompt="hi"))
    assert outcome.success and outcome.output == "hi"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.agents", "not of the form"),
        ("tests.nope:x", "cannot import module"),
        ("tests.agents:missing", "has no attribute"),
        ("tests.agents:__doc__", "not callable"),
        ("json:dumps", "async function"),
    ],
)
def test_bad_agent_targets_fail_at_construction(target: str, message: str) -> None:
    """A bad dotted path is a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=message):
        LocalExecutor(agents={"x": target})


async def test_one_concurrency_limit_shared_by_every_fanout() -> None:
    """Two fan-outs through one executor never exceed its max_concurrency together."""
    active = peak = 0

    async def tracked(spec: AgentStepSpec, ctx: AgentContext) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return "ok"

    executor = LocalExecutor(agents={"t": tracked}, max_concurrency=3)
    rounds = [[spec(f"{r}-{i}", agent="t") for i in range(6)] for r in range(2)]
    results = await asyncio.gather(*(execute_steps_parallel(executor, specs) for specs in rounds))
    assert all(o.success for round_ in results for o in round_)
    assert peak == 3
    assert executor.concurrency_hint() == 3


async def test_timeout_fails_the_step_with_timeout() -> None:
    """A step past its timeout_s fails with error 'timeout'; siblings are unaffected."""
    executor = LocalExecutor(agents={"sleep": "tests.agents:sleep_prompt"})
    slow, fast = await execute_steps_parallel(
        executor,
        [spec("slow", "sleep", "5", timeout_s=0.1), spec("fast", "sleep", "0.01", timeout_s=2)],
    )
    assert (slow.success, slow.error) == (False, "timeout")
    assert "timed out after 0.1 s" in slow.output
    assert slow.duration_s < 2
    assert fast.success


async def test_agent_error_kind_becomes_the_outcome_error() -> None:
    """AgentError(kind=...) fails the step with that kind; other exceptions are 'crashed'."""

    async def picky(spec: AgentStepSpec, ctx: AgentContext) -> str:
        raise AgentError("model said no", kind="provider")

    executor = LocalExecutor(agents={"picky": picky, "boom": "tests.agents:boom"})
    picky_out, boom_out = await execute_steps_parallel(
        executor, [spec("p", "picky"), spec("b", "boom")]
    )
    assert (picky_out.error, boom_out.error) == ("provider", "crashed")
    assert "model said no" in picky_out.output
    assert "RuntimeError: boom" in boom_out.output


async def test_agent_returning_the_wrong_type_is_a_crash() -> None:
    """An agent must return AgentResult or str; anything else fails the step clearly."""

    async def wrong(spec: AgentStepSpec, ctx: AgentContext) -> object:
        return 42

    outcome = await LocalExecutor(agents={"wrong": wrong}).execute_step(spec("w", "wrong"))
    assert outcome.error == "crashed" and "return an AgentResult or a str" in outcome.output


SCHEMA = {
    "type": "object",
    "properties": {"language": {"type": "string"}, "compiled": {"type": "boolean"}},
    "required": ["language", "compiled"],
}


async def test_output_schema_fills_structured_when_valid() -> None:
    """A JSON output that matches output_schema lands, validated, in structured."""
    document = {"language": "rust", "compiled": True}
    outcome = await LocalExecutor().execute_step(
        spec("s", prompt=json.dumps(document), output_schema=SCHEMA)
    )
    assert outcome.success and outcome.structured == document


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ('{"language": "rust"}', "'compiled' is a required property"),
        ('{"language": 3, "compiled": true}', "at language"),
        ("not json at all", "not JSON"),
    ],
)
async def test_output_schema_violations_fail_with_schema(prompt: str, problem: str) -> None:
    """Output that does not match output_schema fails the step with error 'schema'."""
    outcome = await LocalExecutor().execute_step(spec("s", prompt=prompt, output_schema=SCHEMA))
    assert (outcome.success, outcome.error, outcome.structured) == (False, "schema", None)
    assert problem in outcome.output


async def test_agent_structured_value_is_validated_too() -> None:
    """A structured value the agent returns itself is validated against the schema."""

    async def liar(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        return AgentResult(output="{}", structured={"language": "go"})

    outcome = await LocalExecutor(agents={"liar": liar}).execute_step(
        spec("l", "liar", output_schema=SCHEMA)
    )
    assert outcome.error == "schema"


async def test_step_events_are_emitted_in_order() -> None:
    """step_started then step_finished, with the tokens and outcome of the step."""
    seen: list[object] = []
    executor = LocalExecutor(agents={"boom": "tests.agents:boom"})
    await execute_steps_parallel(
        executor, [spec("a", prompt="abcd" * 5), spec("b", "boom")], events=seen.append
    )
    by_task = {(type(e).__name__, e.task_id): e for e in seen}  # type: ignore[attr-defined]
    assert seen.index(by_task[("StepStarted", "a")]) < seen.index(by_task[("StepFinished", "a")])
    finished = by_task[("StepFinished", "a")]
    assert isinstance(finished, StepFinished) and finished.success and finished.total_tokens == 10
    assert by_task[("StepFinished", "b")].error == "crashed"  # type: ignore[attr-defined]
    assert isinstance(by_task[("StepStarted", "b")], StepStarted)


async def test_failing_event_sink_does_not_fail_the_step() -> None:
    """A sink that raises is logged; the step still succeeds."""

    def broken(event: object) -> None:
        raise RuntimeError("sink down")

    outcome = await LocalExecutor().execute_step(spec("a"), broken)
    assert outcome.success


async def test_cancelling_the_caller_cancels_the_agent() -> None:
    """Cancelling execute_step cancels the running agent coroutine."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(spec: AgentStepSpec, ctx: AgentContext) -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    task = asyncio.create_task(LocalExecutor(agents={"w": waits}).execute_step(spec("w", "w")))
    await asyncio.wait_for(started.wait(), 10)  # the agent runs: cancel it, not its start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


def test_executor_survives_several_event_loops() -> None:
    """One executor can serve successive asyncio.run() calls."""
    executor = LocalExecutor(max_concurrency=2)
    for _ in range(2):
        outcomes = asyncio.run(execute_steps_parallel(executor, [spec(str(i)) for i in range(4)]))
        assert all(o.success for o in outcomes)


async def test_agent_objects_keep_their_own_reservation_rule() -> None:
    """An agent object with a definition() method is registered with its reservation rule."""
    from fleet.agents import AgentDefinition

    class Sized:
        async def __call__(self, spec: AgentStepSpec, ctx: AgentContext) -> str:
            return f"held {ctx.held_tokens}"

        def definition(self, name: str) -> AgentDefinition:
            return AgentDefinition(name=name, run=self, reserve_tokens=lambda spec: 77)

    executor = LocalExecutor(agents={"sized": Sized()})
    assert executor.registry.resolve("sized").reservation_for(spec("a", "sized"), 1000) == 77
