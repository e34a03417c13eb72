"""A local Sentinel-managed Redis: 1 master, 1 replica and 3 sentinels on loopback.

``fleet up --ha`` runs one, and so do the failover tests. Both data nodes keep an AOF
(``appendfsync everysec``); the sentinels agree on a failover with a quorum of 2. Every
process is a child of the caller, bound to 127.0.0.1 on a free port and stopped by its PID,
never by name. :attr:`SentinelGroup.url` is the one ``FLEET_REDIS_URL`` every fleet part
takes (see :mod:`fleet.redis.sentinel`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from .errors import BrokerError
from .redis_server import RedisServer, find_redis_server, free_port, kill_process, stop_process

__all__ = ["DEFAULT_MASTER_NAME", "SentinelGroup", "SentinelProcess"]

DEFAULT_MASTER_NAME = "fleet"
"""The name the sentinels monitor the master under (``?master_name=fleet``)."""


class SentinelProcess:
    """One ``redis-server --sentinel`` child process on ``127.0.0.1:port``."""

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        """The sentinel's config file (it rewrites it as it learns the topology)."""
        return self.directory / "sentinel.conf"

    def start(self, monitor: str) -> SentinelProcess:
        """Start monitoring (``monitor`` holds the ``sentinel ...`` config lines)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.directory}\n"
            f"logfile {self.directory / 'sentinel.log'}\nloglevel notice\n{monitor}"
        )
        self.process = subprocess.Popen(
            [find_redis_server(), str(self.config_file), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only the owner, which stops us by PID
        )
        return self

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, by PID."""
        process, self.process = self.process, None
        stop_process(process, timeout_s)

    def kill(self) -> None:
        """SIGKILL (fault tests)."""
        process, self.process = self.process, None
        kill_process(process)


