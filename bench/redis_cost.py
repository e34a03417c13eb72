"""What one step costs Redis end to end, and how many steps/s one Redis node can carry.

A real fleet on loopback (one ``redis-server``, 2 Celery workers × 8 threads, the
``parrot`` echo agent) runs a warm-up round, then a measured round of N steps, each a
whole ``fleet run``-shaped workflow: a Redis journal, a budget on the Redis ledger, the
Redis event stream and the Redis cancel board. Every fleet client (host and workers)
goes through a TCP proxy that parses the RESP requests and charges each command, and
each round trip (a burst of requests on one connection after the server last answered:
a pipeline, a MULTI/EXEC block or a blocking pop is one), to a component by its first
key or its Lua script: broker, results, lease/claim, ledger, journal, events, cancel,
limiter, connection. Redis's own ``INFO commandstats`` and ``INFO cpu`` deltas give what
the server executed (commands run inside Lua scripts included) and its CPU per step.

Then Debian's ``redis-benchmark`` measures the node's ops/s, one request per round trip
and 16 per round trip, and the steps/s ceiling of one node follows three ways: by round
trips, by commands executed, and by Redis CPU per step (Redis runs commands on one core).

    python -m bench.redis_cost [--steps 500] [--requests 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import redis

from bench._common import median, table, write
from fleet import AgentStepSpec, Workflow, WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.ledgers import RedisLedger
from fleet.processes import celery_command, settings_env
from fleet.redis.scripts import names, script
from fleet.redis_server import RedisServer, free_port
from fleet.runner import build_executor
from fleet.runs import RedisRunRegistry
from fleet.stores.redis import RedisCheckpointStore

ROOT = Path(__file__).resolve().parent.parent


COMPONENTS = ("broker", "results", "lease/claim", "ledger", "journal", "events", "cancel",
              "limiter", "connection")  # fmt: skip
"""Where a command's first key (or script) puts it; ``connection`` is keyless traffic
(``HELLO``, ``PING``, ``CLIENT``, ``SCRIPT LOAD``…)."""

_NO_KEY = {b"MULTI", b"EXEC", b"DISCARD"}  # take the component of their transaction
_KEYLESS = {b"HELLO", b"PING", b"AUTH", b"SELECT", b"CLIENT", b"INFO", b"TIME", b"ECHO",
            b"QUIT", b"RESET", b"SCRIPT", b"CONFIG", b"COMMAND"}  # fmt: skip
_SCRIPTS = {b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL"}


def _script_components() -> dict[bytes, str]:
    """The SHA1 of each of the Celery host's Lua scripts, and the component it serves."""
    owners = {"claim_step": "lease/claim", "renew_lease": "lease/claim",
              "begin_link": "lease/claim", "finish": "results",
              "finish_settle": "results"}  # fmt: skip
    return {script(name).sha.encode(): part
            for name, part in owners.items()}  # fmt: skip


_IDS = re.compile(r"[0-9a-f]{8,}(-[0-9a-f]{4,})*|\\d+")


@cache
def _script_names() -> dict[bytes, str]:
    """The SHA1 of every fleet Lua script, and its file name."""
    return {script(name).sha.encode(): name for name in names() if not name.startswith("_")}


def key_shape(command: list[bytes]) -> str:
    """The command and its first key, ids and numbers as ``*`` (``get fleet:done:fs-*``).

    A fleet script is named after the command (``evalsha finish cost-*:result:fs-*:*``).
    """
    name = command[0].decode("utf-8", "replace").lower()
    args = command[1:]
    if name.upper().encode() in _SCRIPTS and len(args) >= 3:
        if args[0] in _script_names():
            name = f"{name} {_script_names()[args[0]]}"
        args = args[2:]
    key = (
        args[0].decode("utf-8", "replace") if args and name.upper().encode() not in _KEYLESS else ""
    )
    return f"{name} {_IDS.sub('*', key)}".strip()


