"""Real Celery worker processes for the fleet tests (started and stopped by PID).

``CeleryWorkers`` starts N ``celery -A workers.app worker --pool threads`` subprocesses
(``app="bench.celery_app"``: the benchmarks' app, with their raw Celery tasks)
against the session's Redis, with a queue and key prefix of their own, the tests'
agents file and the repo on PYTHONPATH; it waits until each answers a ping. ``kill``
SIGKILLs one worker (the fault tests); ``stop`` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.pools
import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.collections import eqhash

from fleet.celery import STEP_TASK, CeleryExecutor, configure_app
from fleet.config import FleetSettings
from fleet.processes import settings_env
from fleet.redis.scripts import script

REPO = Path(__file__).resolve().parent.parent
AGENTS_FILE = REPO / "tests" / "agents.toml"


def fleet_settings(redis_url: str, prefix: str | None = None, **overrides: Any) -> FleetSettings:
    """Settings for one test module's fleet: its own queue and key prefix, short timeouts."""
    prefix = prefix or f"fleet-test-{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": prefix,
        "queue": f"{prefix}.steps",
        "agents_file": AGENTS_FILE,
        "claim_timeout_s": 2.0,
        "step_lease_s": 1.0,
        "max_in_flight": 8,
        **overrides,
    }
    return FleetSettings(**values)


async def until(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """Wait until ``condition()`` holds; fail (naming ``what``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or 'it'}")
        await asyncio.sleep(0.02)


async def until_async(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 60.0, what: str = ""
) -> None:
    """Like :func:`until` for a condition that awaits (a read from Redis)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or 'it'}")
        await asyncio.sleep(0.02)


def close_shared_broker_pools(app: Celery) -> None:
    """Close kombu's process-wide connection and producer pools for ``app``'s broker.

    Celery sends control commands (the readiness ping) through them, and nothing closes
    them: without this every poll left its connections open for the life of the process.
    """
    key = eqhash(app.connection_for_write())
    for group in (kombu.pools.producers, kombu.pools.connections):
        pool = dict.pop(group, key, None)
        if pool is not None:
            pool.force_close_all()


def sockets_to(port: int) -> int:
    """How many TCP connections this process holds open to ``port`` on loopback.

    Read from the kernel (``/proc``): a connection a library dropped without closing still
    counts, until it is really closed.
    """
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
            count += 1
    return count


