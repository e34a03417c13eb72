"""`fleet worker`, `fleet flower` and `fleet up` as a user runs them (real subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet import AgentStepSpec, StepOutcome, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.processes import celery_command
from fleet.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
FLEET = [sys.executable, "-m", "fleet"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without FLEET_* settings, reading the shipped config, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not (key.startswith("FLEET_") and key[6:].lower() in FleetSettings.model_fields)
    }
    env.update(FLEET_CONFIG=str(ROOT / "config" / "fleet.toml"), PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def agents_file(tmp_path: Path) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text('[agents.slow_echo]\nkind = "python"\ntarget = "tests.agents:slow_echo"\n')
    return path


def test_flower_without_a_password_refuses_to_start() -> None:
    """`fleet flower` with no password configured exits non-zero and says what to set."""
    result = subprocess.run(
        [*FLEET, "flower"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Flower needs a password" in result.stderr
    assert "FLEET_FLOWER_PASSWORD" in result.stderr


def test_worker_help_lists_its_options() -> None:
    """`fleet worker --help` documents concurrency, pool, queues and log level."""
    result = subprocess.run(
        [*FLEET, "worker", "--help"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    options = ("--concurrency", "--pool", "threads", "prefork", "--queues", "--loglevel")
    for option in (*options, "--metrics-port"):
        assert option in result.stdout


def test_worker_help_says_how_to_size_concurrency_for_model_calls() -> None:
    """`fleet worker --help` gives the LLM default and how to size -c for model calls."""
    result = subprocess.run(
        [*FLEET, "worker", "--help"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "Default: 64 with --pool threads" in text
    assert "(calls wanted in flight) / (worker processes)" in text


@pytest.mark.celery
def test_fleet_worker_becomes_a_celery_worker_for_the_configured_broker(
    redis_url: str, key_prefix: str, agents_file: Path
) -> None:
    """`fleet worker` execs Celery on FLEET_REDIS_URL: pings, --metrics-port, stops on TERM."""
    node = f"cli-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    metrics_port = free_port()
    env = clean_env(
        FLEET_REDIS_URL=redis_url,
        FLEET_KEY_PREFIX=key_prefix,
        FLEET_QUEUE=f"{key_prefix}.steps",
        FLEET_AGENTS_FILE=str(agents_file),
    )
    worker = subprocess.Popen(
        [
            *FLEET,
            "worker",
            "-c",
            "1",
            "--hostname",
            node.replace(socket.gethostname(), "%h"),
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        replies: dict[str, object] = {}
        while node not in replies:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker never answered a ping"
            ping = subprocess.run(
                celery_command("inspect", "ping", "--json", "--timeout=1", f"--destination={node}"),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if ping.returncode == 0:
                replies = json.loads(ping.stdout.strip().splitlines()[-1])
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'fleet_queue_depth{{queue="{key_prefix}.steps"}} 0.0' in scraped
        assert "fleet_steps_in_flight 0.0" in scraped
        cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().split(b"\0")
        assert b"celery" in cmdline and b"worker" in cmdline  # exec'd, not a child
        assert children_of(worker.pid) == set()  # threads pool: no helper processes
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        if worker.stderr:
            worker.stderr.close()
    assert not alive(worker.pid)


def read_lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)
    into.put("")


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where `fleet up` writes its PIDs; if a test fails first, kill what it lists, by PID."""
    path = tmp_path / "fleet.pids"
    yield path
    if path.exists():
        for record in json.loads(path.read_text())["processes"]:
            if alive(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)


