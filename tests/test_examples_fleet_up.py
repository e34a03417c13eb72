"""The examples' agents on a local fleet, started exactly as `examples/agents.toml` says.

Run with the installed `fleet` command and no PYTHONPATH: `fleet up` imports the agents'
modules from the directory it runs in (the repository root, where `examples` is).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]


def documented_command() -> list[str]:
    """The command on the first line of examples/agents.toml (after the colon)."""
    first = (REPO / "examples" / "agents.toml").read_text().splitlines()[0]
    return shlex.split(first.split(": ", 1)[1])


def test_the_documented_fleet_up_loads_the_example_agents(tmp_path: Path) -> None:
    words = documented_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.pop("PYTHONPATH", None)
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["fleet", "up"], words
    command = [str(Path(sys.executable).parent / "fleet"), *words[1:], "--workers", "1"]
    command += ["--flower-port", "0", "--dashboard-port", "0"]
    env["FLEET_RUN_INDEX"] = str(tmp_path / "runs.db")
    log = tmp_path / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while "fleet is up" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        assert "Redis, 1 worker ..." in log.read_text(errors="replace")  # not "1 workers"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
