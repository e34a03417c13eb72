"""A host process for the host-kill scenario: one resumable round on the Celery fleet.

``python -m tests.faults.resumable_host WORKFLOW_ID STEPS OUT_JSON`` reads its settings
from ``FLEET_*`` (the trial's Redis, key prefix and queue), runs
``execute_steps_parallel_resumable`` on a ``CeleryExecutor`` journaled in a
``RedisCheckpointStore`` and writes the outcomes to ``OUT_JSON``. The test SIGKILLs the
first such process half-way and resumes the workflow from a second one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from fleet.celery import CeleryExecutor
from fleet.config import load_settings
from fleet.resumable import execute_steps_parallel_resumable
from fleet.spec import StepOutcome
from fleet.stores import RedisCheckpointStore
from tests.faults.support import specs


async def main(workflow_id: str, steps: int) -> list[StepOutcome]:
    settings = load_settings()
    store = RedisCheckpointStore(settings.redis_url, key_prefix=settings.key_prefix)
    try:
        async with CeleryExecutor(settings=settings) as executor:
            outcomes = await execute_steps_parallel_resumable(
                executor, specs(steps, "h"), workflow_id, store
            )
    finally:
        await store.close()
    return outcomes


if __name__ == "__main__":
    done = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    Path(sys.argv[3]).write_text(json.dumps([o.to_dict() for o in done]), encoding="utf-8")