@pytest.mark.celery
@pytest.mark.slow
def test_fleet_up_starts_a_fleet_and_ctrl_c_stops_every_child(
    agents_file: Path, key_prefix: str, pidfile: Path
) -> None:
    """`fleet up` prints where everything is; on SIGINT every PID it started is gone."""
    env = clean_env(FLEET_AGENTS_FILE=str(agents_file), FLEET_KEY_PREFIX=key_prefix)
    up = subprocess.Popen(
        [*FLEET, "up", "--workers", "2", "--concurrency", "1", "--flower-port", "0"]
        + ["--dashboard-port", "0", "--pidfile", str(pidfile)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(up.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not output or "fleet is up" not in output[-1]:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, "fleet up exited before it was ready:\n" + "".join(output)
            output.append(line)
        text = "".join(output)
        record = json.loads(pidfile.read_text())
        pids = {entry["name"]: entry["pid"] for entry in record["processes"]}
        assert record["pid"] == up.pid
        assert set(pids) == {
            "redis",
            "flower",
            "dashboard",
            f"worker1@{socket.gethostname()}",
            f"worker2@{socket.gethostname()}",
        }
        assert children_of(up.pid) == set(pids.values())
        for name, pid in pids.items():
            assert f"(pid {pid}" in text, name
        url = re.search(r"flower  (http://127\.0\.0\.1:\d+)", text)
        password = re.search(r"password '([^']+)'", text)
        assert url and password, text
        assert f"export FLEET_REDIS_URL={shlex.quote(record['redis_url'])}" in text
        auth = ("fleet", password.group(1))
        assert httpx.get(f"{url.group(1)}/api/tasks", auth=auth, timeout=5).status_code == 200
        board = re.search(r"dashboard  (http://127\.0\.0\.1:\d+)  .*password '([^']+)'", text)
        assert board and board.group(2) != password.group(1), text
        assert record["dashboard_url"] == board.group(1)
        answer = httpx.get(f"{board.group(1)}/api/workflows", auth=("fleet", board.group(2)))
        assert answer.status_code == 200 and isinstance(answer.json(), list)
        assert httpx.get(f"{board.group(1)}/api/workflows", timeout=5).status_code == 401

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
    while (line := lines.get(timeout=10)) != "":
        output.append(line)
    assert up.stdout is not None
    up.stdout.close()  # the reader thread saw its end
    assert "stopped." in "".join(output)
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert not pidfile.exists()


@pytest.mark.celery
def test_fleet_worker_imports_the_agents_of_the_directory_it_runs_in(
    redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed `fleet worker`, run where the user's agent module is, imports it.

    As `fleet run` and `celery -A` do: a user's project directory is importable without
    setting PYTHONPATH (the console script alone would not put it on ``sys.path``).
    """
    module = f"cwd_agents_{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    project.mkdir()
    (project / f"{module}.py").write_text(
        "async def shout(spec, ctx):\n    return spec.prompt.upper()\n"
    )
    (project / "agents.toml").write_text(
        f'[agents.shout]\nkind = "python"\ntarget = "{module}:shout"\n'
    )
    settings = FleetSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        queue=f"{key_prefix}.steps",
        agents_file=project / "agents.toml",
    )
    env = clean_env(
        FLEET_REDIS_URL=redis_url,
        FLEET_KEY_PREFIX=key_prefix,
        FLEET_QUEUE=settings.queue,
        FLEET_AGENTS_FILE="agents.toml",
    )
    env.pop("PYTHONPATH", None)
    console_script = str(Path(sys.executable).parent / "fleet")
    worker = subprocess.Popen(
        [console_script, "worker", "-c", "2"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.syspath_prepend(str(project))  # the host resolves the agent table too
    try:
        outcome = asyncio.run(_one_step(settings, worker))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert outcome.success, outcome.error
    assert outcome.output == "HELLO"


async def _one_step(settings: FleetSettings, worker: subprocess.Popen[str]) -> StepOutcome:
    """Run one ``shout`` step on the fleet; fail with the worker's words if it exits first."""
    executor = CeleryExecutor(settings=settings)
    spec = AgentStepSpec(task_id="s", agent="shout", description="d", prompt="hello")
    step = asyncio.ensure_future(execute_steps_parallel(executor, [spec]))
    try:
        while not step.done():
            if worker.poll() is not None:
                step.cancel()
                raise AssertionError(f"fleet worker exited: {worker.communicate()[1][-2000:]}")
            await asyncio.sleep(0.1)
        [outcome] = await asyncio.wait_for(step, 60)
        return outcome
    finally:
        await executor.aclose()
