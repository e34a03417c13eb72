"""The faults a partition test injects: a worker's link to Redis, and the worker itself.

:class:`Link` runs ``tests/faults/proxy.py`` as a child process (loopback only, stopped by
its PID) in front of one Redis; a worker whose ``FLEET_REDIS_URL`` is :attr:`Link.url`
reaches Redis only through it (broker, results, leases, budget, journal), so the test can
cut, delay or blackhole that one worker's link while the others keep theirs.
:func:`pause` and :func:`resume` stop and continue a worker's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]


class Link:
    """A fault proxy between some clients and the Redis at ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self._control: socket.socket | None = None
        self._answers: TextIO | None = None

    def start(self) -> Link:
        """Start the proxy and connect to its control port."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.proxy", f"--target=127.0.0.1:{self.target_port}"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        ports = dict(part.split("=") for part in first.split())
        self.port = int(ports["listen"])
        self._control = socket.create_connection(("127.0.0.1", int(ports["control"])), timeout=10)
        self._answers = self._control.makefile("r", encoding="utf-8")
        return self

    def url(self, db: int = 0) -> str:
        """The Redis URL a client uses to go through this link."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def send(self, command: str) -> str:
        """Send one control command; returns the proxy's answer (``ok ...``)."""
        assert self._control is not None and self._answers is not None
        self._control.sendall((command + "\n").encode())
        answer = self._answers.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"fault proxy refused {command!r}: {answer}")
        return str(answer)

    def cut(self) -> None:
        """Close every connection through the link and refuse new ones."""
        self.send("cut")

    def heal(self) -> None:
        """Forward again (connections a blackhole broke are closed)."""
        self.send("heal")

    def delay(self, seconds: float) -> None:
        """Hold every chunk back ``seconds`` in each direction."""
        self.send(f"delay {seconds}")

    def blackhole(self) -> None:
        """Keep connections open but drop every byte."""
        self.send("blackhole")

    def stats(self) -> dict[str, int]:
        """Open connections, connections accepted, bytes forwarded."""
        words = self.send("stats").split()[1:]
        return {key: int(value) for key, value in (word.split("=") for word in words)}

    def stop(self) -> None:
        """Stop the proxy process (by PID)."""
        if self._control is not None:
            with contextlib.suppress(OSError):
                if self._answers is not None:
                    self._answers.close()
                self._control.close()
            self._control = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def pause(pid: int) -> None:
    """SIGSTOP a worker's process group (it keeps its sockets, but runs nothing)."""
    os.killpg(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    """SIGCONT a worker's process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)
