"""`fleet asks` and `fleet answer` pointed at a journal that is not there.

A Redis journal that does not answer is one line and exit status 2 (as for `fleet run`);
a mistyped SQLite journal path is not reported as "no open questions".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fleet.redis_server import free_port


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