def component(prefix: str, command: list[bytes], scripts: dict[bytes, str]) -> str | None:
    """The part of fleet that sent ``command`` (``None``: MULTI/EXEC, see ``_NO_KEY``).

    Fleet's own keys are ``{prefix}:<kind>:...``; every other key (the queue, kombu's
    ``unacked`` hashes and bindings, the ``celeryev`` pub/sub channels) is the broker's.
    """
    name = command[0].upper()
    if name in _NO_KEY:
        return None
    args = command[1:]
    if name in _SCRIPTS and len(args) >= 2:
        if args[0] in scripts:
            return scripts[args[0]]
        args = args[2:] if int(args[1]) > 0 else []
    elif name == b"BLMPOP" and len(args) >= 3:
        args = args[2:]
    elif name in _KEYLESS:
        args = []
    if not args:
        return "connection"
    key = args[0].decode("utf-8", "replace")
    kind = key.removeprefix(f"{prefix}:").split(":", 1)[0] if key.startswith(f"{prefix}:") else ""
    return {
        "budget": "ledger", "journal": "journal", "done": "journal", "events": "events",
        "lease": "lease/claim", "result": "results", "reply": "results",
        "cancel": "cancel", "workflow": "cancel", "limit": "limiter",
    }.get(kind, "broker")  # fmt: skip


