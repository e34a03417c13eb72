"""How many model calls one worker process keeps in flight: old worker code vs this tree's.

The setup of issue 13: ``fleet worker -c C --pool threads`` processes, an ``openai`` agent
pointed at bench/provider.py answering every call after 2.0 s, one round of 2 x C steps
per worker through ``CeleryExecutor(max_in_flight=C x workers)``; ideal wall time 4.0 s.
For each tree (``--base`` a checkout of the old code, e.g. ``git worktree add
../fleet-base 0c4f346``; and this tree) and each case it reports wall time,
efficiency (ideal / wall), peak calls in flight at the provider, worker peak RSS
(VmHWM) and worker CPU seconds per step (utime + stime over the round). ``--celery``
adds Celery alone on workers of the same options: a group of 2 x C ``bench.sleep`` tasks
of the same latency (registered by ``bench/celery_app.py``, not the production worker),
the ceiling any Celery-based worker reaches on this machine::

    python -m bench.llm_worker --base ../fleet-base [--cases 1x16,1x64,1x256,4x64] [--celery]

The agent declares ``max_concurrent = C`` (on its own table, the older spelling, so the
figures compare with earlier runs), so its adaptive limit starts at C. A case written
``1x64:slow`` declares nothing: the agent then starts as wide as the worker runs steps
(issue 26; before it, slow start from one call, doubling per 2 s round).

Both trees run on this interpreter: the old one also needs ``tenacity`` (``pip install
tenacity``), which fleet no longer uses. The host of each round runs in a subprocess
(bench/llm_round.py) with the same tree first on ``PYTHONPATH`` as its workers, so host
and worker speak the same protocol.
Writes bench/results/llm_worker.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench._common import table, write
from bench.celery_app import BENCH_APP
from bench.provider import ProviderProcess
from fleet.redis_server import RedisServer

HERE = Path(__file__).resolve().parent.parent
ROUND = Path(__file__).resolve().parent / "llm_round.py"
LATENCY_S = 2.0


def _proc(pid: int) -> tuple[float, float]:
    """``(cpu_seconds, peak_rss_mb)`` of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return cpu, int(hwm.split()[1]) / 1024


