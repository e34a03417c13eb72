"""Sentinel URLs: parsed, masked, checked at start, and accepted by every fleet part.

A real Sentinel group (``redis-server`` master + replica, three ``redis-server --sentinel``)
on loopback free ports, started once for the module and stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fleet import AgentStepSpec, StepOutcome, TokenUsage, WorkflowBudget, WorkflowStepRecord
from fleet.celery import configure_app
from fleet.config import FleetSettings, load_settings, mask_url
from fleet.errors import BrokerError, ConfigError
from fleet.ledgers import RedisLedger
from fleet.redis.clients import async_client, sync_client
from fleet.redis.sentinel import check_redis, parse_sentinel_url
from fleet.redis_ha import SentinelGroup
from fleet.redis_server import free_port
from fleet.stores import RedisCheckpointStore
from tests.celery_support import sockets_to
from tests.test_cli_ops import alive, clean_env, read_lines
from tests.test_compose import ENV, interpolate

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
FLEET = [sys.executable, "-m", "fleet"]
PASSWORD = "sentinel-s3cret"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One master, one replica, three sentinels (password on the data nodes)."""
    with SentinelGroup(tmp_path_factory.mktemp("ha"), password=PASSWORD) as started:
        yield started


def dead_first(group: SentinelGroup) -> str:
    """The group's URL with a sentinel nobody listens on written first (celery#5538)."""
    return f"sentinel://127.0.0.1:{free_port()};" + group.url


def test_every_password_in_a_sentinel_url_is_masked() -> None:
    """Each ';' part and sentinel_password= are masked; the rest stays readable."""
    url = "sentinel://:pw1@h1:26379;sentinel://u:pw1@h2:26380/2?master_name=m&sentinel_password=pw2"
    shown = mask_url(url)
    assert "pw1" not in shown and "pw2" not in shown
    assert shown == (
        "sentinel://:***@h1:26379;sentinel://u:***@h2:26380/2?master_name=m&sentinel_password=***"
    )
    target = parse_sentinel_url(url)
    assert target.sentinels == (("h1", 26379), ("h2", 26380))
    assert (target.master_name, target.db, target.password) == ("m", 2, "pw1")
    assert "pw1" not in repr(FleetSettings(redis_url=url).masked_redis_url())


def test_celery_is_told_the_master_name_and_every_part_carries_db_and_password(
    group: SentinelGroup,
) -> None:
    """Broker and result backend get sentinel URLs with db and password on every part."""
    settings = FleetSettings(redis_url=dead_first(group))
    app = configure_app(settings)
    assert app.conf.broker_transport_options["master_name"] == "fleet"
    assert app.conf.broker_transport_options["visibility_timeout"] == 900
    assert app.conf.result_backend_transport_options["master_name"] == "fleet"
    for url in (app.conf.broker_url, app.conf.result_backend):
        parts = url.split(";")
        assert len(parts) == 4
        assert all(p.startswith(f"sentinel://:{PASSWORD}@") and p.endswith("/0") for p in parts)
    # Celery's own masking of what it prints (banner, Flower) hides the password too.
    assert PASSWORD not in app.backend.as_uri()


