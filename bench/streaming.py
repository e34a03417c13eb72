"""Streaming output on a fleet: delta latency, what streaming costs a worker, Redis per step.

One run, side by side, on an embedded Redis, one ``fleet worker -c 256 --pool threads``
process and bench/provider.py in a subprocess (answers streamed as server-sent events, a
chunk per token, usage in the last one). The host is this process: a ``CeleryExecutor``
under a ``Workflow`` with a ``subscribe(deltas=True)`` reader, as a program would watch it.

- ``latency``: steps one at a time; for each, the provider's clock when it wrote the first
  text chunk (its log's ``first_token_at``) to the subscriber's clock when the first
  ``step_delta`` of that step arrived (same machine, ``time.time()`` on both). The first
  delta carries ``answer N``, the provider's request number, which pairs the two.
- ``stream`` / ``plain``: 2 x 256 steps through ``max_in_flight = 256`` on the one worker,
  streamed (first token after ``--first-token`` s, then ``--tokens`` tokens ``--interval``
  s apart) and not streamed (the whole answer after the same total time). Efficiency is
  the ideal wall time (two waves of one call's duration) over the measured one;
  ``eff_vs_provider`` takes the calls' duration the provider actually gave (its median;
  a starved provider streams slower than asked, which is not the fleet's doing). The
  latency columns here are the same first-token-to-delta figure, under that load.
- Redis: commands the server executed during the case (``INFO commandstats``), per step;
  ``xadd/step`` is what the delta stream itself cost the worker (its expiry is refreshed
  about once a minute per stream); the difference between ``stream`` and ``plain`` in
  ``redis_cmds/step`` adds the host's reads of it.

    python -m bench.streaming [--steps 256] [--tokens 96] [--interval 0.02]

Writes bench/results/streaming.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench._common import median, percentile, table, write
from bench.provider import ProviderProcess
from fleet import AgentStepSpec
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.events import StepDelta
from fleet.redis_server import RedisServer
from fleet.workflow import Workflow

HERE = Path(__file__).resolve().parent.parent
_ANSWER = re.compile(r"answer (\d+)")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _commands(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def _worker(env: dict[str, str], concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "fleet", "worker", "-c", str(concurrency)]
            + ["--pool", "threads", "--hostname", f"stream-{uuid.uuid4().hex[:4]}@%h"],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _spec(agent: str, index: int) -> AgentStepSpec:
    return AgentStepSpec(task_id=f"s{index}", agent=agent, description="d", prompt=f"step {index}")


async def _round(
    settings: FleetSettings, agent: str, specs: list[AgentStepSpec], *, one_at_a_time: bool
) -> tuple[float, list[Any], dict[str, tuple[float, str]]]:
    """Run ``specs``; ``(wall_s, outcomes, {task_id: (first delta at, its text)})``."""
    first: dict[str, tuple[float, str]] = {}
    async with CeleryExecutor(settings=settings) as executor:
        flow = Workflow.builder(executor).with_root_id(f"bench-{uuid.uuid4().hex[:8]}").build()
        events = flow.subscribe(deltas=True, capacity=10_000_000)

        async def watch() -> None:
            async for event in events:
                if not isinstance(event, StepDelta):
                    continue
                at, text = first.get(event.task_id, (time.time(), ""))
                if len(text) < 40:  # enough to read the provider's "answer N" from
                    first[event.task_id] = (at, text + event.text)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)  # the delta reader is in place before the clock starts
        started = time.monotonic()
        if one_at_a_time:
            outcomes = [await flow.agent(spec) for spec in specs]
        else:
            outcomes = await flow.parallel(specs)
        wall = time.monotonic() - started
        await flow.close()
        await watcher
    return wall, outcomes, first


def _latencies_ms(first: dict[str, tuple[float, str]], log: list[dict[str, Any]]) -> list[float]:
    sent = {entry["n"]: entry.get("first_token_at") for entry in log}
    found = []
    for at, text in first.values():
        match = _ANSWER.search(text)
        token_at = sent.get(int(match.group(1))) if match else None
        if token_at is not None:
            found.append(1000 * (at - token_at))
    return found


def _case(
    name: str,
    settings: FleetSettings,
    provider: ProviderProcess,
    redis_url: str,
    *,
    agent: str,
    steps: int,
    ideal_s: float | None,
    worker: int,
    one_at_a_time: bool = False,
) -> dict[str, Any]:
    provider.reset()
    specs = [_spec(agent, index) for index in range(steps)]
    before = _commands(redis_url)
    pids = (worker, provider.pid, os.getpid())
    cpu = [_cpu_s(pid) for pid in pids]
    wall, outcomes, first = asyncio.run(_round(settings, agent, specs, one_at_a_time=one_at_a_time))
    cpu = [_cpu_s(pid) - was for pid, was in zip(pids, cpu, strict=True)]
    after = _commands(redis_url)
    used = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    log = provider.stats()["log"]
    latencies = _latencies_ms(first, log)
    durations = [entry["done_at"] - entry["at"] for entry in log if entry.get("done_at")]
    return {
        "case": name,
        "steps": steps,
        "ok": sum(1 for outcome in outcomes if outcome.success),
        "wall_s": round(wall, 3),
        "efficiency": round(ideal_s / wall, 3) if ideal_s else "-",
        "provider_call_s": round(median(durations), 3) if durations else "-",
        "eff_vs_provider": (
            round(2 * median(durations) / wall, 3) if ideal_s and durations else "-"
        ),
        "delta_ms_p50": round(median(latencies), 2) if latencies else "-",
        "delta_ms_p95": round(percentile(latencies, 95), 2) if latencies else "-",
        "redis_cmds/step": round(sum(used.values()) / steps, 1),
        "xadd/step": round(used.get("xadd", 0) / steps, 2),
        "worker_cpu_ms/step": round(1000 * cpu[0] / steps, 2),
        "provider_cpu_ms/step": round(1000 * cpu[1] / steps, 2),
        "host_cpu_ms/step": round(1000 * cpu[2] / steps, 2),
        "tokens": sum(outcome.usage.total_tokens for outcome in outcomes),
        "commands": {name: calls for name, calls in sorted(used.items()) if calls},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=256, help="calls in flight on the worker")
    parser.add_argument("--tokens", type=int, default=96, help="completion tokens per answer")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument("--first-token", type=float, default=0.3, help="seconds to 1st token")
    parser.add_argument("--latency-steps", type=int, default=40, help="steps one at a time")
    args = parser.parse_args(argv)
    call_s = args.first_token + (args.tokens - 1) * args.interval
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp / "redis").start()
        provider = ProviderProcess(
            latency_s=args.first_token, token_interval_s=args.interval,
            completion_tokens=args.tokens,
        ).start()  # fmt: skip
        worker = None
        try:
            agents = tmp / "agents.toml"
            common = (
                f'kind = "openai"\nbase_url = "{provider.base_url}"\nmodel = "bench"\n'
                f"max_tokens = {args.tokens}\nmax_concurrent = {args.steps}\n"
            )
            agents.write_text(f"[agents.stream]\n{common}stream = true\n\n[agents.plain]\n{common}")
            prefix = f"bench-stream-{uuid.uuid4().hex[:6]}"
            settings = FleetSettings(
                redis_url=server.url, key_prefix=prefix, queue=f"{prefix}.steps",
                agents_file=agents, max_in_flight=args.steps, store="memory",
            )  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
            env.update(
                PYTHONPATH=str(HERE), FLEET_CONFIG=str(HERE / "config" / "fleet.toml"),
                FLEET_REDIS_URL=server.url, FLEET_KEY_PREFIX=prefix,
                FLEET_QUEUE=f"{prefix}.steps", FLEET_AGENTS_FILE=str(agents),
            )  # fmt: skip
            worker = _worker(env, args.steps, tmp / "worker.log")
            time.sleep(3.0)  # the worker's threads and its connections come up
            _case(
                "warm-up",
                settings,
                provider,
                server.url,
                agent="stream",
                steps=8,
                ideal_s=None,
                worker=worker.pid,
            )
            rows.append(
                _case("latency", settings, provider, server.url, agent="stream",
                      steps=args.latency_steps, ideal_s=None, one_at_a_time=True,
                      worker=worker.pid)
            )  # fmt: skip
            many = 2 * args.steps
            rows.append(
                _case("stream", settings, provider, server.url, agent="stream", steps=many,
                      ideal_s=2 * call_s, worker=worker.pid)
            )  # fmt: skip
            provider.configure(latency_s=call_s)  # the same call, answered whole at the end
            rows.append(
                _case("plain", settings, provider, server.url, agent="plain", steps=many,
                      ideal_s=2 * call_s, worker=worker.pid)
            )  # fmt: skip
        finally:
            if worker is not None:
                _stop(worker)
            provider.stop()
            server.stop()
    print(table([{k: v for k, v in row.items() if k != "commands"} for row in rows]))
    command = "python -m bench.streaming " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"{os.cpu_count()} CPUs shared by the host, the worker, Redis and the provider "
        f"(and, when measured for the repo, other engineers' tests); one call = "
        f"{call_s:.2f} s ({args.first_token} s to the first token, {args.tokens} tokens "
        f"{args.interval} s apart); stream and plain run {2 * args.steps} steps through "
        f"max_in_flight {args.steps} on one worker (-c {args.steps})"
    )
    print(write("streaming", command.strip(), rows, call_s=call_s, note=note))


if __name__ == "__main__":
    main()
