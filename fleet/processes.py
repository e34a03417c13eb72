"""The processes of a local fleet: how each is started, what it is, why it stopped.

:class:`~fleet.localfleet.LocalFleet` starts its workers and Flower with
:func:`celery_command`, hands them its settings through :func:`settings_env`, records each
child as a :class:`FleetProcess`, asks which workers answer with :func:`answering_workers`
and names why one stopped with :func:`last_error`. The tests and the benchmarks start
their own workers the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import FleetSettings

__all__ = [
    "FleetProcess",
    "answering_workers",
    "celery_command",
    "last_error",
    "settings_env",
]


CELERY_APP = "workers.app"
"""The Celery app every fleet process loads (``celery -A workers.app``)."""


def celery_command(*args: str) -> list[str]:
    """``python -m celery -A workers.app ARGS`` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, *args]


def settings_env(settings: FleetSettings) -> dict[str, str]:
    """``FLEET_*`` variables that make a child process read exactly ``settings``.

    The Flower and dashboard passwords are left out: only Flower and the dashboard need
    them, and they get them in their own environment, never on a command line.
    """
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None or name in ("flower_password", "dashboard_password"):
            continue
        env[f"FLEET_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


@dataclass(frozen=True)
class FleetProcess:
    """One process a :class:`LocalFleet` started."""

    role: Literal["redis", "worker", "flower", "dashboard"]
    """What the process is."""
    name: str
    """``redis``, the worker's node name (``worker1@HOST``), ``flower`` or ``dashboard``."""
    pid: int
    """Its process id (also its process group id for workers and Flower)."""
    log: Path
    """Where its output goes."""

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def last_error(self) -> str:
        """The line of its log that says why it stopped (a traceback's last line)."""
        return last_error(self.tail(200))


_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit)\w*)(:.*)?$"
)


def last_error(log: str) -> str:
    """The one line of ``log`` that names why a process stopped.

    The last exception line of a Python traceback, without its module path
    (``ConfigError: agents file ...``), else the log's last non-empty line.
    """
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        found = _EXCEPTION_LINE.match(line)
        if found:
            return found.group(1) + (found.group(2) or "")
    return lines[-1].strip() if lines else "(empty log)"


def answering_workers(env: Mapping[str, str]) -> set[str]:
    """Node names that answer a broadcast ping (``celery inspect ping``)."""
    result = subprocess.run(
        celery_command("inspect", "ping", "--json", "--timeout=1"),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return set()
    for line in reversed(result.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            replies = json.loads(line)
            if isinstance(replies, dict):
                return set(replies)
    return set()
