"""Run every benchmark of the project and write BENCHMARKS.md (tables + the scaling plot).

    python -m bench.run_all [--quick] [--only NAME ...]

Each benchmark is a module ``bench/<name>.py`` that prints a table and writes
``bench/results/<name>.json`` (rows, machine, the exact command). This script runs them
one after another (each in its own process, so one cannot skew another's memory), then
renders every results file into ``BENCHMARKS.md`` and the scaling curve into
``bench/results/scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import RESULTS, machine, table

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS: dict[str, list[str]] = {
    "local_overhead": [],
    "journal": [],
    "budget": [],
    "celery_host": [],
    "celery_tracing": [],
    "rate_limits": [],
    "pydantic_ai_steps": [],
    "streaming": [],
    "redis_memory": [],
}
QUICK_ARGS: dict[str, list[str]] = {
    "pydantic_ai_steps": ["--steps", "500", "--repeat", "3"],
    "local_overhead": ["--repeat", "3"],
    "celery_tracing": ["--quick", "--repeat", "1"],
    "rate_limits": ["--steps", "200", "--requests", "40", "--tokens", "1440", "--workers", "2"],
    "streaming": ["--steps", "32", "--latency-steps", "10"],
    "redis_memory": ["--steps", "4000", "--in-flight", "1000", "--workflows", "4"],
}


def run(name: str, quick: bool) -> tuple[int, float]:
    """Run one benchmark module; returns (exit code, seconds)."""
    args = [sys.executable, "-m", f"bench.{name}", *BENCHMARKS[name]]
    if quick:
        args += QUICK_ARGS.get(name, [])
    print(f"\n=== {name}: {' '.join(args[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.call(args, cwd=ROOT)
    return code, time.monotonic() - started


def _rows_sections(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    sections = [("", result.get("rows", []))]
    for key, value in result.items():
        if key != "rows" and isinstance(value, list) and value and isinstance(value[0], dict):
            sections.append((key, value))
    return sections


def plot_scaling(result: dict[str, Any]) -> Path | None:
    """Plot throughput vs worker count from any section with 'workers' rows."""
    for _, rows in _rows_sections(result):
        points = [r for r in rows if "workers" in r and any("throughput" in k for k in r)]
        if not points:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = next(k for k in points[0] if "throughput" in k)
        workers = [p["workers"] for p in points]
        measured = [p[key] for p in points]
        linear = [measured[0] * w / workers[0] for w in workers]
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot(workers, measured, "o-", label="fleet (measured)")
        axis.plot(workers, linear, "--", color="grey", label="linear from 1 worker")
        axis.set_xlabel("worker processes")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_title("fleet scaling: 100 ms steps, threads pool")
        axis.set_xticks(workers)
        axis.legend()
        axis.grid(alpha=0.3)
        path = RESULTS / "scaling.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path
    return None


def _section(name: str, timings: dict[str, tuple[int, float]]) -> list[str]:
    """One benchmark's section of BENCHMARKS.md, from its results file."""
    path = RESULTS / f"{name}.json"
    lines = [f"## {name}", ""]
    if not path.is_file():
        code = timings.get(name, (None, 0))[0]
        return lines + [
            f"No results: the benchmark did not write {path.name} (exit code {code}).",
            "",
        ]
    result = json.loads(path.read_text(encoding="utf-8"))
    lines += [f"Command: `{result.get('command', '?')}`", ""]
    measured = result.get("machine") or {}
    if measured.get("when"):
        lines += [f"Measured {measured['when']} on {measured.get('cpus', '?')} CPUs.", ""]
    for title, rows in _rows_sections(result):
        if title:
            lines += [f"### {title}", ""]
        lines += ["```", table(rows), "```", ""]
    scalars = {
        k: v
        for k, v in result.items()
        if k not in {"benchmark", "command", "machine", "rows"} and not isinstance(v, list | dict)
    }
    if scalars:
        lines += [
            f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in scalars.items()
        ]
        lines.append("")
    if plot := plot_scaling(result):
        lines += [f"![scaling]({plot.relative_to(ROOT)})", ""]
    return lines


def render(names: list[str], timings: dict[str, tuple[int, float]], command: str) -> str:
    """BENCHMARKS.md text from the results files: ``names``, then every other results file."""
    info = machine()
    lines = [
        "# fleet benchmarks",
        "",
        f"Produced by `{command}` on {info['when']}.",
        "",
        f"Machine: {info['cpus']} CPUs ({info['processor']}), {info['platform']}, "
        f"Python {info['python']}. Every figure is a median of repeated runs; each fleet "
        "figure sits beside its comparison (bare asyncio, a plain Redis pair, raw Celery) "
        "from the same run.",
        "",
    ]
    for name in names:
        lines += _section(name, timings)
    others = sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in names)
    if others:
        lines += [
            "# Run on their own",
            "",
            "These need what `bench.run_all` does not start (a checkout of older code, a real "
            "model server, Sentinel processes, a proxy in front of Redis); each shows its "
            "command and when it last ran.",
            "",
        ]
        for name in others:
            lines += _section(name, timings)
    return "\n".join(lines)


def main() -> None:
    """Run the selected benchmarks and write BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=None)
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    timings = {name: run(name, args.quick) for name in names}
    command = "python -m bench.run_all" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    (ROOT / "BENCHMARKS.md").write_text(
        render(list(BENCHMARKS), timings, command), encoding="utf-8"
    )
    failed = [n for n, (code, _) in timings.items() if code != 0]
    print(f"\nBENCHMARKS.md written; {len(names) - len(failed)}/{len(names)} benchmarks succeeded")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
