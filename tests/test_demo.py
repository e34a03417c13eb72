"""`fleet demo` end to end, and the demo workflow's findings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fleet import LocalExecutor
from fleet.demo import DEMO_AGENTS, run_demo


async def test_demo_workflow_reviews_every_file() -> None:
    """The panel judges every sample file, flags the planted flaws and fixes whitespace."""
    seen: list[object] = []
    report = await run_demo(LocalExecutor(agents=DEMO_AGENTS), events=seen.append)
    assert set(report.verdicts) == {
        "api.py",
        "inventory.py",
        "pricing.py",
        "report.py",
        "storage.py",
    }
    assert report.verdicts["storage.py"]["verdict"] == "reject"
    assert any("eval()" in b for b in report.verdicts["pricing.py"]["blocking"])
    assert report.verdicts["report.py"]["verdict"] == "approve"
    # pricing.py needs two fix rounds (tabs, then trailing whitespace), so the loop ran twice.
    assert report.fixed_files == {"inventory.py": 1, "pricing.py": 2}
    assert report.fix_rounds == 2
    assert all(o.success for o in report.outcomes)
    finished = [e for e in seen if type(e).__name__ == "StepFinished"]
    assert len(finished) == 20 + 10 + 3  # panel, pipeline (2 stages × 5), fix rounds


def test_fleet_demo_command_prints_a_summary() -> None:
    """`fleet demo` runs with no services and ends with a readable summary."""
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "demo"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "review verdicts" in result.stdout
    assert "33 steps: 33 succeeded, 0 failed; 2 fix round(s)" in result.stdout


def test_fleet_demo_with_an_llm_server() -> None:
    """`fleet demo --llm URL --model NAME` asks the model for every review and uses its JSON."""
    from tests.fake_openai import FakeOpenAI, reply

    finding = {"line": 1, "rule": "LLM1", "message": "the model found this", "fixable": False}
    with FakeOpenAI() as server:
        server.script(*[reply(json.dumps({"findings": [finding]})) for _ in range(20)])
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "demo", "--llm", server.base_url, "--model", "m"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        requests = list(server.requests)
    assert result.returncode == 0, result.stderr
    assert len(requests) == 20
    assert {r.body["model"] for r in requests} == {"m"}
    assert all("Authorization" not in r.headers for r in requests)
    assert "33 steps: 33 succeeded" in result.stdout


def test_fleet_demo_rejects_llm_without_model() -> None:
    """--llm without --model is a usage error that names the missing option."""
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "demo", "--llm", "http://127.0.0.1:9/v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--model" in result.stderr


def test_fleet_demo_on_a_local_fleet() -> None:
    """`fleet demo --fleet` starts Redis + workers + Flower, runs the demo there, stops it all."""
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "demo", "--fleet", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "33 steps: 33 succeeded, 0 failed; 2 fix round(s)" in result.stdout
    ran_on = next(line for line in result.stdout.splitlines() if line.startswith("steps ran on:"))
    assert "worker1@" in ran_on and "worker2@" in ran_on and "local" not in ran_on
    assert "local fleet stopped" in result.stdout


def test_fleet_demo_never_approves_a_file_whose_reviews_failed() -> None:
    """Failed reviews make a file `incomplete` with the reason, and the demo exits 1."""
    from tests.fake_openai import FakeOpenAI, error

    with FakeOpenAI() as server:
        server.script(*[error(400, "context length exceeded") for _ in range(20)])
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "demo", "--llm", server.base_url, "--model", "m"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "approve" not in result.stdout and "reject" not in result.stdout
    incomplete = [line for line in result.stdout.splitlines() if "incomplete" in line]
    assert len([line for line in incomplete if ".py" in line]) == 5
    assert "review failed (provider" in result.stdout
    assert "5 file(s) incomplete" in result.stdout
    assert "20 failed" in result.stdout