def _connections_received(url: str) -> int:
    """Connections Redis has accepted so far (host and workers open theirs during a round)."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


def _env(tree: Path, redis_url: str, agents_file: Path) -> dict[str, str]:
    prefix = f"bench-llm-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        PYTHONPATH=str(tree),
        FLEET_CONFIG=str(tree / "config" / "fleet.toml"),
        FLEET_REDIS_URL=redis_url,
        FLEET_KEY_PREFIX=prefix,
        FLEET_QUEUE=f"{prefix}.steps",
        FLEET_AGENTS_FILE=str(agents_file),
    )
    return env


def _worker_command(raw: bool, concurrency: int, hostname: str) -> list[str]:
    """``fleet worker``; for Celery alone, the same worker options on the benchmarks' app.

    The production worker registers no ``bench.sleep``: only ``bench.celery_app`` does.
    """
    options = ["--pool=threads", f"--concurrency={concurrency}", f"--hostname={hostname}"]
    if not raw:
        return [sys.executable, "-m", "fleet", "worker", *options]
    celery = [sys.executable, "-m", "celery", "-A", BENCH_APP, "worker", "--loglevel=info"]
    return [*celery, *options, "--without-mingle", "--without-gossip"]


def _stop(process: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def run_case(
    label: str,
    tree: Path,
    case: tuple[int, int, bool],
    redis_url: str,
    provider: Any,
    tmp: Path,
) -> dict[str, Any]:
    workers, concurrency, declared = case
    declared = declared and label == "new"  # the old code knows no max_concurrent
    raw = label == "celery"  # Celery alone: bench.sleep tasks of the same latency, no fleet
    agents = tmp / f"agents-{uuid.uuid4().hex[:6]}.toml"
    agents.write_text(
        f'[agents.llm]\nkind = "openai"\nbase_url = "{provider.base_url}"\n'
        'model = "bench"\nmax_tokens = 16\n'
        + (f"max_concurrent = {concurrency}\n" if declared else "")
    )
    env = _env(tree, redis_url, agents)
    log = open(tmp / f"{label}-{workers}x{concurrency}.log", "ab")  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            _worker_command(raw, concurrency, f"w{i}-{uuid.uuid4().hex[:4]}@%h"),
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i in range(workers)
    ]
    steps, in_flight = 2 * concurrency * workers, concurrency * workers
    driver = subprocess.Popen(
        [sys.executable, str(ROUND), str(workers), str(steps), str(in_flight)]
        + ([str(LATENCY_S)] if raw else []),
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdin is not None and driver.stdout is not None
        if driver.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{label}: the round driver did not start; see {log.name}")
        provider.reset()
        connections = _connections_received(redis_url)
        before = [_proc(p.pid)[0] for p in [driver, *procs]]
        go = time.time()
        driver.stdin.write("go\n")
        driver.stdin.flush()
        result = json.loads(driver.stdout.readline())
        host_cpu, *after = [_proc(p.pid) for p in [driver, *procs]]
        stats = provider.stats()
        connections = _connections_received(redis_url) - connections
    finally:
        for process in [driver, *procs]:
            _stop(process)
        log.close()
    ideal = 2 * LATENCY_S
    calls = sorted(entry["at"] - go for entry in stats["log"])
    cpu = [a[0] - b for a, b in zip([host_cpu, *after], before, strict=True)]
    return {
        "code": label,
        "workers": workers,
        "C": concurrency,
        "max_concurrent": concurrency if declared and not raw else "-",
        "steps": steps,
        "ok": result["ok"],
        "wall_s": result["wall_s"],
        "efficiency": ideal / result["wall_s"],
        "peak_in_flight": "-" if raw else stats["peak_in_flight"],
        "rss_mb": max(rss for _, rss in after),
        "cpu_ms_per_step": 1000 * sum(cpu[1:]) / steps,
        "host_cpu_ms_per_step": 1000 * cpu[0] / steps,
        "redis_connections": connections,
        "first_call_s": calls[0] if calls else "-",
        "C_th_call_s": calls[min(in_flight, len(calls)) - 1] if calls else "-",
        "last_call_s": calls[-1] if calls else "-",
        "errors": result["errors"],
    }


def _case(text: str) -> tuple[int, int, bool]:
    """``"4x64"`` -> ``(4, 64, True)``; ``"1x64:slow"`` -> ``(1, 64, False)``."""
    shape, _, mode = text.strip().partition(":")
    if mode not in ("", "slow") or shape.count("x") != 1:
        raise SystemExit(f"bad case {text!r}: write WORKERSxC or WORKERSxC:slow, e.g. 1x64:slow")
    workers, concurrency = (int(n) for n in shape.split("x"))
    return workers, concurrency, mode != "slow"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a checkout of the old code to compare")
    parser.add_argument(
        "--cases",
        default="1x16,1x64,1x256,4x64",
        help="WORKERSxC[:slow],... (:slow: the agent declares nothing)",
    )
    parser.add_argument("--only", choices=["base", "new"], help="run one side only")
    parser.add_argument(
        "--celery",
        action="store_true",
        help="also run Celery alone: bench.sleep tasks of the same latency on the same workers",
    )
    args = parser.parse_args(argv)
    cases = [_case(text) for text in args.cases.split(",")]
    sides = [("new", HERE)]
    if args.base is not None and args.only != "new":
        sides.insert(0, ("base", args.base.resolve()))
    if args.only == "base":
        sides = sides[:1]
    if args.celery:
        sides.append(("celery", HERE))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis").start()
        try:
            with ProviderProcess(latency_s=LATENCY_S) as provider:
                for case in cases:
                    for label, tree in sides:
                        row = run_case(label, tree, case, redis.url, provider, tmp)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        time.sleep(1.0)
        finally:
            redis.stop()
    print(table(rows))
    command = "python -m bench.llm_worker " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"{os.cpu_count()} CPUs shared by the host, the workers, Redis and the provider; "
        "'celery' rows are Celery alone (bench.sleep tasks of the same latency, same workers)"
    )
    print(write("llm_worker", command.strip(), rows, latency_s=LATENCY_S, note=note))


if __name__ == "__main__":
    main()