def one_line_failure(url: str) -> str:
    """Start `fleet worker` with ``url``: it must exit 2 with one line on stderr."""
    env = clean_env(FLEET_REDIS_URL=url)
    done = subprocess.run(
        [*FLEET, "worker"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_url_without_master_name_fails_at_start_with_one_line() -> None:
    """No ?master_name=: one line naming the option and the fix; nothing starts."""
    line = one_line_failure(f"sentinel://:{PASSWORD}@127.0.0.1:26379;sentinel://127.0.0.1:2/0")
    assert "names no master" in line and "?master_name=NAME" in line
    assert PASSWORD not in line and "***" in line
    with pytest.raises(ConfigError, match="master_name"):
        load_settings(redis_url="sentinel://127.0.0.1:26379/0")


def test_no_sentinel_reachable_fails_at_start_with_one_line() -> None:
    """Every sentinel down: one line naming the addresses tried and the fix."""
    ports = [free_port(), free_port()]
    url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{p}" for p in ports) + "/0?master_name=x"
    line = one_line_failure(url)
    assert "no sentinel reachable" in line and all(str(p) in line for p in ports)
    assert PASSWORD not in line


async def test_a_client_keeps_no_connection_to_the_sentinels_between_lookups(
    group: SentinelGroup,
) -> None:
    """The sentinels are asked on each connect, then let go: only the master stays connected.

    A lookup made after its client was closed (a retry overtaken by the close, during a
    failover) otherwise left a connection to a sentinel that nothing closed.
    """
    client = async_client(group.url, max_connections=4)
    try:
        await asyncio.gather(*(client.ping() for _ in range(4)))
        master = group.master().port
        assert sockets_to(master) > 0
        assert {s.port: sockets_to(s.port) for s in group.sentinels} == {
            s.port: 0 for s in group.sentinels
        }
    finally:
        await client.aclose()
    assert sockets_to(master) == 0


def test_a_wrong_password_fails_at_start_with_one_line(group: SentinelGroup) -> None:
    """The master refuses the password: one line saying so, the password never shown."""
    wrong = group.url.replace(PASSWORD, "not-the-password")
    line = one_line_failure(wrong)
    assert "refused the password" in line and "not-the-password" not in line
    with pytest.raises(BrokerError, match="know no master named 'other'"):
        check_redis(group.url.replace("master_name=fleet", "master_name=other"))


async def test_every_part_works_through_a_sentinel_url_with_the_first_sentinel_down(
    group: SentinelGroup, key_prefix: str
) -> None:
    """Clients, journal and ledger all reach the master though the first sentinel is dead."""
    url = dead_first(group)
    check_redis(url)
    with sync_client(url) as client:
        client.set(f"{key_prefix}:sync", "1")
    aclient = async_client(url, max_connections=4)
    try:
        assert await aclient.get(f"{key_prefix}:sync") == b"1"
    finally:
        await aclient.aclose()
    store = RedisCheckpointStore(url, key_prefix=key_prefix)
    spec = AgentStepSpec(task_id="a", agent="echo", description="d", prompt="p")
    outcome = StepOutcome(
        task_id="a", session_id="s", agent="echo", output="o", success=True,
        usage=TokenUsage(prompt_tokens=1, completion_tokens=2),
    )  # fmt: skip
    await store.record_step("wf", WorkflowStepRecord.for_outcome("wf", spec, outcome))
    loaded = await store.load("wf")
    assert loaded is not None and [r.task_id for r in loaded.steps] == ["a"]
    await store.close()
    ledger = RedisLedger(url, key_prefix=key_prefix)
    assert ledger.replicated
    budget = WorkflowBudget(100, ledger=ledger, workflow_id="wf")
    held = await budget.reserve(60, holder="h")
    await held.settle(40)
    snap = await budget.snapshot()
    assert (snap.consumed_tokens, snap.reserved_tokens) == (40, 0)
    assert ledger.unreplicated_writes == 0, "a replica is connected: every write was acked"
    await ledger.close()
    # The writes reached the replica as well (WAIT 1 after each ledger write).
    replica = next(node for node in group.nodes if node is not group.master())
    with sync_client(replica.url) as client:
        assert client.hget(f"{key_prefix}:budget:{{wf}}:account", "consumed") == b"40"


async def _two_ended_runs(url: str, key_prefix: str) -> int:
    """Runs ``kept`` and ``pruned`` registered, budgeted and ended; ``kept`` given its expiry."""
    from fleet.retention import RedisRetention
    from fleet.runs import RedisRunRegistry

    board = RedisRunRegistry(url, key_prefix=key_prefix)
    ledger = RedisLedger(url, key_prefix=key_prefix)
    retention = RedisRetention(url, key_prefix=key_prefix, retention_s=3600)
    try:
        for root in ("kept", "pruned"):
            await board.begin(root, f"r-{root}")
            held = await WorkflowBudget(100, ledger=ledger, workflow_id=root).reserve(5, holder="h")
            await held.settle(5)
            await board.end(root, f"r-{root}", "finished")
        return await retention.expire("kept", run_id="r-kept")
    finally:
        await retention.aclose()
        await ledger.close()
        await board.close()


def test_retention_and_gc_work_through_a_sentinel_url(
    group: SentinelGroup, key_prefix: str
) -> None:
    """An ended run's expiry is set, and `fleet gc` prunes ended runs, through a sentinel URL."""
    url = dead_first(group)
    assert asyncio.run(_two_ended_runs(url, key_prefix)) > 0
    with sync_client(url) as client:
        assert 0 < client.ttl(f"{key_prefix}:budget:{{kept}}:account") <= 3600
        assert client.ttl(f"{key_prefix}:budget:{{pruned}}:account") == -1
        ended = float(client.hget(f"{key_prefix}:workflow:{{pruned}}", "ended") or 0)
        while time.time() <= ended + 1:  # its retention of 1 s has not passed yet
            time.sleep(0.05)
        env = clean_env(FLEET_RETENTION_S="1")
        command = [*FLEET, "gc", "--redis-url", url, "--key-prefix", key_prefix]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "removed pruned" in done.stdout and "removed kept" in done.stdout
        assert not client.exists(f"{key_prefix}:budget:{{pruned}}:account")


def test_compose_ha_file_names_a_sentinel_group_every_service_can_use() -> None:
    """docker-compose.ha.yml: 2 data nodes, 3 sentinels, and a FLEET_REDIS_URL that loads."""
    compose = interpolate(yaml.safe_load((ROOT / "docker-compose.ha.yml").read_text()), ENV)
    services = compose["services"]
    assert {"redis-master", "redis-replica", "sentinel1", "sentinel2", "sentinel3"} <= set(services)
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis-master 6379" in replica
    monitor = " ".join(services["sentinel1"]["command"])
    assert "sentinel monitor fleet redis-master 6379 2" in monitor
    for name in ("worker", "flower"):
        env = services[name]["environment"]
        settings = FleetSettings(redis_url=env["FLEET_REDIS_URL"], store=env["FLEET_STORE"])
        target = parse_sentinel_url(settings.redis_url)
        assert target.master_name == "fleet" and target.password == ENV["REDIS_PASSWORD"]
        assert [host for host, _ in target.sentinels] == ["sentinel1", "sentinel2", "sentinel3"]
        assert {h: s for h, s in services.items() if h.startswith("sentinel")}.keys() >= {
            host for host, _ in target.sentinels
        }


@pytest.mark.celery
@pytest.mark.slow
def test_fleet_up_ha_starts_a_sentinel_group_and_ctrl_c_stops_every_child(
    tmp_path: Path, key_prefix: str
) -> None:
    """`fleet up --ha` prints a sentinel URL that works; on SIGINT every PID is gone."""
    pidfile = tmp_path / "fleet.pids"
    env = clean_env(FLEET_KEY_PREFIX=key_prefix)
    up = subprocess.Popen(
        [*FLEET, "up", "--ha", "--workers", "1", "--concurrency", "1", "--no-flower"]
        + ["--no-dashboard", "--pidfile", str(pidfile)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(up.stdout, lines), daemon=True).start()
    output: list[str] = []
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 90
        while not output or "fleet is up" not in output[-1]:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, "fleet up --ha exited before it was ready:\n" + "".join(output)
            output.append(line)
        record = json.loads(pidfile.read_text())
        pids = {entry["name"]: entry["pid"] for entry in record["processes"]}
        names = {"redis-node1", "redis-node2", "sentinel1", "sentinel2", "sentinel3"}
        assert names <= set(pids), pids
        (export,) = [line for line in output if "export FLEET_REDIS_URL=" in line]
        # The line pasted into a shell sets the whole URL (a bare ';' would end it).
        pasted = export.strip() + '\nprintf %s "$FLEET_REDIS_URL"\n'
        url = subprocess.run(["bash", "-c", pasted], capture_output=True, text=True).stdout
        assert url == record["redis_url"] and url.startswith("sentinel://"), "".join(output)
        assert shlex.split(export) == ["export", f"FLEET_REDIS_URL={url}"]
        target = parse_sentinel_url(url)
        assert len(target.sentinels) == 3 and target.master_name == "fleet"
        check_redis(url)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
        for pid in pids.values():  # a failed test leaves nothing behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    while (line := lines.get(timeout=10)) != "":
        output.append(line)
    assert up.stdout is not None
    up.stdout.close()
    assert [name for name, pid in pids.items() if alive(pid)] == []
