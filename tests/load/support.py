"""Load-suite helpers: count each host process's Redis connections from ``CLIENT LIST``.

Every Celery host names its connections ``fleet-host-{pid}``
(:data:`fleet.celery.dispatch.HOST_CONNECTIONS` at most per event loop), so the peak per
host process is read straight from the server while the load runs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import redis

HOST_NAME_PREFIX = "fleet-host-"


def host_connections(client: redis.Redis) -> Counter[str]:
    """Connections per host client name (``fleet-host-{pid}``) right now."""
    counts: Counter[str] = Counter()
    for entry in client.client_list():
        name = entry.get("name", "")
        if name.startswith(HOST_NAME_PREFIX):
            counts[name] += 1
    return counts


class PeakConnections:
    """The most connections each host process held at once while sampling ran."""

    def __init__(self) -> None:
        self.peak: Counter[str] = Counter()
        self.samples = 0

    def add(self, counts: Counter[str]) -> None:
        self.samples += 1
        for name, count in counts.items():
            self.peak[name] = max(self.peak[name], count)


@contextmanager
def sampling(redis_url: str, interval_s: float = 0.05) -> Iterator[PeakConnections]:
    """Sample ``CLIENT LIST`` from a thread every ``interval_s`` until the block ends."""
    peaks = PeakConnections()
    stop = threading.Event()
    client = redis.Redis.from_url(redis_url)

    def run() -> None:
        while not stop.is_set():
            peaks.add(host_connections(client))
            stop.wait(interval_s)

    thread = threading.Thread(target=run, name="client-list-sampler", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join(timeout=10)
        peaks.add(host_connections(client))
        client.close()
