"""Journal cost: append-one-record-per-step stores versus rewriting the whole checkpoint.

For each store (memory, SQLite, Redis) a 10,000-step resumable round of a no-op agent on
``LocalExecutor`` is timed against the same round through plain ``execute_steps_parallel``
(the difference is the journal's cost per step), ``record_step`` is timed call by call,
and resuming the round with all 10,000 steps journaled (load, identity checks, merge; no
step runs) is timed. Then the same append journal is set beside a baseline that rewrites
the whole checkpoint on every step, as the original design does, at 1,000 and 10,000
steps: the append cost stays flat, the rewrite cost grows with the journal (quadratic
in total). The baseline is generous: each record is serialised once and cached, so a
rewrite only joins and writes the accumulated text.

Columns: ``journal_us_per_step`` is the whole journal's cost per step inside the round
(journaled round minus plain round, divided by steps: identity digest, serialisation,
the store write, the initial load and the final delete); ``append_wait_*`` is how long one
``record_step`` call waited in that round (steps finishing together share a group
commit, so a call may wait for its neighbours' write too); ``append_alone_us`` is one
``record_step`` at a time with nothing to share.

Targets: SQLite and Redis journal cost <= 200 us per step; resuming 10,000 journaled
steps <= 0.5 s.

    python -m bench.journal [--steps 10000] [--repeat 3] [--baseline-sizes 1000 10000]
                            [--baseline-stores sqlite redis]

Redis: a private redis-server on a free loopback port (``FLEET_BENCH_REDIS_URL`` to use
another; keys go under a unique prefix and are deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench._common import median, percentile, table, write
from fleet import (
    AgentContext,
    AgentStepSpec,
    LocalExecutor,
    StepOutcome,
    execute_steps_parallel,
    execute_steps_parallel_resumable,
)
from fleet.checkpoint import WorkflowCheckpoint, WorkflowStepRecord
from fleet.redis_server import RedisServer
from fleet.stores import (
    CheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    SQLiteCheckpointStore,
)

HINT = 8


async def noop(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """The no-op agent every round runs."""
    return ""


def make_specs(count: int) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"step-{i:05d}", agent="noop", description="bench", prompt=f"p{i}")
        for i in range(count)
    ]


class Timed(CheckpointStore):
    """Delegates to a store and times each ``record_step`` call."""

    def __init__(self, inner: CheckpointStore) -> None:
        self.inner = inner
        self.appends: list[float] = []

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        return await self.inner.load(workflow_id)

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        started = time.perf_counter()
        await self.inner.record_step(workflow_id, record)
        self.appends.append(time.perf_counter() - started)

    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        await self.inner.save(checkpoint)

    async def delete(self, workflow_id: str) -> bool:
        return await self.inner.delete(workflow_id)

    async def list_workflows(self) -> list[str]:
        return await self.inner.list_workflows()


class Rewrite(CheckpointStore):
    """The baseline: every step rewrites the whole checkpoint document.

    ``write(workflow_id, text)`` persists one document per workflow (a SQLite row, a
    Redis string, or nothing for memory). Record JSON is cached, so a rewrite costs the
    join and the write, never re-serialising old records.
    """

    def __init__(self, write_doc: Callable[[str, str], Any]) -> None:
        self.write_doc = write_doc
        self.records: dict[str, dict[str, str]] = {}

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        return None

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        records = self.records.setdefault(workflow_id, {})
        records[record.task_id] = record.to_json()
        document = (
            f'{{"schema_version":1,"workflow_id":"{workflow_id}","steps":['
            + ",".join(records.values())
            + f'],"checkpoint_ms":{record.recorded_ms}}}'
        )
        result = self.write_doc(workflow_id, document)
        if asyncio.iscoroutine(result):
            await result

    async def save(self, checkpoint: WorkflowCheckpoint) -> None:
        raise NotImplementedError

    async def delete(self, workflow_id: str) -> bool:
        return self.records.pop(workflow_id, None) is not None

    async def list_workflows(self) -> list[str]:
        return sorted(self.records)


def sqlite_rewrite(path: Path) -> Callable[[str, str], None]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS cp (workflow_id TEXT PRIMARY KEY, doc TEXT)")

    def write_doc(workflow_id: str, document: str) -> None:
        conn.execute("INSERT OR REPLACE INTO cp VALUES (?, ?)", (workflow_id, document))

    return write_doc


def redis_rewrite(client: Any, prefix: str) -> Callable[[str, str], Any]:
    def write_doc(workflow_id: str, document: str) -> Any:
        return client.set(f"{prefix}:checkpoint:{workflow_id}", document)

    return write_doc


async def timed_round(executor: LocalExecutor, specs: list[AgentStepSpec], store: Any) -> float:
    gc.collect()
    started = time.perf_counter()
    if store is None:
        outcomes = await execute_steps_parallel(executor, specs)
    else:
        outcomes = await execute_steps_parallel_resumable(
            executor, specs, f"bench-{uuid.uuid4().hex[:8]}", store
        )
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes)
    return elapsed


async def resume_time(store: CheckpointStore, specs: list[AgentStepSpec], repeat: int) -> float:
    """Seconds to resume a round whose steps are all journaled (median of ``repeat``)."""
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    workflow_id = f"bench-resume-{uuid.uuid4().hex[:8]}"
    await execute_steps_parallel_resumable(executor, specs, workflow_id, store, keep_journal=True)
    calls = 0

    async def counting(spec: AgentStepSpec, ctx: AgentContext) -> str:
        nonlocal calls
        calls += 1
        return ""

    runner = LocalExecutor(agents={"noop": counting}, max_concurrency=HINT)
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        outcomes = await execute_steps_parallel_resumable(
            runner, specs, workflow_id, store, keep_journal=True
        )
        times.append(time.perf_counter() - started)
        assert len(outcomes) == len(specs) and all(o.success for o in outcomes)
    assert calls == 0, "a resumed step ran again"
    await store.delete(workflow_id)
    return median(times)


async def measure_store(
    name: str, store: CheckpointStore, specs: list[AgentStepSpec], repeat: int
) -> dict[str, Any]:
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    plain, journaled, appends = [], [], []
    for _ in range(repeat):
        plain.append(await timed_round(executor, specs, None))
        timed = Timed(store)
        journaled.append(await timed_round(executor, specs, timed))
        appends.extend(timed.appends)
    overhead = (median(journaled) - median(plain)) / len(specs)
    return {
        "store": name,
        "steps": len(specs),
        "plain_round_s": median(plain),
        "journaled_round_s": median(journaled),
        "journal_us_per_step": overhead * 1e6,
        "append_wait_p50_us": percentile(appends, 50) * 1e6,
        "append_wait_p99_us": percentile(appends, 99) * 1e6,
        "append_alone_us": await sequential_append(store, min(len(specs), 2000)),
        "resume_all_journaled_s": await resume_time(store, specs, repeat),
    }


async def sequential_append(store: CheckpointStore, count: int) -> float:
    """Microseconds per ``record_step`` when steps finish one at a time (no sharing)."""
    workflow_id = f"bench-seq-{uuid.uuid4().hex[:8]}"
    records = [
        WorkflowStepRecord.for_outcome(
            workflow_id,
            spec,
            StepOutcome(
                task_id=spec.task_id, session_id="s", agent="noop", output="", success=True
            ),
        )
        for spec in make_specs(count)
    ]
    gc.collect()
    started = time.perf_counter()
    for record in records:
        await store.record_step(workflow_id, record)
    elapsed = time.perf_counter() - started
    await store.delete(workflow_id)
    return elapsed / count * 1e6


async def append_vs_rewrite(
    name: str,
    append_store: CheckpointStore,
    rewrite_store: Rewrite,
    sizes: list[int],
) -> list[dict[str, Any]]:
    rows = []
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    for size in sizes:
        specs = make_specs(size)
        plain = await timed_round(executor, specs, None)
        append = await timed_round(executor, specs, append_store)
        rewrite = await timed_round(executor, specs, rewrite_store)
        rows.append(
            {
                "store": name,
                "steps": size,
                "append_round_s": append,
                "rewrite_round_s": rewrite,
                "append_us_per_step": (append - plain) / size * 1e6,
                "rewrite_us_per_step": (rewrite - plain) / size * 1e6,
                "rewrite_over_append": (rewrite - plain) / max(append - plain, 1e-9),
            }
        )
        print(table(rows[-1:]), flush=True)
    return rows


async def run(args: argparse.Namespace, redis_url: str, workdir: Path) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    specs = make_specs(args.steps)
    stores: dict[str, Callable[[], CheckpointStore]] = {
        "memory": MemoryCheckpointStore,
        "sqlite": lambda: SQLiteCheckpointStore(workdir / f"journal-{uuid.uuid4().hex[:6]}.db"),
        "redis": lambda: RedisCheckpointStore(redis_url, key_prefix=prefix),
    }
    rows = []
    for name, make in stores.items():
        store = make()
        try:
            rows.append(await measure_store(name, store, specs, args.repeat))
        finally:
            await store.close()
        print(table(rows[-1:]), flush=True)

    client = aioredis.from_url(redis_url)
    baselines: dict[str, Callable[[], Rewrite]] = {
        "memory": lambda: Rewrite(lambda _w, _d: None),
        "sqlite": lambda: Rewrite(sqlite_rewrite(workdir / f"rewrite-{uuid.uuid4().hex[:6]}.db")),
        "redis": lambda: Rewrite(redis_rewrite(client, prefix)),
    }
    comparison = []
    try:
        for name in args.baseline_stores:
            store = stores[name]()
            try:
                comparison += await append_vs_rewrite(
                    name, store, baselines[name](), args.baseline_sizes
                )
            finally:
                await store.close()
    finally:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()
    return {"rows": rows, "append_vs_rewrite": comparison}


def main() -> None:
    """Measure every store, print the tables, write bench/results/journal.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument(
        "--baseline-stores",
        nargs="+",
        choices=["memory", "sqlite", "redis"],
        default=["sqlite", "redis"],
        help="stores to compare with the rewrite baseline (memory's 10k rewrite takes minutes)",
    )
    args = parser.parse_args()
    command = (
        f"python -m bench.journal --steps {args.steps} --repeat {args.repeat} "
        f"--baseline-sizes {' '.join(map(str, args.baseline_sizes))} "
        f"--baseline-stores {' '.join(args.baseline_stores)}"
    )
    with tempfile.TemporaryDirectory(prefix="fleet-bench-journal-") as tmp:
        workdir = Path(tmp)
        external = os.environ.get("FLEET_BENCH_REDIS_URL")
        server = None if external else RedisServer(workdir / "redis").start()
        try:
            url = external or server.url  # type: ignore[union-attr]
            result = asyncio.run(run(args, url, workdir))
        finally:
            if server is not None:
                server.stop()
    print(f"\njournal cost per store ({args.steps} steps, medians of {args.repeat} runs)")
    print(table(result["rows"]))
    print("\nappend-one-record vs rewrite-the-whole-checkpoint, per step")
    print(table(result["append_vs_rewrite"]))
    targets = {
        row["store"]: {
            "journal_us_per_step_ok": row["journal_us_per_step"] <= 200,
            "resume_ok": row["resume_all_journaled_s"] <= 0.5,
        }
        for row in result["rows"]
    }
    print("\ntargets (journal <= 200 us per step, resume 10k <= 0.5 s):", targets)
    path = write(
        "journal",
        command,
        result["rows"],
        append_vs_rewrite=result["append_vs_rewrite"],
        targets=targets,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
