"""The partition workload's long trials: a fleet cut off, paused and restarted, then checked.

Runs ``--trials`` trials of the set-append workload of :mod:`tests.faults.partition`
(three workers, one behind a fault proxy; a nemesis cuts, delays and blackholes that
worker's link, pauses another longer than the lease and restarts Redis, each fault held
``--hold`` seconds, for ``--duration`` seconds), checks every round as the suite's test
does, and prints per trial: faults injected, rounds, steps, attempts, re-runs, attempts
whose lease lapsed before they were recorded and how many of those the worker stopped,
and how long after its lease lapsed each worker stopped them (negative: before the lapse).
A trial that fails a check prints why and makes the exit status 1.

    python -m bench.partition [--trials 3] [--duration 60]

Starts its own redis-server, proxy and workers (stopped by PID). Writes
``bench/results/partition.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from bench._common import table, write
from tests.faults.nemesis import Shape
from tests.faults.partition import Tally, run_trial


def _row(n: int, tally: Tally) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial": n,
        "faults": len(tally.faults),
        "rounds": tally.rounds,
        "steps": tally.steps,
        "attempts": tally.attempts,
        "re_runs": tally.reruns,
        "lapsed": tally.lapsed,
        "stopped": tally.stopped,
        "late_calls": tally.late_calls,
        "late_starts": tally.late_starts,
    }
    for worker, lags in sorted(tally.stop_lags.items()):
        row[f"{worker}_stop_lag_median_s"] = statistics.median(lags)
        row[f"{worker}_stop_lag_max_s"] = max(lags)
    return row


async def main(args: argparse.Namespace) -> int:
    shape = Shape(duration_s=args.duration, hold_s=args.hold)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="fleet-partition-") as scratch:
        for n in range(1, args.trials + 1):
            directory = Path(scratch) / f"trial{n}"
            directory.mkdir()
            try:
                tally = await run_trial(directory, shape)
            except Exception as error:
                failures.append(f"trial {n}: {type(error).__name__}: {error}")
                traceback.print_exc()
                continue
            print(f"trial {n}: {tally.line()}", flush=True)
            rows.append(_row(n, tally))
    print(table(rows))
    for failure in failures:
        print("FAILED", failure[:2000])
    command = "python -m bench.partition " + " ".join(sys.argv[1:])
    path = write("partition", command.strip(), rows, shape=shape.__dict__, failed=len(failures))
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=60.0, help="nemesis time per trial (s)")
    parser.add_argument("--hold", type=float, default=3.0, help="how long each fault lasts (s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
