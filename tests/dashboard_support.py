"""A real ``fleet dashboard`` subprocess on a free loopback port (stopped by PID), and runs.

``running_dashboard`` starts ``python -m fleet dashboard`` with exactly the given settings
(as ``FLEET_*`` variables) and waits until it answers; ``run_phases`` runs a workflow of
named phases through :func:`fleet.runner.open_run`, as ``fleet run`` does, so its events
land where the dashboard reads them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx

from fleet import AgentStepSpec
from fleet.config import FleetSettings
from fleet.processes import settings_env
from fleet.redis_server import free_port
from fleet.runner import open_run, plan_run

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "dash-test-pw"


@dataclass
class Dashboard:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def auth(self) -> tuple[str, str]:
        return ("fleet", PASSWORD)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def dashboard_env(settings: FleetSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings_env(settings))
    env["FLEET_CONFIG"] = str(REPO / "config" / "fleet.toml")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextlib.contextmanager
def running_dashboard(
    settings: FleetSettings, directory: Path, **extra: str
) -> Iterator[Dashboard]:
    """``fleet dashboard`` for ``settings``; SIGTERM (then SIGKILL) by PID on exit."""
    port = free_port()
    log = directory / f"dashboard-{port}.log"
    env = dashboard_env(settings, FLEET_DASHBOARD_PASSWORD=PASSWORD, **extra)
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleet", "dashboard", "--address", "127.0.0.1"]
            + ["--port", str(port)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    dashboard = Dashboard(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"dashboard exited:\n{dashboard.log_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{dashboard.url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"dashboard not up:\n{dashboard.log_text()}"
            time.sleep(0.1)
        yield dashboard
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def run_phases(
    settings: FleetSettings,
    root_id: str,
    phases: Sequence[tuple[str, Sequence[AgentStepSpec]]],
    *,
    executor: str,
    budget_tokens: int | None = None,
    agents: dict[str, object] | None = None,
    budget_usd: Decimal | None = None,
) -> str:
    """Run ``phases`` in order as one workflow; how it ended (``finished``, an error name)."""
    places = plan_run(settings, executor=executor)
    async with open_run(
        settings,
        places,
        root_id=root_id,
        executor=executor,
        budget_tokens=budget_tokens,
        agents=agents,
        budget_usd=budget_usd,
    ) as builder:
        workflow = builder.build()
        try:
            async with workflow:
                for name, specs in phases:
                    await workflow.phase(name, specs)
        except Exception as error:
            return type(error).__name__
    return "finished"


def steps(prefix: str, agent: str, prompts: Sequence[str]) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(task_id=f"{prefix}-{i}", agent=agent, description=prefix, prompt=prompt)
        for i, prompt in enumerate(prompts, 1)
    ]