class RespRequests:
    """Splits a client's byte stream into RESP commands (arrays of bulk strings)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[list[bytes]]:
        """The commands completed by ``data``."""
        self._buffer += data
        commands = []
        while (parsed := self._one()) is not None:
            commands.append(parsed)
        return commands

    def _one(self) -> list[bytes] | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            return None
        if not buffer.startswith(b"*"):  # an inline command (redis-cli style)
            self._buffer = buffer[end + 2 :]
            return buffer[:end].split()
        count, position, parts = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return None
            size = int(buffer[position + 1 : end])
            if len(buffer) < end + 2 + size + 2:
                return None
            parts.append(buffer[end + 2 : end + 2 + size])
            position = end + 2 + size + 2
        self._buffer = buffer[position:]
        return parts


class CountingProxy:
    """A loopback TCP proxy that counts commands and round trips by component.

    A round trip is a burst of requests on one connection after the server last
    answered (a pipeline or a MULTI/EXEC block is one, a blocking pop is one); it is
    charged to the component of the burst's first command.
    """

    def __init__(self, upstream_port: int, prefix: str) -> None:
        self.upstream_port = upstream_port
        self.prefix = prefix
        self.port = free_port()
        self.scripts = _script_components()
        self.commands: Counter[tuple[str, str]] = Counter()
        self.round_trips: Counter[str] = Counter()
        self.shapes: Counter[tuple[str, str]] = Counter()
        self.connections: Counter[str] = Counter()

    def snapshot(self) -> tuple[Counter[Any], ...]:
        """Copies of the counters (taken from another thread: counters only grow)."""
        return (Counter(self.commands), Counter(self.round_trips), Counter(self.connections),
                Counter(self.shapes))  # fmt: skip

    def _count(self, commands: list[list[bytes]], state: dict[str, Any]) -> None:
        for command in commands:
            part = component(self.prefix, command, self.scripts)
            if part is None:
                continue
            self.commands[(part, command[0].decode().lower())] += 1
            self.shapes[(part, key_shape(command))] += 1
            if part != "connection" and not state["owner"]:
                state["owner"] = part  # a connection belongs to its first keyed command
                self.connections[part] += 1
            if state["new_burst"]:
                self.round_trips[part] += 1
                state["new_burst"] = False

    async def _pipe(self, reader: Any, writer: Any, state: dict[str, Any], side: str) -> None:
        requests = RespRequests()
        try:
            while data := await reader.read(65536):
                if side == "client":
                    if state["last"] != "client":
                        state["new_burst"] = True
                    self._count(requests.feed(data), state)
                state["last"] = side
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: Any, client_writer: Any) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        state: dict[str, Any] = {"last": "server", "new_burst": False, "owner": ""}
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


def _stats(client: redis.Redis) -> tuple[dict[str, int], int, float]:
    """Commands Redis executed (calls by name, summed usec) and its CPU seconds so far.

    Redis 7 counts a command a script runs under the command's own name as well as the
    ``EVALSHA`` that ran it, so these calls include every command inside the Lua scripts.
    """
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    usec = sum(int(value["usec"]) for value in stats.values())
    cpu = client.info("cpu")
    return calls, usec, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _round(
    executor: CeleryExecutor, budget: WorkflowBudget, url: str, prefix: str, steps: int, root: str
) -> float:
    """One journaled, budgeted, logged, cancellable phase of ``steps`` echo steps."""
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="parrot", description="d", prompt=f"p{i}",
                      max_tokens=10)
        for i in range(steps)
    ]  # fmt: skip
    store = RedisCheckpointStore(url, key_prefix=prefix)
    board = RedisRunRegistry(url, key_prefix=prefix)
    workflow = (
        Workflow.builder(executor)
        .with_root_id(root)
        .with_store(store)
        .with_budget(budget)
        .with_event_stream(url, key_prefix=prefix)
        .with_cancel_board(board)
        .build()
    )
    started = time.perf_counter()
    try:
        async with workflow:
            outcomes = await workflow.phase("cost", specs)
    finally:
        await store.close()
        await board.close()
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes), [o.output for o in outcomes if not o.success][:3]
    return elapsed


def _start_workers(settings: FleetSettings, directory: Path) -> list[tuple[Any, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings), PYTHONPATH=str(ROOT))
    workers = []
    for name in ("worker1", "worker2"):
        log = open(directory / f"{name}.log", "ab")  # noqa: SIM115 - closed in _stop_workers
        args = celery_command("worker", f"--hostname={name}@%h", "--pool=threads",
                              "--concurrency=8", "--loglevel=WARNING", "--without-mingle",
                              "--without-gossip")  # fmt: skip
        workers.append((subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=log), log))
    return workers


def _stop_workers(workers: list[tuple[Any, Any]]) -> None:
    for process, _log in workers:
        process.terminate()
    for process, log in workers:
        process.wait(timeout=30)
        log.close()


async def measure(server: RedisServer, steps: int, directory: Path) -> dict[str, Any]:
    """Run a warm-up round, then count what a measured round of ``steps`` costs Redis."""
    prefix = f"cost-{uuid.uuid4().hex[:8]}"
    proxy = CountingProxy(server.port, prefix)
    proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    settings = FleetSettings(
        redis_url=url, key_prefix=prefix, queue=f"{prefix}.steps",
        agents_file=ROOT / "config" / "agents.toml", max_in_flight=32,
    )  # fmt: skip
    workers = _start_workers(settings, directory)
    direct = redis.Redis(port=server.port)  # not through the proxy: not counted
    ledger = RedisLedger(url, key_prefix=prefix)
    try:
        for root in ("warm", "measured"):
            budget = WorkflowBudget(10**12, ledger=ledger, workflow_id=root)
            # As `fleet run` builds it: the journal is the fleet's Redis, so workers journal.
            executor = build_executor("celery", {}, budget, 8, settings, store=url)
            assert isinstance(executor, CeleryExecutor)
            if root == "measured":
                before = _stats(direct), proxy.snapshot()
            try:
                elapsed = await _round(executor, budget, url, prefix, steps, root)
            finally:
                await executor.aclose()
        after = _stats(direct), proxy.snapshot()
    finally:
        await ledger.close()
        _stop_workers(workers)
        direct.close()
    return _per_step(before, after, steps, elapsed)


def _per_step(before: Any, after: Any, steps: int, elapsed: float) -> dict[str, Any]:
    (calls0, usec0, cpu0), (sent0, trips0, connections0, shapes0) = before
    (calls1, usec1, cpu1), (sent1, trips1, connections1, shapes1) = after
    executed = {
        name: (calls1[name] - calls0.get(name, 0)) / steps
        for name in calls1
        if name != "info" and calls1[name] > calls0.get(name, 0)  # our own INFO calls
    }
    sent = sent1 - sent0
    trips = trips1 - trips0
    by_component = [
        {
            "component": part,
            "commands_per_step": sum(n for (p, _), n in sent.items() if p == part) / steps,
            "round_trips_per_step": trips[part] / steps,
            "connections_opened": (connections1 - connections0)[part],
            "commands": ", ".join(
                f"{name} {n / steps:.2f}"
                for (p, name), n in sorted(sent.items(), key=lambda kv: -kv[1])
                if p == part
            ),
        }
        for part in COMPONENTS
    ]
    cpu_per_step = (cpu1 - cpu0) / steps
    return {
        "summary": {
            "steps": steps,
            "round_s": elapsed,
            "sent_commands_per_step": sum(sent.values()) / steps,
            "executed_commands_per_step": sum(executed.values()),
            "round_trips_per_step": sum(trips.values()) / steps,
            "connections_opened": (connections1 - connections0).total(),
            "redis_cpu_us_per_step": cpu_per_step * 1e6,
            "redis_command_us_per_step": (usec1 - usec0) / steps,
        },
        "by_component": by_component,
        "sent_by_key": [
            {"component": part, "command_and_key": shape, "per_step": n / steps}
            for (part, shape), n in sorted((shapes1 - shapes0).items(), key=lambda kv: -kv[1])
        ],
        "executed_by_command": dict(sorted(executed.items(), key=lambda kv: -kv[1])),
    }


def node_capacity(server: RedisServer, requests: int) -> list[dict[str, Any]]:
    """Ops/s of the Redis node, from Debian's ``redis-benchmark`` (50 clients).

    One request per round trip (``-P 1``: what a round trip costs the server) and 16 per
    round trip (``-P 16``: what a command costs when round trips are shared).
    """
    rows = []
    for pipeline in (1, 16):
        out = subprocess.run(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-c", "50",
             "-n", str(requests), "-P", str(pipeline), "-t", "set,get,lpush,hset,incr",
             "--csv"],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        for line in out.stdout.splitlines()[1:]:
            cells = [c.strip('"') for c in line.split(",")]
            rows.append({"pipeline": pipeline, "test": cells[0], "ops_per_s": float(cells[1])})
    return rows


def ceilings(summary: dict[str, Any], capacity: list[dict[str, Any]]) -> dict[str, float]:
    """Steps/s one Redis node carries at the measured cost, three ways."""
    single = median([r["ops_per_s"] for r in capacity if r["pipeline"] == 1])
    pipelined = median([r["ops_per_s"] for r in capacity if r["pipeline"] == 16])
    return {
        "node_round_trips_per_s": single,
        "node_commands_per_s_pipelined": pipelined,
        "steps_per_s_by_round_trips": single / summary["round_trips_per_step"],
        "steps_per_s_by_commands": pipelined / summary["executed_commands_per_step"],
        "steps_per_s_by_redis_cpu": 1e6 / summary["redis_cpu_us_per_step"],
    }


def main(argv: list[str] | None = None) -> None:
    """Measure, print the tables, write ``bench/results/redis_cost.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200_000, help="per redis-benchmark test")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        result = asyncio.run(measure(server, args.steps, Path(tmp)))
        capacity = node_capacity(server, args.requests)
    summary = result["summary"]
    limits = ceilings(summary, capacity)
    print(table([summary]))
    print()
    print(table(result["by_component"]))
    print()
    print(table(result["sent_by_key"]))
    print()
    print(table([{"command": k, "executed_per_step": v}
                 for k, v in result["executed_by_command"].items()]))  # fmt: skip
    print()
    print(table(capacity))
    print()
    print(table([limits]))
    command = "python -m bench.redis_cost " + " ".join(argv or sys.argv[1:])
    print(
        write(
            "redis_cost", command.strip(), [summary],
            by_component=result["by_component"],
            sent_by_key=result["sent_by_key"],
            executed_by_command=result["executed_by_command"],
            node_capacity=capacity, ceilings=limits,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
