"""The partition tooling itself: the fault proxy cuts, delays and blackholes; pause stops a process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.faults.link import Link, pause, resume
from tests.faults.support import fresh_redis

pytestmark = [pytest.mark.redis, pytest.mark.faults]


def _client(link: Link) -> redis.Redis:
    # No retries here: the test sees each fault as the first command meets it.
    return redis.Redis.from_url(link.url(), socket_timeout=1.0, socket_connect_timeout=1.0)


def test_the_proxy_forwards_cuts_delays_and_blackholes_the_link(tmp_path: Path) -> None:
    """Each fault shows on a real Redis client, and healing gives a working link back."""
    with fresh_redis(tmp_path) as server, Link(server.port) as link:
        client = _client(link)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert link.stats()["open"] == 1

        link.cut()
        with pytest.raises(redis.ConnectionError):
            client.get("k")  # its connection was closed, and a new one is refused
        assert link.stats()["open"] == 0
        link.heal()
        assert client.get("k") == b"v"

        link.delay(0.4)
        began = time.monotonic()
        assert client.get("k") == b"v"
        assert time.monotonic() - began >= 0.8  # held back 0.4 s each way
        link.heal()

        link.blackhole()
        with pytest.raises(redis.TimeoutError):
            client.get("k")  # accepted, never answered
        fresh = _client(link)
        with pytest.raises(redis.TimeoutError):
            fresh.ping()
        link.heal()
        assert fresh.get("k") == b"v"
        client.close()
        fresh.close()
        process = link.process
    assert process is not None and process.poll() is not None, "the proxy outlived its test"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_pause_stops_a_process_group_until_resumed() -> None:
    """SIGSTOP holds the whole process group (state T); SIGCONT lets it run again."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"],
        start_new_session=True,
    )
    try:
        pause(child.pid)
        deadline = time.monotonic() + 5
        while _state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(child.pid) == "T"
        resume(child.pid)
        while _state(child.pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        # Running again: any state but stopped (a child paused while it was still starting
        # may be in disk sleep, D, reading its modules).
        assert _state(child.pid) not in ("T", "t")
    finally:
        child.kill()
        child.wait(timeout=10)
