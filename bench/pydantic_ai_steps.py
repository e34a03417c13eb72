"""What fleet adds to a pydantic-ai agent's run: per-step cost of the kind "pydantic_ai".

The same ``pydantic_ai.Agent`` (an in-process ``FunctionModel`` that answers at once, so
only CPU is measured) runs N prompts three ways, 64 at a time: ``agent.run`` through a
bare semaphore-bounded ``asyncio.gather``; as fleet steps on a ``LocalExecutor`` (the
model wrapped, every request held, traced and counted); and the same under a
``WorkflowBudget`` (a step reservation, a per-request token check and cap, the settle).
Medians of several repetitions; the difference per step is fleet's cost.

    python -m bench.pydantic_ai_steps [--steps 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from bench._common import median, table, write
from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget, execute_steps_parallel
from fleet.agents.pydantic_ai import PydanticAIAgent

HINT = 64


def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The model: a fixed answer with a fixed usage."""
    usage = RequestUsage(input_tokens=20, output_tokens=5)
    return ModelResponse(parts=[TextPart("ok")], usage=usage, model_name="bench-fn")


def make_agent() -> Agent[None, str]:
    """The agent every side runs."""
    return Agent(FunctionModel(answer, model_name="bench-fn"))


async def bare(agent: Agent[None, str], specs: list[AgentStepSpec]) -> float:
    """The floor: ``agent.run`` through a semaphore-bounded gather."""
    semaphore = asyncio.Semaphore(HINT)

    async def one(spec: AgentStepSpec) -> str:
        async with semaphore:
            return (await agent.run(spec.prompt)).output

    started = time.perf_counter()
    outputs = await asyncio.gather(*(one(spec) for spec in specs))
    elapsed = time.perf_counter() - started
    assert outputs == ["ok"] * len(specs)
    return elapsed


async def fleet_steps(
    agent: Agent[None, str], specs: list[AgentStepSpec], *, budget: bool
) -> float:
    """fleet: the agent as steps of one fan-out, with or without a token budget."""
    ledger = WorkflowBudget(10**9) if budget else None
    executor = LocalExecutor(
        agents={"pa": PydanticAIAgent(agent, name="pa")}, budget=ledger, max_concurrency=HINT
    )
    started = time.perf_counter()
    outcomes = await execute_steps_parallel(executor, specs)
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes), outcomes[0].output
    if ledger is not None:
        snapshot = await ledger.snapshot()
        assert snapshot.consumed_tokens == 25 * len(specs) and snapshot.reserved_tokens == 0
    return elapsed


async def measure(steps: int, repeat: int) -> list[dict[str, Any]]:
    """Median seconds per side over ``repeat`` runs (sides interleaved)."""
    agent = make_agent()
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="pa", description="d", prompt=f"p{i}", max_tokens=100)
        for i in range(steps)
    ]
    sides: dict[str, Any] = {
        "agent.run, bare gather (64)": lambda: bare(agent, specs),
        "fleet LocalExecutor (64)": lambda: fleet_steps(agent, specs, budget=False),
        "fleet LocalExecutor + token budget": lambda: fleet_steps(agent, specs, budget=True),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    await bare(agent, specs[:HINT])  # warm up pydantic-ai's caches
    for _ in range(repeat):
        for name, side in sides.items():
            gc.collect()
            times[name].append(await side())
    floor = median(times["agent.run, bare gather (64)"]) / steps
    rows = []
    for name, values in times.items():
        per_step = median(values) / steps
        rows.append(
            {
                "side": name,
                "steps": steps,
                "median_s": median(values),
                "per_step_us": per_step * 1e6,
                "overhead_us": (per_step - floor) * 1e6,
            }
        )
    return rows


def main() -> None:
    """Run the benchmark, print the table, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.steps, args.repeat))
    print(table(rows))
    command = f"python -m bench.pydantic_ai_steps --steps {args.steps} --repeat {args.repeat}"
    print(write("pydantic_ai_steps", command, rows))


if __name__ == "__main__":
    main()
