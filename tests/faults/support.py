"""Helpers of the fault scenarios: fresh Redis and workers per trial, counters, trial reports.

Every trial gets its own ``redis-server`` on a free port, its own worker processes, its own
key prefix, queue and counter directory; everything it starts is stopped by PID on exit.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import AgentStepSpec
from fleet.config import FleetSettings
from fleet.redis_server import RedisServer
from tests.celery_support import REPO, CeleryWorkers, fleet_settings, settings_env

FAULTS_AGENTS_FILE = Path(__file__).resolve().parent / "agents.toml"

SUMMARY: list[str] = []
"""One ``faults: <scenario> <passed>/<total> trials passed`` line per scenario run."""


@dataclass(frozen=True)
class Attempt:
    """One run of a step, as its agent recorded it."""

    worker: str
    at: float
    """Wall-clock time (``time.time()``) the agent started."""


def attempts(counter_dir: Path) -> dict[str, list[Attempt]]:
    """Task id -> every run of that step, in order (see ``tests/faults/agents.py``)."""
    found: dict[str, list[Attempt]] = {}
    for path in counter_dir.iterdir():
        if path.name.startswith("~"):  # a trial's marker (see agents.attempt), not a step
            continue
        runs = []
        for line in path.read_text(encoding="utf-8").splitlines():
            worker, at = line.rsplit(" ", 1)
            runs.append(Attempt(worker, float(at)))
        found[path.name] = runs
    return found


def specs(n: int, prefix: str, agent: str = "attempt") -> list[AgentStepSpec]:
    """``n`` steps ``<prefix>0``... whose prompt (and so output) is ``p<i>``."""
    return [
        AgentStepSpec(task_id=f"{prefix}{i}", agent=agent, description="fault", prompt=f"p{i}")
        for i in range(n)
    ]


@contextlib.contextmanager
def fresh_redis(directory: Path, *, appendonly: bool = False) -> Iterator[RedisServer]:
    """A ``redis-server`` of this trial's own on a free port (stopped by PID)."""
    server = RedisServer(directory / "redis", appendonly=appendonly).start()
    try:
        yield server
    finally:
        server.stop()


def trial_settings(redis_url: str, **overrides: Any) -> FleetSettings:
    """Settings for one trial: a fresh key prefix and queue, the faults' agents file."""
    prefix = f"faults-{uuid.uuid4().hex[:10]}"
    return fleet_settings(redis_url, prefix, agents_file=FAULTS_AGENTS_FILE, **overrides)


@contextlib.contextmanager
def fresh_workers(
    settings: FleetSettings,
    directory: Path,
    names: list[str],
    *,
    concurrency: int,
    env: Mapping[str, str],
) -> Iterator[CeleryWorkers]:
    """Start ``names`` (threads pool) and wait for their pings; stop them by PID on exit."""
    fleet = CeleryWorkers(settings, directory, concurrency, dict(env))
    try:
        fleet.start(*names)
        yield fleet
    finally:
        fleet.stop()


def process_env(settings: FleetSettings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child Python process that reads exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings))
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["FLEET_CONFIG"] = str(REPO / "config" / "fleet.toml")
    return env


@dataclass
class TrialReport:
    """What the trials of one scenario came to."""

    scenario: str
    total: int
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        return f"faults: {self.scenario} {self.passed}/{self.total} trials passed"


async def run_trials(
    scenario: str,
    count: int,
    directory: Path,
    trial: Callable[[int, Path], Awaitable[str]],
) -> TrialReport:
    """Run ``trial(n, its own directory)`` ``count`` times; report and assert all passed.

    A trial returns a one-line note (its measurements). A failing trial does not stop
    the others: the report says how many passed and why the rest failed.
    """
    report = TrialReport(scenario, count)
    for n in range(1, count + 1):
        trial_dir = directory / f"trial{n}"
        trial_dir.mkdir(parents=True)
        try:
            note = await trial(n, trial_dir)
        except Exception as error:
            detail = "".join(traceback.format_exception(error))[-4000:]
            report.failures.append(f"trial {n}: {detail}")
            report.notes.append(f"trial {n}: FAILED {type(error).__name__}: {error}"[:300])
        else:
            report.passed += 1
            report.notes.append(f"trial {n}: {note}")
    SUMMARY.append("\n  ".join([report.line, *report.notes]))
    print(report.line)
    for note in report.notes:
        print("  " + note)
    assert report.passed == report.total, "\n".join([report.line, *report.failures])
    return report
