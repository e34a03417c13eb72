"""The partition workload's moving parts: its shape, the nemesis, and the lease watcher.

:class:`Nemesis` injects the faults of a trial in turn (cut, pause, delay, Redis restart,
blackhole), each aimed at a worker that runs a step; :class:`LeaseWatch` reads every step
lease in Redis every 10 ms and remembers when each attempt's lease lapses and who held
each step's lease, in order. The workload and its checker: :mod:`tests.faults.partition`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from fleet.redis_server import RedisServer
from tests.celery_support import CeleryWorkers
from tests.faults.link import Link, pause, resume


@dataclass(frozen=True)
class Shape:
    """How big a trial is."""

    duration_s: float = 35.0
    """How long the nemesis runs (rounds keep starting until it stops)."""
    steps: int = 24
    """Steps per round."""
    calls: int = 6
    """Model calls per step (a step lasts longer than its lease)."""
    call_s: float = 0.35
    """How long one model call takes."""
    lease_s: float = 1.5
    """``step_lease_s`` of host and workers."""
    concurrency: int = 4
    """Threads per worker."""
    hold_s: float = 3.0
    """How long a fault lasts (twice the lease)."""
    gap_s: float = 1.0
    """Quiet time between two faults."""


@dataclass
class Fault:
    """One fault the nemesis injected."""

    kind: str
    began: float
    ended: float = 0.0


class LeaseWatch:
    """Reads every step lease under ``prefix`` every few ms; remembers when each token lapses.

    A lease's lapse time is the latest ``time.time()`` at which Redis would have expired it,
    as seen by a read: the moment after the read plus its ``PTTL``. Keeps reading through
    a Redis restart.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._pattern = f"{prefix}:lease:*"
        self.lapses: dict[str, float] = {}
        """Attempt token -> when its lease lapses (or lapsed), ``time.time()``."""
        self.owners: dict[str, list[str]] = {}
        """Lease key -> every token seen holding it, in order."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-watch", daemon=True)

    def __enter__(self) -> LeaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = redis.Redis.from_url(self._url, socket_timeout=1.0, socket_connect_timeout=1.0)
        while not self._stop.wait(0.01):
            try:
                self._read(client)
            except redis.RedisError:
                self._stop.wait(0.05)  # Redis is restarting
        client.close()

    def _read(self, client: redis.Redis) -> None:
        keys = client.keys(self._pattern)
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        after = time.time()
        for key, token, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if token is None or ttl < 0:
                continue
            name = token.decode()
            self.lapses[name] = max(self.lapses.get(name, 0.0), after + ttl / 1000)
            owners = self.owners.setdefault(key.decode(), [])
            if not owners or owners[-1] != name:
                owners.append(name)


class Nemesis:
    """Injects the faults in turn until its time is up; heals everything when it stops.

    A fault aimed at a worker waits (up to a few seconds) until that worker runs a step,
    so it meets work in flight: a pause or a cut, any step; a delay, a step in its last
    model call, so that its outcome is sent before its lease would lapse and reaches Redis
    after (the write fencing must refuse).
    """

    def __init__(
        self, shape: Shape, link: Link, paused: CeleryWorkers, server: RedisServer, counters: Path
    ) -> None:
        self.shape = shape
        self.link = link
        self.paused = paused
        self.server = server
        self.folder = counters / "attempts"
        self.faults: list[Fault] = []
        self._closed: set[str] = set()

    def _running(self, worker: str, last_call: bool) -> bool:
        """Whether ``worker`` runs a step now (in its last model call, if ``last_call``)."""
        wanted = f"call {self.shape.calls - 1} " if last_call else "call "
        for path in self.folder.iterdir() if self.folder.is_dir() else []:
            if path.name in self._closed:
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines and lines[-1].split()[0] in ("end", "stopped", "refused"):
                self._closed.add(path.name)
            elif lines and lines[0].split()[1] == worker and lines[-1].startswith(wanted):
                return True
        return False

    def _aim(self, worker: str, *, last_call: bool = False) -> None:
        deadline = time.monotonic() + 2 * self.shape.calls * self.shape.call_s
        while not self._running(worker, last_call) and time.monotonic() < deadline:
            time.sleep(0.02)

    async def run(self) -> None:
        kinds = ["cut", "pause", "delay", "restart", "blackhole"]
        deadline = time.monotonic() + self.shape.duration_s
        n = 0
        while time.monotonic() + self.shape.hold_s < deadline:
            await asyncio.sleep(self.shape.gap_s)
            fault = Fault(kinds[n % len(kinds)], time.time())
            self.faults.append(fault)
            try:
                await asyncio.to_thread(self._inject, fault.kind)
            finally:
                fault.ended = time.time()
            n += 1

    def _inject(self, kind: str) -> None:
        hold, link = self.shape.hold_s, self.link
        if kind == "restart":
            self.server.stop()  # SIGTERM: Redis writes its AOF out first
            time.sleep(0.3)
            self.server.start()
            return
        if kind == "pause":
            pid = self.paused.workers["worker2"].process.pid
            self._aim("worker2")
            pause(pid)
            try:
                time.sleep(hold)
            finally:
                resume(pid)
            return
        self._aim("worker1", last_call=kind == "delay")
        if kind == "cut":
            link.cut()
        elif kind == "delay":
            link.delay(2 * self.shape.lease_s)
        elif kind == "blackhole":
            link.blackhole()
        try:
            time.sleep(hold)
        finally:
            link.heal()
