"""One host process of the load suite: ``python -m tests.load.host_process SETTINGS_JSON N``.

Runs ``N`` concurrent ``execute_step`` calls and an ``N``-step round on one
``CeleryExecutor`` and prints one JSON line: its pid and how many steps succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from fleet import AgentStepSpec, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings


def specs(prefix: str, n: int) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"{prefix}{i}", agent="echo", description="load", prompt=f"p{i}")
        for i in range(n)
    ]


async def main(settings: FleetSettings, n: int) -> dict[str, int]:
    async with CeleryExecutor(settings=settings) as executor:
        single = await asyncio.gather(*(executor.execute_step(s) for s in specs("s", n)))
        round_ = await execute_steps_parallel(executor, specs("r", n))
    return {
        "pid": os.getpid(),
        "steps": len(single) + len(round_),
        "succeeded": sum(o.success for o in [*single, *round_]),
        "echoed": sum(o.output == f"p{i}" for i, o in enumerate(single))
        + sum(o.output == f"p{i}" for i, o in enumerate(round_)),
    }


if __name__ == "__main__":
    settings = FleetSettings(**json.loads(sys.argv[1]))
    print(json.dumps(asyncio.run(main(settings, int(sys.argv[2])))), flush=True)
