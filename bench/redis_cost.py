"""What one step costs Redis end to end, and how many steps/s one Redis node can carry.

A real fleet on loopback (one ``redis-server``, 2 Celery workers × 8 threads, the
``parrot`` echo agent, a budget on the Redis ledger) runs a warm-up round, then a
measured round of N steps. Over the measured round it takes deltas of Redis's own
counters (``INFO commandstats``, ``INFO cpu``) and counts round trips with a TCP proxy
that every fleet client goes through (a round trip = a burst of requests on one
connection after the server last answered; a pipeline is one, a blocking pop is one).
Broker, results, leases, journal markers, ledger and events are all in these numbers.

Prints commands per step (by command), round trips per step, Redis CPU per step, and the
steps/s ceiling of one Redis node at that cost (1 / CPU seconds per step: Redis runs
commands on one core).

    python -m bench.redis_cost [--steps 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench._common import table, write
from fleet import AgentStepSpec, WorkflowBudget, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.ledgers import RedisLedger
from fleet.localfleet import celery_command, settings_env
from fleet.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


class RoundTripProxy:
    """A loopback TCP proxy that counts request bursts (round trips) per connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.round_trips = 0

    async def _pipe(self, reader: Any, writer: Any, state: dict[str, str], side: str) -> None:
        try:
            while data := await reader.read(65536):
                if side == "client" and state["last"] != "client":
                    self.round_trips += 1
                state["last"] = side
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: Any, client_writer: Any) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        state = {"last": "server"}
        await asyncio.gather(
            self._pipe(client_reader, up_writer, state, "client"),
            self._pipe(up_reader, client_writer, state, "server"),
        )

    def start(self) -> None:
        """Serve on a thread (and event loop) of its own.

        So the bench's loop never stalls the workers' traffic, also while it waits for
        them to exit.
        """
        ready = threading.Event()

        async def serve() -> None:
            await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
        ready.wait(10)


def _stats(client: redis.Redis) -> tuple[dict[str, int], float]:
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in client.info("commandstats").items()
    }
    cpu = client.info("cpu")
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _round(executor: CeleryExecutor, n: int, tag: str) -> float:
    specs = [
        AgentStepSpec(task_id=f"{tag}{i}", agent="parrot", description="d", prompt=f"p{i}",
                      max_tokens=10)
        for i in range(n)
    ]  # fmt: skip
    started = time.perf_counter()
    outcomes = await execute_steps_parallel(executor, specs)
    assert all(o.success for o in outcomes), [o.output for o in outcomes if not o.success][:3]
    return time.perf_counter() - started


async def measure(server: RedisServer, steps: int, directory: Path) -> dict[str, Any]:
    proxy = RoundTripProxy(server.port)
    proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    prefix = f"cost-{uuid.uuid4().hex[:8]}"
    settings = FleetSettings(
        redis_url=url, key_prefix=prefix, queue=f"{prefix}.steps",
        agents_file=ROOT / "config" / "agents.toml", max_in_flight=32,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings), PYTHONPATH=str(ROOT))
    workers = []
    for name in ("worker1", "worker2"):
        log = open(directory / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230 - start-up, closed below
        args = celery_command("worker", f"--hostname={name}@%h", "--pool=threads",
                              "--concurrency=8", "--loglevel=WARNING", "--without-mingle",
                              "--without-gossip")  # fmt: skip
        worker = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=log)  # noqa: ASYNC220
        workers.append((worker, log))
    direct = redis.Redis(port=server.port)
    ledger = RedisLedger(url, key_prefix=prefix)
    budget = WorkflowBudget(10**12, ledger=ledger, workflow_id="cost")
    executor = CeleryExecutor(settings=settings, budget=budget)
    try:
        await _round(executor, steps, "warm")  # workers up, scripts loaded, pools open
        before, cpu_before = _stats(direct)
        trips_before = proxy.round_trips
        elapsed = await _round(executor, steps, "m")
        after, cpu_after = _stats(direct)
        trips = proxy.round_trips - trips_before
    finally:
        await executor.aclose()
        await ledger.close()
        for process, log in workers:
            process.terminate()
            process.wait(timeout=30)
            log.close()
        direct.close()
    per_command = {
        name: (after.get(name, 0) - before.get(name, 0)) / steps
        for name in after
        if after.get(name, 0) - before.get(name, 0) > 0 and name != "info"
    }
    cpu_per_step = (cpu_after - cpu_before) / steps
    return {
        "steps": steps,
        "round_s": elapsed,
        "commands_per_step": sum(per_command.values()),
        "round_trips_per_step": trips / steps,
        "redis_cpu_us_per_step": cpu_per_step * 1e6,
        "ceiling_steps_per_s": 1 / cpu_per_step if cpu_per_step else float("inf"),
        "by_command": dict(sorted(per_command.items(), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> None:
    """Measure, print the tables, write ``bench/results/redis_cost.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        result = asyncio.run(measure(server, args.steps, Path(tmp)))
    by_command = result.pop("by_command")
    print(table([result]))
    print()
    print(table([{"command": k, "per_step": v} for k, v in by_command.items()]))
    command = "python -m bench.redis_cost " + " ".join(argv or sys.argv[1:])
    print(write("redis_cost", command.strip(), [result], by_command=by_command))


if __name__ == "__main__":
    main()
