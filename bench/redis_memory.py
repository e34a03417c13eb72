"""What Redis holds while steps run and after they finished: fleet against raw Celery.

A ``redis-server`` and 2 Celery workers × 8 threads (the tests' ``noop`` agent) per side,
started for it and stopped by PID. Three sides:

1. **raw Celery**: N ``bench.noop`` tasks with Celery's Redis result backend, sent as groups
   of ``--in-flight`` and waited for (``result.get()``; results are not forgotten, as most
   programs do not), ``result_expires`` at Celery's default (1 day);
2. **fleet, bare round**: ``execute_steps_parallel`` of N no-op steps on ``CeleryExecutor``
   (``max_in_flight`` = ``--in-flight``, no workflow);
3. **fleet, workflows**: ``--workflows`` runs shaped like ``fleet run --executor celery``
   (Redis journal, a budget on the Redis ledger, the Redis event stream and cancel board,
   retention at its 7-day default), N steps in all, one phase each.

Each side runs on a fresh ``redis-server`` and workers of its own. For each:
``used_memory`` (``INFO memory``) over its value before the side, at its peak while the steps
run (sampled every 20 ms), right after, and once the read results' grace has passed
(``kept``: what stays for the results' or the workflows' retention); keys by namespace.

    python -m bench.redis_memory [--steps 20000] [--in-flight 2000] [--workflows 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from celery import group

from bench._common import table, write
from bench.celery_app import BENCH_APP, BENCH_NOOP_TASK
from fleet import AgentStepSpec, execute_steps_parallel
from fleet.celery import configure_app
from fleet.celery.protocol import RESULT_GRACE_S
from fleet.config import FleetSettings
from fleet.redis_server import RedisServer
from fleet.runner import open_run, plan_run
from tests.celery_support import CeleryWorkers, fleet_settings

CELERY_DEFAULT_RESULT_EXPIRES_S = 86_400


class Sampler:
    """Samples ``used_memory`` in a thread; :attr:`peak` is the highest seen."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, used(self.client))
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self.peak = used(self.client)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def namespaces(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Keys by namespace: ``P:NAME:...`` as ``NAME``, Celery's ``celery-task-meta-*``, others."""
    found: Counter[str] = Counter()
    for raw in client.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        if key.startswith(f"{prefix}:"):
            found[key.split(":")[1]] += 1
        elif key.startswith("celery-task-meta-"):
            found["celery-task-meta"] += 1
        else:
            found["other"] += 1
    return dict(sorted(found.items()))


def noop_specs(n: int, name: str) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"{name}{i}", agent="noop", description="bench", prompt="")
        for i in range(n)
    ]


def clean(url: str, prefix: str) -> None:
    """Delete what the warm-up left (fleet's keys, Celery's results): this bench's own server."""
    client = redis.Redis.from_url(url)
    for pattern in (f"{prefix}:*", "celery-task-meta-*"):
        batch = [key for key in client.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(batch), 1000):
            client.delete(*batch[start : start + 1000])
    client.close()


async def measure(
    side: str,
    url: str,
    prefix: str,
    args: argparse.Namespace,
    run: Callable[[], Awaitable[None]],
    *,
    settle_s: float,
) -> dict[str, Any]:
    """One side on a clean server: memory before, peak, right after, and ``settle_s`` later."""
    clean(url, prefix)
    client = redis.Redis.from_url(url)
    before = used(client)
    started = time.perf_counter()
    with Sampler(url) as sampler:
        await run()
    elapsed = time.perf_counter() - started
    after = used(client)
    keys_after = namespaces(client, prefix)
    await asyncio.sleep(settle_s)
    steady = used(client)
    keys_steady = namespaces(client, prefix)
    client.close()
    return {
        "side": side,
        "steps": args.steps,
        "seconds": round(elapsed, 1),
        "peak_MB": (sampler.peak - before) / 1e6,
        "peak_B_per_in_flight": round((sampler.peak - before) / args.in_flight),
        "after_MB": (after - before) / 1e6,
        "kept_MB": (steady - before) / 1e6,
        "kept_B_per_step": round((steady - before) / args.steps),
        "keys_after": keys_after,
        "keys_kept": keys_steady,
    }


