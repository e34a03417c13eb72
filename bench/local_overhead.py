"""Per-step overhead of fleet's local host versus a bare semaphore-bounded asyncio.gather.

10,000 steps of a no-op python agent through ``execute_steps_parallel`` on
``LocalExecutor`` (hint 64), and the same agent coroutine called through a bare
``asyncio.gather`` bounded by a semaphore of 64, in one run, several repetitions;
medians reported. Target: overhead ≤ 30 µs per step.

    python -m bench.local_overhead [--steps 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

from bench._common import median, table, write
from fleet import AgentContext, AgentStepSpec, LocalExecutor, execute_steps_parallel

HINT = 64


async def noop(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """The no-op agent both sides run."""
    return ""


async def bare(specs: list[AgentStepSpec]) -> float:
    """The floor: the agent coroutine through a semaphore-bounded gather."""
    semaphore = asyncio.Semaphore(HINT)

    async def one(spec: AgentStepSpec) -> str:
        async with semaphore:
            return await noop(spec, AgentContext(spec=spec))

    started = time.perf_counter()
    await asyncio.gather(*(one(spec) for spec in specs))
    return time.perf_counter() - started


async def fleet_local(specs: list[AgentStepSpec]) -> float:
    """fleet: execute_steps_parallel on a LocalExecutor with hint 64."""
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    started = time.perf_counter()
    outcomes = await execute_steps_parallel(executor, specs)
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes)
    return elapsed


def main() -> None:
    """Run both sides ``--repeat`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="noop", description="", prompt="")
        for i in range(args.steps)
    ]
    times: dict[str, list[float]] = {"bare asyncio.gather": [], "fleet LocalExecutor": []}
    for _ in range(args.repeat):
        for name, side in (("bare asyncio.gather", bare), ("fleet LocalExecutor", fleet_local)):
            gc.collect()
            times[name].append(asyncio.run(side(specs)))
    floor = median(times["bare asyncio.gather"])
    ours = median(times["fleet LocalExecutor"])
    rows = [
        {
            "side": name,
            "steps": args.steps,
            "median_s": median(values),
            "per_step_us": median(values) / args.steps * 1e6,
        }
        for name, values in times.items()
    ]
    overhead_us = (ours - floor) / args.steps * 1e6
    print(table(rows))
    print(f"\nfleet overhead per step: {overhead_us:.1f} µs (target ≤ 30 µs); "
          f"ratio fleet/bare = {ours / floor:.2f}")  # fmt: skip
    command = f"python -m bench.local_overhead --steps {args.steps} --repeat {args.repeat}"
    path = write(
        "local_overhead",
        command,
        rows,
        overhead_us_per_step=overhead_us,
        ratio=ours / floor,
        target_us=30,
        repeats=args.repeat,
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
