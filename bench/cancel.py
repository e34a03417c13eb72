"""How fast a cancel stops the spending: time to the last model request, to the last closed one.

Each trial runs a round of ``--steps`` steps whose model calls take ``--latency`` seconds
(the loopback provider, ``bench/provider.py``) on ``--workers`` worker processes x
``--concurrency`` threads, and cancels it ``--cancel-after`` seconds after the first model
request, the way ``fleet cancel`` does (the Redis cancel board). From the provider's
request log it reports, relative to the cancel:

- ``last_request_s``: when the provider received its last request (negative: none came
  after the cancel);
- ``last_closed_s``: when the last open request was closed by the client;
- ``tokens_after``: tokens of answers the provider completed after the cancel (billed);

plus the requests made, those the client closed early, the ledger's reserved tokens after
the run (must be 0) and how many outcomes were ``cancelled``. p50 and max over the trials.

    python -m bench.cancel [--trials 5] [--steps 100] [--latency 5] [--cancel-after 1]

``--cancel-after 0.1`` cancels while the workers are still taking their first steps, which
shows how late a request can still arrive. Starts its own redis-server, provider and workers
(stopped by PID). Writes ``bench/results/cancel.json`` (``cancel_after_<s>s.json`` for
another ``--cancel-after``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import table, write
from bench.provider import ProviderProcess
from fleet import AgentStepSpec, WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.ledgers import RedisLedger
from fleet.redis_server import RedisServer
from fleet.runs import RedisRunRegistry
from fleet.workflow import Workflow
from tests.celery_support import CeleryWorkers, fleet_settings


def _settings(redis_url: str, agents: Path, steps: int) -> FleetSettings:
    return fleet_settings(
        redis_url, agents_file=agents, max_in_flight=steps, claim_timeout_s=60.0, step_lease_s=2.0
    )


async def _wait_for(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        await asyncio.sleep(0.02)


async def trial(
    number: int, settings: FleetSettings, provider: ProviderProcess, args: argparse.Namespace
) -> dict[str, Any]:
    """One cancelled round; the row of figures described in the module docstring."""
    root = f"bench-cancel-{number}-{time.time_ns()}"
    await asyncio.to_thread(provider.reset)
    ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
    budget = WorkflowBudget(10_000_000, ledger=ledger, workflow_id=root)
    board = RedisRunRegistry(settings.redis_url, key_prefix=settings.key_prefix)
    executor = CeleryExecutor(settings=settings, budget=budget)
    builder = Workflow.builder(executor).with_budget(budget).with_cancel_board(board)
    workflow = builder.with_root_id(root).build()
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="llm", description="bench", prompt=f"step {i}")
        for i in range(args.steps)
    ]
    async with workflow:
        phase = asyncio.create_task(workflow.phase("work", specs))

        async def busy() -> bool:
            stats = await asyncio.to_thread(provider.stats, log=False)
            return int(stats["requests"]) >= 1

        await _wait_for(busy, 120)
        log = (await asyncio.to_thread(provider.stats))["log"]
        first = min(entry["at"] for entry in log)
        await asyncio.sleep(max(first + args.cancel_after - time.time(), 0))
        notice = await RedisRunRegistry(settings.redis_url, key_prefix=settings.key_prefix).request(
            root, "bench cancel"
        )
        assert notice is not None, "the run was not registered"
        outcomes = await phase

    async def quiet() -> bool:
        stats = await asyncio.to_thread(provider.stats, log=False)
        return int(stats["in_flight"]) == 0

    await _wait_for(quiet, 30)
    log = (await asyncio.to_thread(provider.stats))["log"]
    reserved = (await ledger.state(root)).reserved
    await ledger.close()
    await board.close()
    await executor.aclose()
    cancel_at = notice.at
    closed = [e for e in log if e.get("status") == "client_closed"]
    billed_after = [e for e in log if e.get("status") == 200 and e["done_at"] > cancel_at]
    return {
        "trial": number,
        "requests": len(log),
        "closed_early": len(closed),
        "last_request_s": max(e["at"] for e in log) - cancel_at,
        "last_closed_s": (max(e["done_at"] for e in closed) - cancel_at) if closed else 0.0,
        "tokens_after": sum(int(e.get("total_tokens") or 0) for e in billed_after),
        "reserved_after": reserved,
        "cancelled": sum(o.error == "cancelled" for o in outcomes),
    }


async def main_async(args: argparse.Namespace, directory: Path) -> list[dict[str, Any]]:
    server = RedisServer(directory / "redis").start()
    provider = ProviderProcess(latency_s=args.latency, completion_tokens=64)
    provider.start()
    try:
        agents = directory / "agents.toml"
        agents.write_text(
            f'[agents.llm]\nkind = "openai"\nbase_url = "{provider.base_url}"\nmodel = "m"\n'
            "max_tokens = 64\ntimeout_s = 120\nmax_concurrent = 256\n"
        )
        settings = _settings(server.url, agents, args.steps)
        workers = CeleryWorkers(settings, directory, concurrency=args.concurrency)
        try:
            workers.start(*(f"w{i + 1}" for i in range(args.workers)))
            rows = []
            for number in range(1, args.trials + 1):
                row = await trial(number, settings, provider, args)
                print(table([row]).splitlines()[-1] if rows else table([row]), flush=True)
                rows.append(row)
            return rows
        finally:
            workers.stop()
    finally:
        provider.stop()
        server.stop()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """p50 and max of each figure over the trials."""
    figures = ["last_request_s", "last_closed_s", "tokens_after", "reserved_after"]
    return [
        {
            "figure": name,
            "p50": statistics.median(row[name] for row in rows),
            "max": max(row[name] for row in rows),
        }
        for name in figures
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the trials, print the tables, write ``bench/results/cancel.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--latency", type=float, default=5.0, help="seconds per model call")
    parser.add_argument("--cancel-after", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-cancel-") as tmp:
        rows = asyncio.run(main_async(args, Path(tmp)))
    summary = summarize(rows)
    print()
    print(table(summary))
    command = "python -m bench.cancel " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "cancel" if args.cancel_after == 1.0 else f"cancel_after_{args.cancel_after:g}s"
    path = write(name, command.strip(), rows, summary=summary, settings=vars(args))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
