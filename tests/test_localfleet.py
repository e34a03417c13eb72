"""LocalFleet: embedded Redis + Celery worker processes (+ Flower), all stopped by PID."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from fleet import AgentStepSpec, StepOutcome
from fleet.celery import CeleryExecutor
from fleet.combinators import run_round
from fleet.config import FleetSettings, load_settings
from fleet.errors import BrokerError, ConfigError
from fleet.localfleet import LocalFleet

pytestmark = [pytest.mark.celery, pytest.mark.slow]


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (zombies included: an unreaped child still counts)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after its ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fleet_settings(tmp_path: Path, key_prefix: str) -> FleetSettings:
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.slow_echo]\nkind = "python"\ntarget = "tests.agents:slow_echo"\n')
    return load_settings(agents_file=agents, key_prefix=key_prefix)


async def celery_round(settings: FleetSettings, specs: list[AgentStepSpec]) -> list[StepOutcome]:
    async with CeleryExecutor(settings=settings) as executor:
        return await run_round(executor, specs, workflow_id="localfleet-round")


def test_round_runs_on_the_fleet_and_stop_leaves_nothing(fleet_settings: FleetSettings) -> None:
    """A 2-worker fleet runs a round through CeleryExecutor; after stop none of its PIDs exist."""
    before = children_of(os.getpid())
    with LocalFleet(workers=2, concurrency=2, settings=fleet_settings) as local:
        started = {process.pid for process in local.processes}
        assert children_of(os.getpid()) - before == started
        assert sorted(process.role for process in local.processes) == [
            "flower",
            "redis",
            "worker",
            "worker",
        ]
        assert local.redis_url.startswith("redis://127.0.0.1:")
        assert local.flower_url is not None and local.flower_url.startswith("http://127.0.0.1:")
        directory = local.directory
        assert directory is not None and directory.is_dir()

        specs = [
            AgentStepSpec(task_id=f"s{i}", agent="slow_echo", description="echo", prompt=f"p{i}")
            for i in range(8)
        ]
        outcomes = asyncio.run(celery_round(local.settings, specs))

        assert [outcome.output for outcome in outcomes] == [f"p{i}" for i in range(8)]
        assert all(outcome.success for outcome in outcomes)
        assert {outcome.worker for outcome in outcomes} <= set(local.worker_names)
    assert not [pid for pid in started if alive(pid)]
    assert children_of(os.getpid()) <= before
    assert local.processes == []
    assert not directory.exists()  # the temporary directory it made is gone too


def test_failed_start_stops_everything_it_started(fleet_settings: FleetSettings) -> None:
    """Flower cannot bind its port: start() fails quoting Flower's log, and no child survives."""
    before = children_of(os.getpid())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        local = LocalFleet(workers=1, concurrency=1, settings=fleet_settings, flower_port=port)
        with pytest.raises(BrokerError, match="flower .* exited") as failure:
            local.start()
    assert "Address already in use" in str(failure.value) or "Errno 98" in str(failure.value)
    assert children_of(os.getpid()) <= before
    assert local.processes == []


def test_bad_arguments_fail_before_starting_anything(fleet_settings: FleetSettings) -> None:
    """Out-of-range options are ConfigErrors (ValueErrors) naming the value."""
    with pytest.raises(ConfigError, match="at least 1 worker"):
        LocalFleet(workers=0, settings=fleet_settings)
    with pytest.raises(ValueError, match="'gevent'"):
        LocalFleet(pool="gevent", settings=fleet_settings)  # type: ignore[arg-type]
