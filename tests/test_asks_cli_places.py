"""`fleet asks` and `fleet answer` pointed at a journal that is not there.

A Redis journal that does not answer is one line and exit status 2 (as for `fleet run`);
a mistyped SQLite journal path is not reported as "no open questions".
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fleet.redis_server import free_port

FLOW = """
from fleet import AgentStepSpec, Workflow


async def main(workflow: Workflow) -> None:
    await workflow.phase("p", [AgentStepSpec(task_id="a", agent="echo", description="", prompt="x")])
"""


def fleet(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_RUN_INDEX"] = str(directory / "runs.db")
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def only_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_unreachable_redis_journal_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    for args in (("asks",), ("answer", "release-1", "publish", "--json", "true")):
        done = fleet(tmp_path, *args, "--store", url)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        line = only_line(done)
        assert "cannot reach Redis at redis://:***@127.0.0.1:" in line, line
        assert "fix --store (FLEET_STORE)" in line and "hunter2" not in line


def test_a_missing_sqlite_journal_is_named_not_listed_as_empty(tmp_path: Path) -> None:
    done = fleet(tmp_path, "asks", "--store", "sqlite:jornal.db")
    assert done.returncode == 1, (done.stdout, done.stderr)
    line = only_line(done)
    assert "no journal at 'jornal.db'" in line and "no open questions" not in line
    assert not (tmp_path / "jornal.db").exists()


@pytest.mark.redis
def test_an_empty_listing_names_the_journals_other_runs_used(
    tmp_path: Path, redis_url: str
) -> None:
    """A run on a Redis journal, `fleet asks` without --store: the line points at Redis."""
    (tmp_path / "flow.py").write_text(FLOW)
    ran = fleet(
        tmp_path, "run", "flow.py:main", "--root-id", f"qa-{uuid.uuid4().hex}", "--store", redis_url
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    done = fleet(tmp_path, "run", "flow.py:main", "--root-id", "r2")  # the default journal
    assert done.returncode == 0, done.stdout + done.stderr
    listing = fleet(tmp_path, "asks")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    line = only_line(listing)
    assert line.startswith("no open questions in sqlite:.fleet/journal.db; runs also used ")
    assert f"{redis_url} (fleet asks --store ...)" in line
