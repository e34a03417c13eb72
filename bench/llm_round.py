"""One timed round of LLM steps through ``CeleryExecutor``: the host side of bench/llm_worker.py.

Run as a script with the tree under test first on ``PYTHONPATH`` (so the host code
matches the workers' code, old or new), configured by ``FLEET_*`` variables::

    python bench/llm_round.py NODES STEPS MAX_IN_FLIGHT

It waits until NODES workers answer a ping, prints ``ready``, waits for a line on
stdin, sends STEPS steps of agent ``llm`` with ``execute_steps_parallel`` and prints one
JSON line: ``{"wall_s": ..., "ok": ..., "errors": {...}}``. It imports only fleet's
public API, which the compared trees share.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

from fleet import AgentStepSpec, execute_steps_parallel
from fleet.celery import CeleryExecutor, configure_app
from fleet.config import load_settings


def wait_for_workers(nodes: int, timeout_s: float = 120.0) -> None:
    app = configure_app(load_settings())
    try:
        deadline = time.monotonic() + timeout_s
        while len(app.control.ping(timeout=1.0)) < nodes:
            if time.monotonic() > deadline:
                raise SystemExit(f"{nodes} workers did not answer a ping in {timeout_s} s")
    finally:
        app.close()


async def round_of(steps: int, max_in_flight: int) -> dict[str, object]:
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="llm", description="bench", prompt=f"question {i}")
        for i in range(steps)
    ]
    executor = CeleryExecutor(settings=load_settings(), max_in_flight=max_in_flight)
    try:
        started = time.perf_counter()
        outcomes = await execute_steps_parallel(executor, specs)
        wall = time.perf_counter() - started
    finally:
        await executor.aclose()
    errors = collections.Counter(o.error for o in outcomes if not o.success)
    return {"wall_s": wall, "ok": sum(o.success for o in outcomes), "errors": dict(errors)}


def main() -> None:
    nodes, steps, max_in_flight = (int(a) for a in sys.argv[1:4])
    wait_for_workers(nodes)
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(round_of(steps, max_in_flight))), flush=True)


if __name__ == "__main__":
    main()
