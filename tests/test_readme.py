"""Every Python snippet in README.md runs as written, from an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_has_python_snippets() -> None:
    """The snippets below are really found (a changed fence must not skip them all)."""
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_readme_python_snippet_runs_as_written(tmp_path: Path, number: int) -> None:
    """A program runs with python; a workflow `main(workflow)` runs with `fleet run`."""
    snippet = SNIPPETS[number]
    (tmp_path / "snippet.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(REPO)
    if "asyncio.run(" in snippet or "async def main(workflow" not in snippet:
        command = [sys.executable, "snippet.py"]
    else:
        command = [sys.executable, "-m", "fleet", "run", "snippet.py:main", "--store", "memory"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_the_readme_says_how_to_install_fleet_with_extras_that_exist() -> None:
    """Outside the clone's .venv: `pip install .`, and only extras pyproject.toml declares."""
    text = (REPO / "README.md").read_text()
    assert "`pip install .`" in text
    extras = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    named = re.findall(r"'\.\[([\w-]+)\]'", text)
    assert named and set(named) <= extras, (named, extras)
