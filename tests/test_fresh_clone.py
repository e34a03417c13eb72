"""What a fresh clone on another machine meets: no link out of the repo, self-repairing .venv."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_tracked_symlink_leaves_the_repository() -> None:
    """A tracked symlink to a path outside the repo works only on the machine that made it."""
    listing = subprocess.run(
        ["git", "ls-files", "-s", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    leaving = []
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        if meta.split()[0] != "120000":
            continue
        target = os.readlink(REPO / path) if (REPO / path).is_symlink() else ""
        resolved = (REPO / path).parent.joinpath(target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(REPO.resolve()):
            leaving.append(f"{path} -> {target}")
    assert leaving == []
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", ".venv"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, ".venv (also as a symlink) must be ignored"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny project with fleet's scripts/venv.sh: the same repair logic, a fast install."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "venv.sh", tmp_path / "scripts" / "venv.sh")
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinyproj"\nversion = "0"\n'
        '[tool.setuptools]\npy-modules = ["tinyproj"]\n'
    )
    (tmp_path / "tinyproj.py").write_text("VALUE = 42\n")
    return tmp_path


def ensure(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", ". scripts/venv.sh && ensure_venv base ."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )


def works(project: Path) -> bool:
    venv_python = project / ".venv" / "bin" / "python"
    check = subprocess.run(
        [str(venv_python), "-c", "import tinyproj; assert tinyproj.VALUE == 42"],
        capture_output=True,
        check=False,
    )
    return check.returncode == 0 and not (project / ".venv").is_symlink()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_venv_is_repaired_from_every_broken_state(project: Path, tmp_path_factory) -> None:
    """Missing, dangling link, plain file, dead interpreter, half install: each is rebuilt."""
    venv = project / ".venv"
    first = ensure(project)
    assert first.returncode == 0, first.stderr
    assert works(project)
    stamp = next(venv.glob(".fleet-installed-base"))
    # A good venv is left alone: no second install.
    before = stamp.stat().st_mtime_ns
    assert ensure(project).returncode == 0
    assert stamp.stat().st_mtime_ns == before

    # Killed during `pip install`: the venv exists, the stamp does not; install again.
    stamp.unlink()
    (venv / "lib").joinpath("partial-marker").write_text("")
    again = ensure(project)
    assert again.returncode == 0, again.stderr
    assert works(project) and stamp.exists()

    # The interpreter no longer runs (the Python it was made from is gone).
    python = venv / "bin" / "python"
    python.unlink()
    python.symlink_to("/nonexistent/python3")
    repaired = ensure(project)
    assert repaired.returncode == 0, repaired.stderr
    assert "does not run" in repaired.stderr and works(project)

    # A dangling symlink, as a clone of the old repository had.
    shutil.rmtree(venv)
    venv.symlink_to("/nonexistent/venv-of-another-machine")
    relinked = ensure(project)
    assert relinked.returncode == 0, relinked.stderr
    assert "symlink" in relinked.stderr and works(project)

    # A symlink to some other real directory: replaced by our own venv, the target untouched.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "keep.txt").write_text("mine")
    shutil.rmtree(venv)
    venv.symlink_to(elsewhere)
    assert ensure(project).returncode == 0
    assert works(project) and (elsewhere / "keep.txt").read_text() == "mine"

    # A plain file.
    shutil.rmtree(venv)
    venv.write_text("not a venv")
    filed = ensure(project)
    assert filed.returncode == 0, filed.stderr
    assert "not a directory" in filed.stderr and works(project)


def test_a_missing_python_is_one_clear_line(project: Path) -> None:
    """No usable Python: one line that says what is wrong and what to do, exit non-zero."""
    done = subprocess.run(
        ["bash", "-c", ". scripts/venv.sh && ensure_venv base ."],
        cwd=project,
        env={**os.environ, "PYTHON": "python-that-does-not-exist"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PYTHON=" in lines[0]
    assert not (project / ".venv").exists()
