"""fleet's one Redis layer (fleet/redis/): ``Keys`` names every key, one loader runs every script."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
import redis.asyncio as aioredis

from fleet import AgentStepSpec, Workflow, WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.ledgers import RedisLedger
from fleet.limiters import ProviderLimit, RedisRateLimiter
from fleet.redis import scripts
from fleet.redis.keys import Keys
from fleet.redis_server import RedisServer
from fleet.retention import RedisRetention
from fleet.runs import RedisRunRegistry
from fleet.stores.redis import RedisCheckpointStore
from tests import pipeline_stages
from tests.celery_support import fleet_settings, running_workers

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent


def test_keys_names_the_layout_data_already_in_redis_uses() -> None:
    """Key names stay byte-identical to the layout older fleets wrote."""
    keys = Keys("p")
    assert keys.budget("team/x") == tuple(
        f"p:budget:{{team}}/x:{part}"
        for part in ("account", "held", "leases", "settled", "children")
    )
    assert keys.journal("r/review") == "p:journal:{r}/review"
    assert keys.events("r") == "p:events:{r}"
    assert keys.deltas("r") == "p:deltas:{r}"
    assert keys.deltas("") == "p:deltas:"
    assert keys.workflow("r") == "p:workflow:{r}"
    assert keys.asks("r") == "p:asks:{r}"
    assert keys.steps("r") == "p:steps:{r}"
    assert keys.cancel("r-1") == "p:cancel:r-1"
    assert keys.lease("fs-1") == "p:lease:fs-1"
    assert keys.result("fs-1", "n") == "p:result:fs-1:n"
    assert keys.reply("h") == "p:reply:h"
    assert keys.pipe("x") == "p:pipe:x"
    assert keys.limit("openai") == tuple(
        f"p:limit:openai:{part}" for part in ("calls", "cost", "meta", "flight")
    )
    assert keys.endpoint_width("http://h/v1").startswith("p:endpoint:")
    assert keys.pattern().fullmatch(keys.endpoint_width("http://h/v1"))
    assert not keys.pattern().fullmatch("p:unknown:x")
    assert not keys.pattern().fullmatch("q:events:{r}")


@pytest.mark.redis
@pytest.mark.celery
async def test_every_key_a_fleet_run_writes_is_named_by_keys(
    redis_url: str, tmp_path: Path
) -> None:
    """A full workflow run on a real fleet writes only keys that ``Keys`` names.

    The run journals, budgets, logs, records its run, streams deltas, runs a round, a
    pipeline on Celery chains and an ask, then is cancelled; a provider limit admits and
    learns a width. Every key under the run's unique prefix, seen during and after the
    run, must match :meth:`Keys.pattern`, and the namespaces each part writes must all be
    there (so the check cannot pass on an empty Redis).
    """
    settings = fleet_settings(redis_url)
    prefix = settings.key_prefix
    keys = Keys(prefix)
    root = f"layer-{uuid.uuid4().hex[:8]}"
    ledger = RedisLedger(redis_url, key_prefix=prefix)
    budget = WorkflowBudget(100_000, ledger=ledger, workflow_id=root)
    store = RedisCheckpointStore(redis_url, key_prefix=prefix)
    board = RedisRunRegistry(redis_url, key_prefix=prefix)
    retention = RedisRetention(redis_url, key_prefix=prefix, retention_s=600)
    limiter = RedisRateLimiter(redis_url, key_prefix=prefix)
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="slow_echo", description="d", prompt=f"p{i}")
        for i in range(4)
    ]
    seen: set[str] = set()
    with running_workers(settings, tmp_path, "w1", concurrency=2):
        async with CeleryExecutor(settings=settings, budget=budget) as executor:
            workflow = (
                Workflow.builder(executor)
                .with_root_id(root)
                .with_store(store)
                .with_budget(budget)
                .with_event_stream(redis_url, key_prefix=prefix)
                .with_cancel_board(board)
                .with_retention(retention)
                .build()
            )
            async with workflow:
                outcomes = await workflow.phase("review", specs)
                piped = await workflow.pipeline(["a b", "c d"], [pipeline_stages.streamed])
                answer = await workflow.ask("go", question="go?", timeout_s=0.2, default="no")
                seen |= _keys(redis_url, prefix)  # the phase journal lives until the end
                await board.request(root, "the test is done")
                seen |= _keys(redis_url, prefix)
    limit = ProviderLimit(name="layer", requests=5, tokens=1000)
    await limiter.try_admit(limit, "a1", 10, lease_s=5)
    await limiter.remember_width("http://127.0.0.1:1/v1", 4)
    for resource in (store, board, ledger, retention, limiter):
        await resource.close()
    seen |= _keys(redis_url, prefix)

    assert all(outcome.success for outcome in outcomes)
    assert all(result is not None and result.success for result in piped)
    assert answer == "no"
    pattern = keys.pattern()
    assert sorted(key for key in seen if not pattern.fullmatch(key)) == []
    namespaces = {key[len(prefix) + 1 :].partition(":")[0] for key in seen}
    written = {"budget", "journal", "events", "deltas", "workflow", "asks", "steps"}
    written |= {"cancel", "limit", "endpoint"}  # lease, result, reply, pipe: gone by now
    assert written <= namespaces
    assert keys.workflow(root) in seen
    assert set(keys.budget(root)[:1]) <= seen


def _keys(redis_url: str, prefix: str) -> set[str]:
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        return set(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


def test_no_lua_is_written_inside_python() -> None:
    """Every script is a ``.lua`` file: no Python module of fleet or the workers holds Lua."""
    inline = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("fleet", "workers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if "redis.call(" in line
    ]
    assert inline == []


@pytest.mark.redis
def test_every_lua_file_has_a_header_and_loads(redis_url: str) -> None:
    """Each file opens with its KEYS and ARGV; each script compiles and loads under its SHA1."""
    names = scripts.names()
    assert {"claim_step", "finish", "ledger_reserve", "limit_admit", "run_request"} <= set(names)
    client = redis_sync.Redis.from_url(redis_url)
    try:
        for name in names:
            head = scripts.header(name)
            assert head.startswith(f"-- {name}.lua: "), name
            assert re.search(r"^-- KEYS", head, re.MULTILINE), name
            assert re.search(r"^-- ARGV", head, re.MULTILINE), name
            if name.startswith("_"):  # a prelude: included by scripts, never run alone
                continue
            script = scripts.script(name)
            assert "--!include" not in script.text, name
            assert client.script_load(script.text) == script.sha, name
    finally:
        client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test alone (its scripts are flushed)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@pytest.mark.redis
def test_a_script_redis_forgot_is_loaded_and_runs_once(own_redis: str) -> None:
    """After ``SCRIPT FLUSH`` a script still runs exactly once: on a client and in a pipeline.

    ``ask_swap`` answers 1 only the first time it stores a record, so a script that ran
    twice (or not at all) shows in its answer.
    """
    swap = scripts.script("ask_swap")
    client = redis_sync.Redis.from_url(own_redis)
    try:
        client.script_flush()
        assert swap(client, ["k1"], ["a", "", "v"]) == 1
        client.script_flush()
        pipe = client.pipeline(transaction=False)
        pipe.set("before", "1")
        swap.queue(pipe, ["k2"], ["a", "", "v"])
        swap.queue(pipe, ["k2"], ["b", "", "v"])
        pipe.get("before")
        assert scripts.execute(pipe) == [True, 1, 1, b"1"]
        assert client.hgetall("k2") == {b"a": b"v", b"b": b"v"}
    finally:
        client.close()


@pytest.mark.redis
async def test_an_async_script_redis_forgot_is_loaded_and_runs_once(own_redis: str) -> None:
    """The asyncio twin: a client's call and a pipeline's after ``SCRIPT FLUSH``."""
    swap = scripts.script("ask_swap")
    client = aioredis.Redis.from_url(own_redis)
    try:
        await client.script_flush()
        assert await swap.run(client, ["k1"], ["a", "", "v"]) == 1
        assert await swap.run(client, ["k1"], ["a", "", "w"]) == 0
        await client.script_flush()
        async with client.pipeline(transaction=False) as pipe:
            swap.queue(pipe, ["k2"], ["a", "", "v"])
            pipe.execute_command("WAIT", 0, 10)
            assert await scripts.execute_async(pipe) == [1, 0]
        assert await client.hgetall("k2") == {b"a": b"v"}
    finally:
        await client.aclose()
