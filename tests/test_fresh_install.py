"""A plain install, as `./scripts/demo` makes it, runs the fleet from any directory.

The test venv has every dev tool (pytest pulls in `packaging`, for one), so it cannot
notice a dependency fleet forgot to declare. This builds a fresh clone's `.venv` the way
`scripts/demo` does (base dependencies only), then runs the README's fleet commands from a
directory outside the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

FLOW = """\
from fleet import AgentStepSpec

async def main(workflow):
    outcomes = await workflow.phase("greet", [
        AgentStepSpec(task_id=f"t{n}", agent="echo", description="", prompt=f"hi {n}")
        for n in range(4)
    ])
    return sorted({outcome.worker for outcome in outcomes})
"""


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.defpath if "PATH" not in env else env["PATH"]
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files (as a clone has them) with `.venv` made by `scripts/demo`."""
    target = tmp_path_factory.mktemp("clone") / "fleet"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    demo = subprocess.run(
        ["bash", "scripts/demo"],
        cwd=target,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "33 steps: 33 succeeded" in demo.stdout
    return target


def _fleet(clone: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(clone / ".venv" / "bin" / "fleet"), *args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A directory outside the clone (no config/, no agents file)."""
    place = tmp_path / "elsewhere"
    place.mkdir()
    return place


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fleet_demo_on_a_fleet_from_another_directory(clone: Path, elsewhere: Path) -> None:
    """The README's second command: `.venv/bin/fleet demo --fleet` prints its summary."""
    done = _fleet(clone, elsewhere, "demo", "--fleet", "--workers", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "33 steps: 33 succeeded" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.fixture
def fleet_up(clone: Path, elsewhere: Path) -> Iterator[dict[str, object]]:
    """`fleet up` from outside the clone; stopped with SIGINT (then SIGKILL) by PID."""
    pidfile = elsewhere / "up.json"
    log = elsewhere / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(clone / ".venv" / "bin" / "fleet"), "up", "--workers", "1"]
            + ["--flower-port", "0", "--dashboard-port", "0", "--pidfile", str(pidfile)],
            cwd=elsewhere,
            env=_clean_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while "fleet is up" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        yield {**json.loads(pidfile.read_text()), "log": log}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fleet_up_a_worker_and_the_dashboard_from_another_directory(
    clone: Path, elsewhere: Path, fleet_up: dict[str, object]
) -> None:
    """`fleet up`, one more `fleet worker` and the dashboard start; a run uses the workers."""
    roles = sorted(str(p["role"]) for p in fleet_up["processes"])  # type: ignore[attr-defined]
    assert roles == ["dashboard", "flower", "redis", "worker"]
    dashboard = str(fleet_up["dashboard_url"])
    assert httpx.get(f"{dashboard}/healthz", timeout=10).status_code == 200
    redis_url = str(fleet_up["redis_url"])
    env = {**_clean_env(), "FLEET_REDIS_URL": redis_url}
    log = elsewhere / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [str(clone / ".venv" / "bin" / "fleet"), "worker", "-c", "2", "-n", "extra@%h"],
            cwd=elsewhere,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        (elsewhere / "flow.py").write_text(FLOW)
        run = subprocess.run(
            [str(clone / ".venv" / "bin" / "fleet"), "run", "flow.py:main"]
            + ["--executor", "celery", "--store", "memory"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "1 phase, 4 steps run (0 failed)" in run.stdout
        assert "worker1@" in run.stdout or "extra@" in run.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
    assert "Traceback" not in log.read_text(errors="replace")