def step_task_headers(task_id: str, *, argsrepr: str, origin: str) -> dict[str, Any]:
    """Celery task-protocol-2 headers of one ``fleet.run_step`` message (for raw publishes)."""
    return {
        "lang": "py",
        "task": STEP_TASK,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": True,
    }


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    host: str
    """The node's host part: the machine's name and the fleet's key prefix (see ``node``)."""

    @property
    def node(self) -> str:
        """``name@host``, unique to this fleet.

        Another fleet's ``worker1`` on the same Redis (a module's workers still up) then
        never answers this one's readiness ping.
        """
        return f"{self.name}@{self.host}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class CeleryWorkers:
    """A set of worker subprocesses sharing one queue."""

    settings: FleetSettings
    directory: Path
    concurrency: int = 4
    env: Mapping[str, str] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)
    app: str = "workers.app"
    """What ``celery -A`` runs: the production worker, or the benchmarks' app."""

    @property
    def host(self) -> str:
        """Its workers' host part: the machine, then this fleet's own key prefix."""
        return f"{socket.gethostname()}.{self.settings.key_prefix}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(settings_env(self.settings))
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["FLEET_CONFIG"] = str(REPO / "config" / "fleet.toml")
        return env

    def start(self, *names: str, concurrency: int | None = None) -> list[Worker]:
        """Start the named workers (``worker1``...) and wait until they answer a ping."""
        started = []
        for name in names:
            log = self.directory / f"{name}.log"
            with open(log, "ab") as output:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        self.app,
                        "worker",
                        f"--hostname={name}@{self.host}",
                        "--pool=threads",
                        f"--concurrency={concurrency or self.concurrency}",
                        "--loglevel=INFO",
                        "--without-mingle",
                        "--without-gossip",
                    ],
                    cwd=REPO,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            worker = self.workers[name] = Worker(name, process, log, self.host)
            started.append(worker)
        self.wait_ready([w.node for w in started])
        return started

    def wait_ready(self, nodes: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(nodes)
        while waiting:
            for worker in self.workers.values():
                if worker.node in waiting and worker.process.poll() is not None:
                    raise RuntimeError(f"{worker.name} exited:\n{worker.log_text()[-3000:]}")
            app = configure_app(self.settings)
            try:
                replies = app.control.ping(destination=sorted(waiting), timeout=0.5)
            except (OSError, redis.RedisError, OperationalError) as error:
                # A readiness poll: a broker connection that dropped is asked again, on a
                # new connection, until the deadline.
                replies, failure = [], error
            else:
                failure = None
            finally:
                close_shared_broker_pools(app)
                app.close()
            for reply in replies:
                waiting -= set(reply)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers {sorted(waiting)} did not answer a ping"
                    + (f" (last error: {failure!r})" if failure else "")
                )

    def kill(self, name: str) -> None:
        """SIGKILL one worker (its whole process group: no warm shutdown, no acks)."""
        worker = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM every worker, then SIGKILL whatever is left after a few seconds."""
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(timeout=10)
        self.workers.clear()

    def executor(self, **options: Any) -> CeleryExecutor:
        """A host for these workers (same settings unless overridden)."""
        return CeleryExecutor(settings=self.settings, **options)


@contextlib.contextmanager
def running_workers(
    settings: FleetSettings,
    directory: Path,
    *names: str,
    concurrency: int = 4,
    env: Mapping[str, str] | None = None,
) -> Iterator[CeleryWorkers]:
    """Start ``names`` workers; stop them by PID on exit."""
    fleet = CeleryWorkers(settings, directory, concurrency, dict(env or {}))
    try:
        fleet.start(*names)
        yield fleet
    finally:
        fleet.stop()


_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(raw: bytes) -> bytes:
    """One argument of a MONITOR line (Redis's sdscatrepr quoting) back to its bytes."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\":
            code = raw[i + 1 : i + 2]
            if code == b"x":
                out += bytes([int(raw[i + 2 : i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES.get(code, code)
            i += 2
            continue
        out += raw[i : i + 1]
        i += 1
    return bytes(out)


@dataclass(frozen=True)
class Command:
    """One command Redis executed, as MONITOR saw it."""

    at: float
    """Redis's own clock (Unix seconds) when it ran the command."""
    client: str
    """``ip:port`` of the connection, or ``lua`` for a command run by a script."""
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return self.args[0].decode().upper()


class BrokerLog:
    """Every command Redis runs while open, seen from outside fleet (a MONITOR connection).

    The tests count with it what the host really sends (``LPUSH`` of step messages onto the
    queue) and when it looks at a step's lease, on Redis's own clock, without hooking any
    fleet code. Use as a context manager; read the results after it is closed: closing
    sends a marker command (``ECHO``) and reads until MONITOR shows it, so every command
    Redis ran before the close is in :attr:`commands`.
    """

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        self.commands: list[Command] = []
        self._thread: threading.Thread | None = None
        self._marker = f"broker-log-end-{uuid.uuid4().hex}".encode()
        self._ended = threading.Event()

    def __enter__(self) -> BrokerLog:
        self._monitor = self._client.monitor()
        self._monitor.__enter__()  # MONITOR is on when this returns
        self._thread = threading.Thread(target=self._read, name="broker-log", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        connection = self._monitor.connection
        while True:
            try:
                line = connection.read_response(disable_decoding=True)
            except (redis.ConnectionError, OSError, AttributeError, TypeError):
                return  # closed by __exit__
            stamp, _, rest = line.partition(b" ")
            client = rest[rest.index(b" ") + 1 : rest.index(b"]")].decode()
            args = tuple(_unescape(raw) for raw in _ARG.findall(rest[rest.index(b"]") + 1 :]))
            if args == (b"ECHO", self._marker):
                self._ended.set()
                return
            self.commands.append(Command(float(stamp), client, args))

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._client.echo(self._marker)  # MONITOR shows it after every earlier command
            if self._thread is not None:
                self._thread.join(timeout=30)
        finally:
            self._monitor.connection.disconnect()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._client.close()
        if not self._ended.is_set() and exc_info[0] is None:
            raise AssertionError("the Redis command log never reached its end marker")

    def sends(self, queue: str) -> dict[str, list[float]]:
        """Task id -> Redis time of every message pushed onto ``queue`` for it, in order."""
        found: dict[str, list[float]] = {}
        for command in self.commands:
            if command.name == "LPUSH" and command.args[1].decode() == queue:
                for raw in command.args[2:]:
                    task_id = json.loads(raw)["headers"]["id"]
                    found.setdefault(task_id, []).append(command.at)
        return found

    def admissions(self) -> set[bytes]:
        """The admission id of every call that asked the rate limiter for room so far.

        Safe to read while the log is open (a copy of what MONITOR has shown until now).
        """
        admit = script("limit_admit").sha.encode()
        commands = list(self.commands)
        return {c.args[8] for c in commands if c.name == "EVALSHA" and c.args[1] == admit}

    def lease_checks(self, key_prefix: str, task_id: str) -> list[float]:
        """Redis time of every ``EXISTS`` a client (the host) ran on this step's lease."""
        key = f"{key_prefix}:lease:{task_id}".encode()
        return [
            c.at
            for c in self.commands
            if c.client != "lua" and c.name == "EXISTS" and key in c.args[1:]
        ]


def broker_holds(settings: FleetSettings, task_ids: set[str]) -> set[str]:
    """Which of ``task_ids`` still have a message queued, or taken and not acknowledged.

    Kombu keeps a message a worker took (``acks_late``) in its ``unacked`` hash until the
    task returns, so an empty answer means every delivery of these tasks was handled.
    """
    client = redis.Redis.from_url(settings.redis_url)
    try:
        queued = [json.loads(raw) for raw in client.lrange(settings.queue, 0, -1)]
        taken = [json.loads(raw)[0] for raw in client.hvals("unacked")]
    finally:
        client.close()
    return {m["headers"]["id"] for m in queued + taken} & task_ids


def step_ids(log: BrokerLog, queue: str) -> dict[str, str]:
    """Step task id -> Celery task id, from the ``argsrepr`` of the messages sent."""
    found = {}
    for command in log.commands:
        if command.name == "LPUSH" and command.args[1].decode() == queue:
            headers = json.loads(command.args[2])["headers"]
            found[headers["argsrepr"].split()[1]] = headers["id"]
    return found


def lease_lapsed_at(log: BrokerLog, key: str, before: float) -> float:
    """When a lease lapsed (Redis time): its last ``SET ... PX`` or ``PEXPIRE`` plus the TTL."""
    last = 0.0
    for command in log.commands:
        if command.at >= before or command.client != "lua" or command.args[1:2] != (key.encode(),):
            continue
        if command.name == "PEXPIRE":
            last = command.at + int(command.args[2]) / 1000
        elif command.name == "SET" and b"PX" in command.args:
            last = command.at + int(command.args[command.args.index(b"PX") + 1]) / 1000
    assert last, f"no lease was ever taken on {key}"
    return last


def resend_bound_s(settings: FleetSettings) -> float:
    """docs/CELERY.md: a dead worker's step is re-sent within this long of the death.

    ``max(step_lease_s, claim_timeout_s) + check_interval``, with ``check_interval =
    clamp(min(claim_timeout_s, step_lease_s) / 4, 0.05 s, 1 s)``: computed here from the
    documentation, not read from the host, so a host that checks less often fails it.
    """
    lease, claim = settings.step_lease_s, settings.claim_timeout_s
    check_interval = min(max(min(lease, claim) / 4, 0.05), 1.0)
    return max(lease, claim) + check_interval


def check_resent_at_first_check_after_lapse(
    log: BrokerLog, settings: FleetSettings, tid: str, dead_at: float
) -> str:
    """The recovery bound of docs/CELERY.md, on Redis's clock, as a whole and part by part.

    ``max(step_lease_s, claim_timeout_s) + check_interval`` is: the dead worker's lease
    lapses at most ``step_lease_s`` after its last renewal (which precedes the death), and
    the host re-sends at its first check after that. Checked here: the re-send came within
    that bound of ``dead_at`` (taken once the killed worker was reaped, so after the real
    death), no renewal after the death, no re-send while the lease lived, and no second
    look at the lapsed lease before the re-send.
    """
    key = f"{settings.key_prefix}:lease:{tid}"
    # Copies sent before the death (a message not claimed within claim_timeout_s on a
    # busy machine) are not the recovery: the first send after the death is.
    resent = next((at for at in log.sends(settings.queue)[tid] if at > dead_at), None)
    assert resent is not None, "the host never sent the step again"
    lapsed = lease_lapsed_at(log, key, before=resent)
    assert lapsed <= dead_at + settings.step_lease_s, "the lease was renewed after the death"
    assert resent >= lapsed, f"re-sent {lapsed - resent:.3f} s before the lease lapsed"
    # Redis keeps expiry in ms while MONITOR stamps µs: a check within 5 ms either side of
    # the lapse may or may not have seen the key, so it counts as the host's look but not
    # as a second, wasted one.
    checks = log.lease_checks(settings.key_prefix, tid)
    looks = [at for at in checks if lapsed - 0.005 <= at <= resent]
    assert looks, "re-sent without the host looking at the lapsed lease"
    surely_gone = [at for at in looks if at >= lapsed + 0.005]
    assert len(surely_gone) <= 1, f"the host saw the lapsed lease {len(surely_gone)} times"
    bound = resend_bound_s(settings)
    assert resent - dead_at <= bound, (
        f"re-sent {resent - dead_at:.2f} s after the death; docs/CELERY.md promises {bound:g} s"
    )
    return (
        f"lease lapsed {lapsed - dead_at:.2f} s after the death, host noticed "
        f"{looks[0] - lapsed:.2f} s later, re-sent {resent - looks[0]:.3f} s after noticing"
    )
