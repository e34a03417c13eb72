"""Property-based checks of the fan-out and pipeline invariants (hypothesis)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import AgentStepSpec, StepOutcome, execute_pipeline, execute_steps_parallel
from tests.test_combinators import MockExecutor

BEHAVIOURS = st.sampled_from(["echo", "fail", "boom"])


@settings(max_examples=60, deadline=None)
@given(
    agents=st.lists(BEHAVIOURS, max_size=25),
    hint=st.integers(-2, 12),
    delays=st.lists(st.sampled_from([0.0, 0.001, 0.003]), min_size=1, max_size=5),
)
def test_parallel_invariants(agents: list[str], hint: int, delays: list[float]) -> None:
    """One outcome per spec in input order; success iff echo; peak ≤ max(hint, 1)."""
    specs = [
        AgentStepSpec(
            task_id=f"t{i}", agent=agent, description="", prompt=f"sleep={delays[i % len(delays)]}"
        )
        for i, agent in enumerate(agents)
    ]
    executor = MockExecutor(hint=hint)
    outcomes = asyncio.run(execute_steps_parallel(executor, specs))
    assert [o.task_id for o in outcomes] == [s.task_id for s in specs]
    assert [o.agent for o in outcomes] == agents
    assert [o.success for o in outcomes] == [a == "echo" for a in agents]
    assert all(o.error == "crashed" for o, a in zip(outcomes, agents, strict=True) if a == "boom")
    assert executor.peak <= max(hint, 1)
    assert sorted(executor.started) == sorted(s.task_id for s in specs)


@settings(max_examples=60, deadline=None)
@given(
    plans=st.lists(
        st.lists(st.sampled_from(["echo", "fail", "boom", "none"]), max_size=4), max_size=10
    ),
    hint=st.integers(0, 6),
)
def test_pipeline_invariants(plans: list[list[str]], hint: int) -> None:
    """Each item's result is exactly what the chain rule says, in input order."""
    depth = max((len(p) for p in plans), default=0)

    def stage(n: int):
        def build(prev: StepOutcome | None, item: int) -> AgentStepSpec | None:
            plan = plans[item]
            if n >= len(plan) or plan[n] == "none":
                return None
            return AgentStepSpec(task_id=f"{item}-{n}", agent=plan[n], description="", prompt="x")

        return build

    executor = MockExecutor(hint=hint, delay=0.001)
    results = asyncio.run(
        execute_pipeline(executor, list(range(len(plans))), [stage(n) for n in range(depth)])
    )
    assert len(results) == len(plans)
    for item, (plan, result) in enumerate(zip(plans, results, strict=True)):
        expected: str | None = None  # task id of the last step, or None
        crashed = False
        for n, behaviour in enumerate(plan):
            if behaviour == "none":
                break
            expected = f"{item}-{n}"
            if behaviour == "boom":
                crashed = True
                break
            if behaviour == "fail":
                break
        if crashed or expected is None:
            assert result is None
        else:
            assert result is not None and result.task_id == expected
            assert result.success == (plan[int(expected.split("-")[1])] == "echo")
    assert executor.peak <= max(hint, 1)
