"""The Celery host against raw Celery, side by side on the same workers, in one run.

1. 2,000 no-op steps in one round: fleet (``execute_steps_parallel`` on
   ``CeleryExecutor``) vs a raw Celery ``group`` of an equivalent no-op task. Target ≤ 1.0.
2. 300 items x 3 stages: fleet (``execute_pipeline``, registered stages → Celery chains)
   vs raw ``group(chain(...))``. Target ≤ 1.10.
3. Single-step round trip: ``execute_step`` vs raw ``apply_async().get()``. Target ≤ 1.2.
4. Scaling: 400 steps of a 100 ms sleep agent on 1, 2 and 4 worker processes (threads
   pool): throughput and efficiency vs linear. Target ≥ 0.8 at 4 workers.

    python -m bench.celery_host [--workers 2] [--concurrency 4] [--repeat 3] [--quick]
    python -m bench.celery_host --tracing [--workers 2] [--repeat 3]

``--tracing`` instead times a round of 2,000 no-op steps with tracing off and on (host and
workers exporting over OTLP/HTTP to a loopback receiver process), alternating, each on
freshly started workers; writes bench/results/celery_tracing.json.

It starts its own redis-server and worker processes (stopped by PID) and uses the test
agents and stages (tests/agents.toml). Writes bench/results/celery_host.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from celery import chain, group

from bench._common import table, write
from bench.celery_app import BENCH_APP, BENCH_NOOP_TASK
from fleet import AgentStepSpec, execute_pipeline, execute_steps_parallel, telemetry
from fleet.celery import configure_app
from fleet.redis_server import RedisServer
from tests import pipeline_stages
from tests.celery_support import CeleryWorkers, fleet_settings


def noop_specs(n: int, agent: str = "noop", prompt: str = "") -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"s{i}", agent=agent, description="bench", prompt=prompt)
        for i in range(n)
    ]


async def timed(run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


class Sides:
    """Fleet and raw Celery against the same queue and workers."""

    def __init__(self, workers: CeleryWorkers) -> None:
        self.executor = workers.executor()
        self.app = configure_app(workers.settings)
        self.queue = workers.settings.queue
        # Celery's Redis result consumer belongs to the thread that first used it: every
        # raw send + get runs on this one thread, off the event loop.
        self.raw_thread = ThreadPoolExecutor(1, thread_name_prefix="raw-celery")

    async def off_loop(self, call: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.raw_thread, call)

    def noop(self, *args: Any) -> Any:
        return self.app.signature(BENCH_NOOP_TASK, args=args, queue=self.queue)

    async def raw_group(self, n: int) -> None:
        def run() -> None:
            result = group(self.noop(i) for i in range(n)).apply_async()
            result.get(timeout=600)
            result.forget()

        await self.off_loop(run)

    async def raw_pipeline(self, items: int, stages: int) -> None:
        def run() -> None:
            chains = [
                chain(self.noop(i), *(self.noop() for _ in range(stages - 1))) for i in range(items)
            ]
            group(chains).apply_async().get(timeout=600)

        await self.off_loop(run)

    async def raw_single(self) -> None:
        def run() -> None:
            result = self.noop(1).apply_async()
            result.get(timeout=60)
            result.forget()

        await self.off_loop(run)

    async def fleet_round(self, n: int) -> None:
        outcomes = await execute_steps_parallel(self.executor, noop_specs(n))
        assert all(o.success for o in outcomes)

    async def fleet_pipeline(self, items: int, stages: int) -> None:
        stage = pipeline_stages.bench_noop
        outcomes = await execute_pipeline(
            self.executor, [f"i{i}" for i in range(items)], [stage] * stages
        )
        assert all(o is not None and o.success for o in outcomes)

    async def fleet_single(self) -> None:
        outcome = await self.executor.execute_step(noop_specs(1)[0])
        assert outcome.success

    async def close(self) -> None:
        await self.executor.aclose()
        await self.off_loop(self.app.close)
        self.raw_thread.shutdown()


async def compare(
    name: str,
    fleet: Callable[[], Awaitable[None]],
    raw: Callable[[], Awaitable[None]],
    repeat: int,
    target: float,
    per: int = 1,
) -> dict[str, Any]:
    """Alternate fleet and raw runs; compare medians."""
    fleet_times, raw_times = [], []
    await fleet()  # warm both paths (connections, imports on the workers)
    await raw()
    for _ in range(repeat):
        raw_times.append(await timed(raw))
        fleet_times.append(await timed(fleet))
    f, r = statistics.median(fleet_times), statistics.median(raw_times)
    return {
        "case": name,
        "fleet_s": f / per,
        "raw_celery_s": r / per,
        "ratio": f / r,
        "target": target,
        "ok": f / r <= target,
    }


async def comparisons(workers: CeleryWorkers, repeat: int, quick: bool) -> list[dict[str, Any]]:
    sides = Sides(workers)
    try:
        steps, items = (400, 60) if quick else (2000, 300)
        rows = [
            await compare(
                f"{steps} no-op steps, one round",
                lambda: sides.fleet_round(steps),
                lambda: sides.raw_group(steps),
                repeat,
                1.0,
            ),
            await compare(
                f"{items} items x 3 stages pipeline",
                lambda: sides.fleet_pipeline(items, 3),
                lambda: sides.raw_pipeline(items, 3),
                repeat,
                1.10,
            ),
        ]
        single = 30 if quick else 100

        async def many(one: Callable[[], Awaitable[None]]) -> None:
            for _ in range(single):
                await one()

        rows.append(
            await compare(
                "single-step round trip",
                lambda: many(sides.fleet_single),
                lambda: many(sides.raw_single),
                repeat,
                1.2,
                per=single,
            )
        )
        return rows
    finally:
        await sides.close()


async def throughput(workers: CeleryWorkers, steps: int) -> float:
    executor = workers.executor()
    try:
        specs = noop_specs(steps, agent="sleep_prompt", prompt="0.1")
        await execute_steps_parallel(executor, specs[:8])  # warm up
        elapsed = await timed(lambda: execute_steps_parallel(executor, specs))
    finally:
        await executor.aclose()
    return steps / elapsed


def scaling(url: str, directory: Path, concurrency: int, steps: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = 0.0
    for count in (1, 2, 4):
        settings = fleet_settings(url, max_in_flight=64, claim_timeout_s=30.0, step_lease_s=10.0)
        fleet = CeleryWorkers(settings, directory, concurrency)
        try:
            fleet.start(*(f"scale{count}-{i}" for i in range(1, count + 1)))
            per_s = asyncio.run(throughput(fleet, steps))
        finally:
            fleet.stop()
        base = base or per_s
        rows.append(
            {
                "workers": count,
                "threads_each": concurrency,
                "throughput_steps_per_s": per_s,
                "ideal_steps_per_s": count * concurrency / 0.1,
                "efficiency_vs_linear": per_s / (count * base),
            }
        )
    return rows


async def traced_round(workers: CeleryWorkers, steps: int) -> float:
    """One warm-up round, then the timed round of ``steps`` (spans flushed inside the time)."""
    executor = workers.executor()
    try:
        await execute_steps_parallel(executor, noop_specs(50))
        started = time.perf_counter()
        outcomes = await execute_steps_parallel(executor, noop_specs(steps))
        assert telemetry.flush(60_000)
        elapsed = time.perf_counter() - started
    finally:
        await executor.aclose()
    assert all(o.success for o in outcomes)
    return elapsed


def tracing(url: str, directory: Path, args: argparse.Namespace) -> int:
    """Round of 2,000 steps, tracing off vs on, alternating on fresh workers."""
    from bench.otlp_receiver import ReceiverProcess

    steps = 400 if args.quick else 2000
    receiver = ReceiverProcess()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_MAX_QUEUE_SIZE": str(steps * 2),
    }
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(args.repeat):
            for mode in ("off", "on"):
                env = otel if mode == "on" else {}
                for name in otel:
                    os.environ.pop(name, None)
                os.environ.update(env)
                telemetry.reset()
                settings = fleet_settings(url, max_in_flight=64, claim_timeout_s=30.0)
                fleet = CeleryWorkers(settings, directory, args.concurrency, env)
                try:
                    fleet.start(*(f"{mode}{i}" for i in range(1, args.workers + 1)))
                    times[mode].append(asyncio.run(traced_round(fleet, steps)))
                finally:
                    fleet.stop()
        received = receiver.count()
    finally:
        for name in otel:
            os.environ.pop(name, None)
        telemetry.reset()
        receiver.stop()
    rows = [
        {
            "tracing": mode,
            "steps": steps,
            "median_s": statistics.median(values),
            "per_step_us": statistics.median(values) / steps * 1e6,
            "runs_s": [round(v, 3) for v in values],
        }
        for mode, values in times.items()
    ]
    added = rows[1]["per_step_us"] - rows[0]["per_step_us"]
    print(table(rows))
    print(f"tracing on adds {added:.1f} µs per step to a round; {received} spans received")
    path = write(
        "celery_tracing",
        " ".join(["python -m bench.celery_host", *sys.argv[1:]]),
        rows,
        tracing_us_per_step=added,
        spans_received=received,
        workers=args.workers,
        threads_per_worker=args.concurrency,
        repeats=args.repeat,
    )
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="workers for the comparisons")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--tracing", action="store_true", help="only: tracing off vs on")
    args = parser.parse_args()
    if args.tracing:
        with tempfile.TemporaryDirectory() as tmp:
            server = RedisServer(Path(tmp)).start()
            try:
                return tracing(server.url, Path(tmp), args)
            finally:
                server.stop()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        server = RedisServer(directory).start()
        try:
            settings = fleet_settings(server.url, max_in_flight=64, claim_timeout_s=30.0)
            fleet = CeleryWorkers(settings, directory, args.concurrency, app=BENCH_APP)
            try:
                fleet.start(*(f"bench{i}" for i in range(1, args.workers + 1)))
                rows = asyncio.run(comparisons(fleet, args.repeat, args.quick))
            finally:
                fleet.stop()
            print(table(rows), flush=True)
            scale = scaling(server.url, directory, args.concurrency, 120 if args.quick else 400)
            print(table(scale))
        finally:
            server.stop()
    path = write(
        "celery_host",
        " ".join(["python -m bench.celery_host", *sys.argv[1:]]),
        rows,
        scaling=scale,
        workers=args.workers,
        threads_per_worker=args.concurrency,
    )
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) and scale[-1]["efficiency_vs_linear"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