def raw_celery(settings: FleetSettings, steps: int, window: int) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        def send_all() -> None:
            app = configure_app(settings)
            app.conf.result_expires = CELERY_DEFAULT_RESULT_EXPIRES_S
            try:
                for start in range(0, steps, window):
                    count = min(window, steps - start)
                    signatures = (
                        app.signature(BENCH_NOOP_TASK, args=(i,), queue=settings.queue)
                        for i in range(start, start + count)
                    )
                    group(signatures).apply_async().get(timeout=600)
            finally:
                app.close()

        await asyncio.to_thread(send_all)

    return run


def fleet_round(settings: FleetSettings, steps: int) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        from fleet.celery import CeleryExecutor

        executor = CeleryExecutor(settings=settings)
        try:
            outcomes = await execute_steps_parallel(executor, noop_specs(steps, "b"))
        finally:
            await executor.aclose()
        assert all(o.success for o in outcomes)

    return run


def fleet_workflows(
    settings: FleetSettings, steps: int, workflows: int, directory: Path
) -> Callable[[], Awaitable[None]]:
    values = settings.model_dump()
    values.update(store=settings.redis_url, run_index=directory / "runs.db")
    config = FleetSettings(**values)

    async def run() -> None:
        per = steps // workflows
        for n in range(workflows):
            places = plan_run(config, executor="celery")
            async with open_run(
                config, places, root_id=f"bench-{n}", executor="celery", budget_tokens=10**9
            ) as builder:
                async with builder.build() as workflow:
                    outcomes = await workflow.phase("all", noop_specs(per, "w"))
            assert all(o.success for o in outcomes)

    return run


SIDES = ("raw", "bare", "workflows")


async def side(
    name: str, workers: CeleryWorkers, args: argparse.Namespace, directory: Path
) -> dict[str, Any]:
    """One side, measured on its own fresh server after a warm-up round."""
    settings = workers.settings
    url, prefix = settings.redis_url, settings.key_prefix
    await fleet_round(settings, 200)()  # warm up: connections, scripts, worker threads
    grace = RESULT_GRACE_S + 2
    if name == "raw":
        raw = raw_celery(settings, args.steps, args.in_flight)
        return await measure("raw Celery (result backend)", url, prefix, args, raw, settle_s=grace)
    if name == "bare":
        bare = fleet_round(settings, args.steps)
        return await measure("fleet, bare round", url, prefix, args, bare, settle_s=grace)
    flows = fleet_workflows(settings, args.steps, args.workflows, directory)
    label = f"fleet, {args.workflows} workflows"
    row = await measure(label, url, prefix, args, flows, settle_s=grace)
    row["kept_KB_per_ended_workflow"] = round(row["kept_MB"] * 1e3 / args.workflows, 1)
    return row


def run_side(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start a redis-server and workers of the side's own, run it, stop them by PID."""
    directory = root / name
    directory.mkdir()
    server = RedisServer(directory).start()
    try:
        settings = fleet_settings(
            server.url,
            max_in_flight=args.in_flight,
            queue_high_water=args.in_flight * 2,
            claim_timeout_s=120.0,
            step_lease_s=10.0,
        )
        fleet = CeleryWorkers(settings, directory, args.concurrency, app=BENCH_APP)
        try:
            fleet.start(*(f"mem{i}" for i in range(1, args.workers + 1)))
            return asyncio.run(side(name, fleet, args, directory))
        finally:
            fleet.stop()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=2_000)
    parser.add_argument("--workflows", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_side(name, args, Path(tmp)) for name in SIDES]
    shown = [{k: v for k, v in row.items() if not k.startswith("keys")} for row in rows]
    print(table(shown))
    for row in rows:
        print(f"{row['side']}: keys right after {row['keys_after']}, kept {row['keys_kept']}")
    path = write(
        "redis_memory",
        " ".join(["python -m bench.redis_memory", *sys.argv[1:]]),
        rows,
        workers=args.workers,
        threads_per_worker=args.concurrency,
        in_flight=args.in_flight,
        note="measured on a shared 2-core machine; used_memory from INFO memory",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