class SentinelGroup:
    """1 master + 1 replica (AOF on both) + 3 sentinels, on loopback free ports.

    Args:
        directory: each node's data, config and log go in a subdirectory here.
        password: ``requirepass`` (and ``masterauth``) of both data nodes, if any.
        master_name: the name the sentinels monitor the master under.
        down_after_ms: how long the master must be silent before a sentinel calls it down
            (Sentinel's ``down-after-milliseconds``; Redis's own default is 30 s).
        failover_timeout_ms: Sentinel's ``failover-timeout``.
        sentinels: how many sentinels (quorum: a majority of them).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        password: str | None = None,
        master_name: str = DEFAULT_MASTER_NAME,
        down_after_ms: int = 5000,
        failover_timeout_ms: int = 10000,
        sentinels: int = 3,
    ) -> None:
        self.directory = Path(directory)
        self.password = password
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        auth = ["--masterauth", password] if password else []
        self.nodes = [
            RedisServer(self.directory / name, password=password, appendonly=True, extra_args=auth)
            for name in ("node1", "node2")
        ]
        self.sentinels = [
            SentinelProcess(self.directory / f"sentinel{i}") for i in range(1, sentinels + 1)
        ]

    @property
    def quorum(self) -> int:
        """Sentinels that must agree the master is down."""
        return len(self.sentinels) // 2 + 1

    @property
    def url(self) -> str:
        """The sentinel URL of this group (password included; mask it before printing)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        parts = [f"sentinel://{auth}127.0.0.1:{s.port}" for s in self.sentinels]
        return ";".join(parts) + f"/0?master_name={self.master_name}"

    def processes(self) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
        """``(name, process, log)`` of every process running now."""
        for index, node in enumerate(self.nodes, 1):
            if node.process is not None:
                yield f"redis-node{index}", node.process, node.directory / "redis.log"
        for index, sentinel in enumerate(self.sentinels, 1):
            if sentinel.process is not None:
                yield f"sentinel{index}", sentinel.process, sentinel.directory / "sentinel.log"

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> SentinelGroup:
        """Start both data nodes (node2 replicating node1) and the sentinels.

        Returns once the replica is in sync and every sentinel sees the master, the
        replica and the other sentinels.

        Raises:
            BrokerError: a process did not come up in time (everything started is stopped).
        """
        try:
            master, replica = self.nodes
            master.start()
            replica.extra_args += ["--replicaof", "127.0.0.1", str(master.port)]
            replica.start()
            monitor = (
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            if self.password:
                monitor += f"sentinel auth-pass {self.master_name} {self.password}\n"
            for sentinel in self.sentinels:
                sentinel.start(monitor)
            self._wait_until_formed(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_formed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        others = len(self.sentinels) - 1
        while True:
            state = [self._sentinel_view(s) for s in self.sentinels]
            if (
                all(
                    view is not None and view["slaves"] >= 1 and view["sentinels"] >= others
                    for view in state
                )
                and self._replica_in_sync()
            ):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the sentinel group in {self.directory} did not form within "
                    f"{timeout_s} s (views: {state})"
                )
            time.sleep(0.1)

    def _replica_in_sync(self) -> bool:
        info = self._info(self.nodes[1], "replication")
        return info.get("master_link_status") == "up"

    def master_address(self) -> tuple[str, int] | None:
        """The master's address as the first answering sentinel names it."""
        import redis

        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=1.0) as client:
                    reply = client.sentinel_get_master_addr_by_name(self.master_name)
            except (redis.RedisError, OSError):
                continue
            if reply:
                return str(reply[0]), int(reply[1])
        return None

    def master(self) -> RedisServer:
        """The data node the sentinels name master now."""
        address = self.master_address()
        for node in self.nodes:
            if address is not None and node.port == address[1]:
                return node
        raise BrokerError(f"no sentinel names a master of this group (says {address})")

    def wait_for_new_master(self, old_port: int, timeout_s: float = 60.0) -> RedisServer:
        """Wait until every live sentinel names a new master (not ``old_port``); return it.

        The node returned reports itself master (it accepts writes).

        Raises:
            BrokerError: no failover within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            views = [self._sentinel_view(s) for s in self.sentinels if s.alive()]
            ports = {view["port"] for view in views if view is not None}
            if len(ports) == 1 and old_port not in ports and None not in views:
                node = next(n for n in self.nodes if n.port in ports)
                if self._info(node, "replication").get("role") == "master":
                    return node
            time.sleep(0.05)
        raise BrokerError(f"the sentinels did not promote a new master within {timeout_s} s")

    def wait_for_replica(self, node: RedisServer, timeout_s: float = 60.0) -> None:
        """Wait until ``node`` (restarted after a kill) replicates the new master in sync."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self._info(node, "replication")
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                return
            time.sleep(0.1)
        raise BrokerError(f"node on port {node.port} did not rejoin as a replica in {timeout_s} s")

    def _sentinel_view(self, sentinel: SentinelProcess) -> dict[str, int] | None:
        import redis

        try:
            with redis.Redis(port=sentinel.port, socket_timeout=1.0) as client:
                masters = client.sentinel_masters()
        except (redis.RedisError, OSError):
            return None
        state = masters.get(self.master_name)
        if not state or not state.get("is_master") or state.get("is_odown"):
            return None
        return {
            "port": int(state["port"]),
            "slaves": int(state.get("num-slaves", 0)),
            "sentinels": int(state.get("num-other-sentinels", 0)),
        }

    def _info(self, node: RedisServer, section: str) -> dict[str, object]:
        import redis

        try:
            no_retry: Any = None  # redis-py's own spelling for "do not retry"
            with redis.Redis(
                port=node.port, password=self.password, socket_timeout=1.0, retry=no_retry
            ) as client:
                return dict(client.info(section))
        except (redis.RedisError, OSError):
            return {}

    def stop(self) -> None:
        """Stop the sentinels, then both data nodes, by PID (safe to call twice)."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
