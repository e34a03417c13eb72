"""One timed round of LLM steps through ``CeleryExecutor``: the host side of bench/llm_worker.py.

Run as a script with the tree under test first on ``PYTHONPATH`` (so the host code
matches the workers' code, old or new), configured by ``FLEET_*`` variables::

    python bench/llm_round.py NODES STEPS MAX_IN_FLIGHT [SLEEP_S]

It waits until NODES workers answer a ping, prints ``ready``, waits for a line on
stdin, sends STEPS steps of agent ``llm`` with ``execute_steps_parallel`` and prints one
JSON line: ``{"wall_s": ..., "ok": ..., "errors": {...}}``. It imports only fleet's
public API, which the compared trees share. With SLEEP_S it sends no fleet step: one raw
Celery group of STEPS ``bench.sleep`` tasks of SLEEP_S each (Celery alone, on workers of
the benchmarks' app ``bench/celery_app.py``), and waits for their results.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

from celery import group

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


def raw_group_of(steps: int, sleep_s: float) -> dict[str, object]:
    settings = load_settings()
    app = configure_app(settings)
    try:
        started = time.perf_counter()
        tasks = [
            app.signature("bench.sleep", args=(sleep_s,), queue=settings.queue)
            for _ in range(steps)
        ]
        group(tasks).apply_async().get(timeout=600)
        wall = time.perf_counter() - started
    finally:
        app.close()
    return {"wall_s": wall, "ok": steps, "errors": {}}


def main() -> None:
    nodes, steps, max_in_flight = (int(a) for a in sys.argv[1:4])
    sleep_s = float(sys.argv[4]) if len(sys.argv) > 4 else None
    wait_for_workers(nodes)
    print("ready", flush=True)
    sys.stdin.readline()
    if sleep_s is None:
        result = asyncio.run(round_of(steps, max_in_flight))
    else:
        result = raw_group_of(steps, sleep_s)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
