"""`fleet run`, `fleet status` and `fleet watch`, end to end through subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_workflow import FLOW, counts, wait_for

REPO = Path(__file__).resolve().parents[1]


def fleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    values.update(
        PYTHONPATH=str(REPO),
        FLEET_AGENTS_FILE=str(tmp_path / "no-agents.toml"),
        FLEET_STORE=f"sqlite:{tmp_path / 'journal.db'}",
        FLEET_RUN_INDEX=str(tmp_path / "runs.db"),
    )
    values.update(extra)
    return values


def run_fleet(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleet(*args),
        cwd=REPO,
        env=env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        (
            "panel",
            [
                "phase 0 review: 20 steps",
                "phase 0 review: 20 ok, 0 failed",
                "phase 1 judge: 5 ok, 0 failed",
                '"2 ** 10 = 1000": "rejected"',
                '"17 * 23 = 391": "accepted"',
                "2 phases, 25 steps run (0 failed)",
            ],
        ),
        (
            "pipeline",
            [
                '"empty": "(nothing to summarize)"',
                '"budget": "Every step reserves tokens before it runs."',
                "10 steps run (0 failed)",
            ],
        ),
        (
            "loop_until_dry",
            ["[info] round 4: 0 new pages", '"rounds": 4', '"/docs/redis"', "10 steps run"],
        ),
    ],
)
def test_fleet_run_runs_each_example(tmp_path: Path, example: str, expected: list[str]) -> None:
    """Each example runs offline through `fleet run` and prints its result and a summary."""
    done = run_fleet(tmp_path, "run", f"examples/{example}.py:main", "--root-id", f"ex-{example}")
    assert done.returncode == 0, done.stderr
    assert f"workflow ex-{example} finished" in done.stdout
    for line in expected:
        assert line in done.stdout
    # Finished: the journals of the run were cleared, the run itself is still known.
    status = run_fleet(tmp_path, "status", f"ex-{example}")
    assert status.returncode == 0, status.stderr
    assert "  finished: started " in status.stdout
    assert "journal: no phases kept (a finished run clears them)" in status.stdout


def test_fleet_run_accepts_a_module_path(tmp_path: Path) -> None:
    """`package.module:main` works as well as a file path."""
    done = run_fleet(tmp_path, "run", "examples.panel:main", "--store", "memory")
    assert done.returncode == 0, done.stderr
    assert "2 phases, 25 steps run" in done.stdout


def test_fleet_run_with_a_budget_reports_exhaustion_once(tmp_path: Path) -> None:
    """800 tokens cover the reviews but no judge: judges are refused, exhaustion told once."""
    done = run_fleet(
        tmp_path, "run", "examples/panel.py:main", "--budget", "800", "--concurrency", "1"
    )
    assert done.returncode == 1, done.stderr  # not every step succeeded
    assert "phase 0 review: 20 ok, 0 failed" in done.stdout
    assert "phase 1 judge: 0 ok, 5 failed" in done.stdout
    assert done.stdout.count("budget exhausted:") == 1
    assert done.stdout.count("FAILED (budget_exhausted)") == 5
    assert '"12 * 12 = 144": "no ruling (budget_exhausted)"' in done.stdout
    (summary,) = [line for line in done.stdout.splitlines() if " finished with 5 failed " in line]
    assert summary.endswith("/ 800 tokens")  # tokens against the limit


def test_fleet_run_failing_program_exits_1_and_says_how_to_resume(tmp_path: Path) -> None:
    """A program that raises exits 1, keeps its journal and prints the resume command."""
    flow = tmp_path / "broken.py"
    flow.write_text(
        "from fleet import AgentStepSpec\n"
        "async def main(workflow):\n"
        "    spec = AgentStepSpec(task_id='a', agent='echo', description='a', prompt='hi')\n"
        "    await workflow.phase('first', [spec])\n"
        "    raise RuntimeError('the program broke')\n"
    )
    done = run_fleet(tmp_path, "run", f"{flow}:main", "--root-id", "broken-1")
    assert done.returncode == 1
    assert "RuntimeError: the program broke" in done.stderr
    assert "re-run with --root-id broken-1 to resume" in done.stdout
    status = run_fleet(tmp_path, "status", "broken-1")
    assert "phase first: 1 step journaled" in status.stdout


def test_fleet_run_rejects_a_target_without_an_async_main(tmp_path: Path) -> None:
    """A missing file or a non-async main fails with exit 2 and a message naming it."""
    missing = run_fleet(tmp_path, "run", "nowhere/flow.py:main")
    assert missing.returncode == 2
    assert "'nowhere/flow.py' does not exist" in missing.stderr
    flow = tmp_path / "sync.py"
    flow.write_text("def main(workflow):\n    return 1\n")
    sync = run_fleet(tmp_path, "run", f"{flow}:main")
    assert sync.returncode == 2
    assert "expected `async def main(workflow)`" in sync.stderr
    assert "plain function (not async)" in sync.stderr
    assert "fleet_program_" not in sync.stderr  # no internal module name


def test_fleet_run_names_a_missing_program_function(tmp_path: Path) -> None:
    """A mistyped function name says the file defines no such name, not that it is not async."""
    flow = tmp_path / "flow.py"
    flow.write_text("async def main(workflow):\n    return None\n")
    mistyped = run_fleet(tmp_path, "run", f"{flow}:mian")
    assert mistyped.returncode == 2
    assert f"{flow} defines no 'mian'" in mistyped.stderr
    assert "expected `async def mian(workflow)`" in mistyped.stderr


@pytest.mark.faults
def test_fleet_status_shows_journaled_phases_and_budget_after_a_crash(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """After kill -9 in phase 3, `fleet status` lists phases 1–2 as journaled, and the budget."""
    flow = tmp_path / "three_phases.py"
    flow.write_text(FLOW)
    counters = tmp_path / "counters"
    counters.mkdir()
    shared = {
        "FLEET_REDIS_URL": redis_url,
        "FLEET_KEY_PREFIX": key_prefix,
        "FLEET_TEST_COUNTER_DIR": str(counters),
    }
    child = subprocess.Popen(
        fleet("run", f"{flow}:main", "--root-id", "st-1", "--store", redis_url, "--budget", "9000"),
        cwd=REPO,
        env=env(tmp_path, FLOW_HANG="1", **shared),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for((counters / "reached-phase-3").exists, 60, child)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert counts(counters)["p1"] == 1
    status = run_fleet(tmp_path, "status", "st-1", "--store", redis_url, **shared)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    phases = [line.strip() for line in lines if line.strip().startswith("phase ")]
    assert [line.split(" (")[0] for line in phases] == [
        "phase gather: 3 steps journaled",
        "phase review: 2 steps journaled",
    ]
    assert any(
        line.strip().startswith("budget: 0 consumed") and "of 9000 tokens" in line for line in lines
    )


@pytest.mark.redis
def test_fleet_watch_follows_a_run_from_another_process(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """`fleet watch` started before the run prints its events and exits when it finishes."""
    shared = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": key_prefix}
    watcher = subprocess.Popen(
        fleet("watch", "watched-1", "--timeout", "60"),
        cwd=REPO,
        env=env(tmp_path, PYTHONUNBUFFERED="1", **shared),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline().rstrip("\n")  # the watcher is ready before the run
        done = run_fleet(
            tmp_path,
            "run",
            "examples/panel.py:main",
            "--root-id",
            "watched-1",
            "--event-stream",
            redis_url,
            **shared,
        )
        assert done.returncode == 0, done.stderr
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            os.kill(watcher.pid, signal.SIGKILL)
            watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert first.startswith("waiting for workflow watched-1 to start (looking in: ")
    lines = out.splitlines()
    assert lines[0] == "workflow watched-1 started"
    assert "phase 0 review: 20 steps" in lines
    assert "phase 1 judge: 5 ok, 0 failed" in lines
    assert '[info] 2 ** 10 = 1000: rejected votes="2/4"' in lines
    assert sum("step review-" in line for line in lines) == 20
    assert lines[-1] == "workflow watched-1 finished"
    # Watching a run that already ended replays it from its start marker and exits.
    again = run_fleet(tmp_path, "watch", "watched-1", "--timeout", "10", **shared)
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1] == "workflow watched-1 finished"
    assert "phase 1 judge: 5 ok, 0 failed" in again.stdout


@pytest.mark.celery
def test_fleet_run_on_celery_workers(tmp_path: Path, redis_url: str) -> None:
    """`--executor celery` runs the panel on a real worker; the event stream shows where."""
    from tests.celery_support import fleet_settings, running_workers, settings_env

    settings = fleet_settings(redis_url, agents_file=REPO / "examples" / "agents.toml")
    shared = {k: v for k, v in settings_env(settings).items() if k != "FLEET_STORE"}
    with running_workers(settings, tmp_path, "worker1"):
        done = run_fleet(
            tmp_path,
            "run",
            "examples/panel.py:main",
            "--executor",
            "celery",
            "--root-id",
            "on-celery",
            "--store",
            redis_url,
            **shared,
        )
        assert done.returncode == 0, done.stderr
        assert "2 phases, 25 steps run (0 failed)" in done.stdout
        assert '"99 * 99 = 9810": "rejected"' in done.stdout
        replay = run_fleet(tmp_path, "watch", "on-celery", "--timeout", "10", **shared)
    steps = [line for line in replay.stdout.splitlines() if line.startswith("  step ")]
    assert len(steps) == 25
    assert all(" on worker1@" in line for line in steps)


def _readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = text.split("```" + language + "\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


def test_readme_run_status_watch_sequence_works_verbatim(tmp_path: Path) -> None:
    """The README's flow and its run / status / watch lines work as shown, on the defaults."""
    (flow,) = [b for b in _readme_blocks("python") if "async def main(workflow: Workflow)" in b]
    (tmp_path / "flow.py").write_text(flow)
    (commands,) = [b for b in _readme_blocks("bash") if b.startswith("fleet run flow.py:main")]
    run_line, status_line, watch_line = [
        line.split("#")[0].split() for line in commands.strip().splitlines()
    ]
    values = env(tmp_path, PYTHONUNBUFFERED="1")
    for key in ("FLEET_STORE", "FLEET_RUN_INDEX"):  # the defaults, as a user has them
        del values[key]

    def cli(words: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert words[0] == "fleet"
        return subprocess.run(
            fleet(*words[1:]),
            cwd=tmp_path,
            env=values,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    unknown = cli(["fleet", "status", "nightly"])
    assert unknown.returncode == 1
    assert unknown.stdout.startswith("no workflow 'nightly' found (looked in: journal sqlite:")
    assert len(unknown.stdout.strip().splitlines()) == 1
    # A watcher started before the run follows it live from another process.
    watcher = subprocess.Popen(
        fleet(*watch_line[1:], "--timeout", "60"),
        cwd=tmp_path,
        env=values,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the watcher is looking before the run starts
        done = cli(run_line)
        assert done.returncode == 0, done.stderr
        assert "workflow nightly finished" in done.stdout
        rest, err = watcher.communicate(timeout=60)
        live = first + rest
    finally:
        if watcher.poll() is None:
            os.kill(watcher.pid, signal.SIGKILL)
            watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    lines = live.splitlines()
    assert lines[0].startswith("waiting for workflow nightly to start")
    assert "workflow nightly started" in lines
    assert "phase 0 review: 3 steps" in lines
    assert "phase 0 review: 3 ok, 0 failed" in lines
    assert lines[-1] == "workflow nightly finished"
    # After the run: status finds it by its root id and shows the budget it spent.
    status = cli(status_line)
    assert status.returncode == 0, status.stderr
    assert "  finished: started " in status.stdout
    assert "steps: 3 done, 0 failed, 0 in flight" in status.stdout
    (budget,) = [line.strip() for line in status.stdout.splitlines() if "budget:" in line]
    assert budget.startswith("budget: ") and "consumed + 0 reserved of 20000 tokens" in budget
    assert not budget.startswith("budget: 0 consumed")
    replay = cli(watch_line + ["--timeout", "10"])
    assert replay.returncode == 0
    assert replay.stdout.splitlines()[-1] == "workflow nightly finished"


@pytest.mark.redis
def test_status_and_watch_find_a_run_on_a_redis_journal_without_options(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """After `fleet run --store redis://…`, bare `fleet status`/`budget show ROOT` find it."""
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    counters = tmp_path / "counters"
    counters.mkdir()
    other = {"FLEET_KEY_PREFIX": key_prefix, "FLEET_TEST_COUNTER_DIR": str(counters)}
    done = run_fleet(
        tmp_path,
        "run",
        f"{flow}:main",
        "--root-id",
        "on-redis",
        "--store",
        redis_url,
        "--budget",
        "9000",
        **other,
    )
    assert done.returncode == 0, done.stderr
    # FLEET_REDIS_URL is not set: only the run index can say where the run lived.
    status = run_fleet(tmp_path, "status", "on-redis", **other)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"journal {redis_url}" in status.stdout
    assert "  finished: started " in status.stdout
    assert "of 9000 tokens" in status.stdout
    budget = run_fleet(tmp_path, "budget", "show", "on-redis", **other)  # its Redis ledger
    assert budget.returncode == 0, budget.stdout + budget.stderr
    (limit,) = [line.split() for line in budget.stdout.splitlines() if " limit " in line]
    assert limit[:4] == ["│", "limit", "│", "9000"], budget.stdout
    watch = run_fleet(tmp_path, "watch", "on-redis", "--timeout", "10", **other)
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.splitlines()[-1] == "workflow on-redis finished"
    missing = run_fleet(tmp_path, "status", "never-ran", **other)
    assert missing.returncode == 1
    assert missing.stdout.count("\n") == 1 and "looked in:" in missing.stdout


RESUMABLE_FLOW = """
import asyncio
import os
from pathlib import Path

from fleet import AgentStepSpec


async def hang(spec, ctx):
    Path(os.environ["FLOW_MARK"]).touch()
    if os.environ.get("FLOW_HANG") == "1":
        await asyncio.sleep(3600)
    return spec.prompt


AGENTS = {"hang": hang}


def step(task_id, agent="echo"):
    return AgentStepSpec(task_id=task_id, agent=agent, description=task_id, prompt=task_id * 9)


async def main(workflow):
    await workflow.phase("one", [step("a"), step("b"), step("c")])
    await workflow.phase("two", [step("d"), step("e")])
    await workflow.phase("three", [step("h", "hang")])
"""


def _consumed(status: subprocess.CompletedProcess[str]) -> int:
    (line,) = [line.strip() for line in status.stdout.splitlines() if "budget:" in line]
    return int(line.split()[1])


@pytest.mark.faults
def test_a_resumed_local_run_continues_its_budget(tmp_path: Path) -> None:
    """Killed in phase 3 and re-run, a local run ends with the consumption of an unbroken run."""
    flow = tmp_path / "flow.py"
    flow.write_text(RESUMABLE_FLOW)
    mark = tmp_path / "reached-three"
    common = ("run", f"{flow}:main", "--budget", "100000")
    whole = run_fleet(tmp_path, *common, "--root-id", "whole", FLOW_MARK=str(mark))
    assert whole.returncode == 0, whole.stderr
    expected = _consumed(run_fleet(tmp_path, "status", "whole"))
    assert expected > 0
    mark.unlink()
    child = subprocess.Popen(
        fleet(*common, "--root-id", "broken"),
        cwd=REPO,
        env=env(tmp_path, FLOW_MARK=str(mark), FLOW_HANG="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(mark.exists, 60, child)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    crashed = run_fleet(tmp_path, "status", "broken")
    assert "  running: started " in crashed.stdout  # killed: no end entry was written
    assert _consumed(crashed) == expected  # phases one and two, all that was spent
    resumed = run_fleet(tmp_path, *common, "--root-id", "broken", FLOW_MARK=str(mark))
    assert resumed.returncode == 0, resumed.stderr
    assert "5 served from the journal" in resumed.stdout
    assert _consumed(run_fleet(tmp_path, "status", "broken")) == expected


HANG_IN_PHASE_1 = """
import asyncio, os
from pathlib import Path
from fleet import AgentStepSpec


async def hang(spec, ctx):
    Path(os.environ["HANG_MARK"]).touch()
    await asyncio.sleep(3600)


AGENTS = {"hang": hang}


async def main(workflow):
    step = AgentStepSpec(task_id="a", agent="hang", description="", prompt="x")
    await workflow.phase("first", [step])
"""


def test_status_of_a_run_in_its_first_phase_says_no_phase_completed_yet(tmp_path: Path) -> None:
    """A running run with nothing journaled is not called finished."""
    (tmp_path / "hang.py").write_text(HANG_IN_PHASE_1)
    mark = tmp_path / "in-phase-1"
    child = subprocess.Popen(
        fleet("run", f"{tmp_path / 'hang.py'}:main", "--root-id", "early-1"),
        cwd=REPO,
        env=env(tmp_path, HANG_MARK=str(mark)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(mark.exists, 60, child, "phase 1")
        status = run_fleet(tmp_path, "status", "early-1")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert status.returncode == 0, status.stderr
    assert "  running: started " in status.stdout, status.stdout
    assert "  journal: no phase completed yet\n" in status.stdout, status.stdout
    assert "finished run" not in status.stdout
