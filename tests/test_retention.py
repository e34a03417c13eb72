"""Retention and ``fleet gc`` on a real Redis with a real Celery worker.

Workflows run as ``fleet run`` wires them (:func:`fleet.runner.open_run`: Redis journal,
Redis ledger, Redis event stream, Redis cancel board) with a retention of a few seconds.
Every wait is for a condition, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from fleet import (
    AgentStepSpec,
    Workflow,
    WorkflowBudget,
    execute_pipeline,
    execute_steps_parallel,
)
from fleet.accounts import set_account
from fleet.agents import AgentRegistry
from fleet.celery import CeleryExecutor
from fleet.config import FleetSettings
from fleet.gc import collect
from fleet.ledgers import RedisLedger
from fleet.redis.keys import REPLY_TTL_S, tagged
from fleet.runner import open_run, plan_run
from fleet.runs import RedisRunRegistry
from fleet.stores import RedisCheckpointStore
from tests import pipeline_stages
from tests.celery_support import REPO, BrokerLog, CeleryWorkers, fleet_settings, running_workers
from tests.celery_support import until as wait_until
from workers.runtime import WorkerRuntime

RETENTION_S = 2


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, counter_dir: Path
) -> Iterator[CeleryWorkers]:
    """One worker whose fleet keeps ended workflows :data:`RETENTION_S` seconds."""
    # A long claim timeout: no re-sent copy answers on a reply list after its round is over.
    settings = fleet_settings(redis_url, retention_s=RETENTION_S, claim_timeout_s=30.0)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    directory = tmp_path_factory.mktemp("workers")
    with running_workers(settings, directory, "worker1", concurrency=4, env=env) as fleet:
        yield fleet


def run_config(settings: FleetSettings, directory: Path) -> FleetSettings:
    """Settings of a ``fleet run --executor celery`` whose journal is the fleet's Redis."""
    values = settings.model_dump()
    values.update(store=settings.redis_url, run_index=directory / "runs.db")
    return FleetSettings(**values)


def spend(count: int, name: str, tokens: int = 10) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{name}{i}", agent="spend", description="", prompt=str(tokens), max_tokens=50
        )
        for i in range(count)
    ]


def keys_under(client: redis.Redis, prefix: str) -> set[str]:
    return {key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=500)}


def keys_of(client: redis.Redis, prefix: str, root: str) -> set[str]:
    """The keys of workflow ``root`` (every namespace tags them with ``{root}``)."""
    return {key for key in keys_under(client, prefix) if f":{tagged(root)}" in key}


async def until(condition: object, timeout_s: float, what: str) -> None:
    await wait_until(condition, timeout_s, what)  # type: ignore[arg-type]


async def test_finished_workflows_leave_no_key_once_their_retention_passes(
    workers: CeleryWorkers, tmp_path: Path
) -> None:
    """Ten finished workflows: every key gets the retention at the end, then none is left."""
    config = run_config(workers.settings, tmp_path)
    prefix = config.key_prefix
    client = redis.Redis.from_url(config.redis_url)
    try:
        for n in range(10):
            places = plan_run(config, executor="celery")
            async with open_run(
                config, places, root_id=f"done-{n}", executor="celery", budget_tokens=10_000
            ) as builder:
                async with builder.build() as workflow:
                    drafts = await workflow.phase("draft", spend(3, "d"))
                    extra = await workflow.parallel(spend(2, "p"))
            assert all(o.success for o in drafts + extra)
        left = keys_under(client, prefix)
        kinds = {key.split(":")[1] for key in left}
        assert {"events", "budget", "workflow"} <= kinds, left
        ttls = {key: client.pttl(key) for key in left}  # ms: -1 no expiry, -2 already gone
        kept = {key: ttl for key, ttl in ttls.items() if ttl != -2}
        assert kept and all(0 <= ttl <= RETENTION_S * 1000 for ttl in kept.values()), ttls
        await until(lambda: not keys_under(client, prefix), 60, "every key to expire")
        report = collect(client, key_prefix=prefix, retention_s=RETENTION_S)
        assert (report.workflows, report.keys) == ([], 0)
    finally:
        client.close()


async def test_a_read_result_goes_and_a_late_duplicate_is_still_refused(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """Results go once the host read them; a duplicate sent after that does not run again."""
    settings = workers.settings
    specs = [
        AgentStepSpec(task_id=f"late-{i}", agent="count_and_echo", description="", prompt="x")
        for i in range(3)
    ]
    client = redis.Redis.from_url(settings.redis_url)
    executor = workers.executor()
    try:
        with BrokerLog(settings.redis_url) as log:
            outcomes = await execute_steps_parallel(executor, specs)
            results = {k for k in keys_under(client, settings.key_prefix) if ":result:" in k}
            ttls = [ttl for ttl in map(client.pttl, results) if ttl != -2]  # -2: already gone
        assert all(o.success for o in outcomes)
        assert ttls and all(0 <= ttl <= RETENTION_S * 1000 for ttl in ttls), ttls
        await until(
            lambda: not any(":result:" in k for k in keys_under(client, settings.key_prefix)),
            30,
            "the read results to go",
        )
        queue = settings.queue.encode()
        sent = [
            raw
            for c in log.commands
            if c.name == "LPUSH" and c.args[1] == queue
            for raw in c.args[2:]
        ]
        assert len(sent) == 3
        worker = workers.workers["worker1"]
        before = worker.log_text().count("already ran and was read")
        for raw in sent:  # the broker delivers each message once more
            client.lpush(settings.queue, raw)
        await until(
            lambda: worker.log_text().count("already ran and was read") == before + 3,
            30,
            "the worker to refuse the three duplicates",
        )
        runs = {spec.task_id: (counter_dir / spec.task_id).read_text() for spec in specs}
        assert runs == {spec.task_id: "x" for spec in specs}
    finally:
        await executor.aclose()
        client.close()


async def test_a_pipelines_link_results_go_when_it_ends(workers: CeleryWorkers) -> None:
    """A Celery-chain pipeline's link results get the grace at its end, not a day."""
    settings = workers.settings
    client = redis.Redis.from_url(settings.redis_url)
    executor = workers.executor()
    try:
        items = ["one", "two", "three"]
        stages = [pipeline_stages.draft, pipeline_stages.review]
        with BrokerLog(settings.redis_url) as log:
            outcomes = await execute_pipeline(executor, items, stages)
            results = {k for k in keys_under(client, settings.key_prefix) if ":result:fp-" in k}
            ttls = [ttl for ttl in map(client.pttl, results) if ttl != -2]  # -2: already gone
        assert [o.output for o in outcomes if o is not None] == [f"review of: {i}" for i in items]
        assert ttls and all(0 <= ttl <= RETENTION_S * 1000 for ttl in ttls), ttls
        assert not any(":pipe:" in k for k in keys_under(client, settings.key_prefix))
        # The pipeline's hash was written with its expiry in one transaction: a host that
        # died between two round trips would have left it forever.
        (pipe,) = {c.args[1] for c in log.commands if c.name == "HSET" and b":pipe:" in c.args[1]}
        writes = [c for c in log.commands if c.args[1:2] == (pipe,) and c.client != "lua"]
        writes = [c for c in writes if c.name != "DEL"]  # the host drops it at the end
        assert [c.name for c in writes] == ["HSET", "EXPIRE"], writes
        host = [c for c in log.commands if c.client == writes[0].client]
        at = host.index(writes[0])
        assert [c.name for c in host[at - 1 : at + 3]] == ["MULTI", "HSET", "EXPIRE", "EXEC"]
    finally:
        await executor.aclose()
        client.close()


async def test_a_team_account_above_a_run_is_never_expired(
    workers: CeleryWorkers, tmp_path: Path
) -> None:
    """The run's own account gets the retention at its end; the shared account above it never."""
    config = run_config(workers.settings, tmp_path)
    prefix = config.key_prefix
    client = redis.Redis.from_url(config.redis_url)
    ledger = RedisLedger(config.redis_url, key_prefix=prefix)
    try:
        await set_account(ledger, "team:kept", limit_tokens=1_000_000)
        places = plan_run(config, executor="celery")
        async with open_run(
            config, places, root_id="under-team", executor="celery", account="team:kept"
        ) as builder:
            async with builder.build() as workflow:
                await workflow.phase("one", spend(2, "t"))
        team = {k for k in keys_under(client, prefix) if ":budget:{team:kept}:" in k}
        own = {k for k in keys_under(client, prefix) if ":budget:{under-team}:" in k}
        assert f"{prefix}:budget:{{team:kept}}:children" in team and own
        assert {client.ttl(k) for k in team} == {-1}
        assert all(client.ttl(k) != -1 for k in own)
        assert (await ledger.state("team:kept")).consumed == 20
    finally:
        await ledger.close()
        client.close()


def test_a_claim_after_the_round_ended_is_refused_by_the_step_record(redis_url: str) -> None:
    """A worker's claim of a dispatch whose round ended finds ``over`` (no lease is taken)."""
    runtime = WorkerRuntime(fleet_settings(redis_url), AgentRegistry(), {})
    client = runtime.redis()
    client.hset(runtime.keys.steps("wf"), "over:nonce-1", "1")
    client.hset(runtime.keys.steps("wf"), "ran:tid-2", "nonce-2")
    reply = runtime.keys.reply("r")
    assert runtime.claim("tid-1", "nonce-1", reply, "", [], "wf")[0] == "over"
    assert runtime.claim("tid-2", "nonce-2", reply, "", [], "wf")[0] == "over"
    assert not client.exists(runtime.keys.lease("tid-1"), runtime.keys.lease("tid-2"))
    # Another dispatch of the same step (a later run of the workflow) runs.
    assert runtime.claim("tid-2", "nonce-3", reply, "", [], "wf")[0] == "claimed"
    runtime.abandon("tid-2")
    client.close()


async def test_running_and_abandoned_workflows_keep_their_records_and_resume(
    workers: CeleryWorkers, tmp_path: Path
) -> None:
    """A closed run keeps everything; its resume, running, keeps it too; only its end expires it."""
    config = run_config(workers.settings, tmp_path)
    prefix, root = config.key_prefix, "resumable"
    client = redis.Redis.from_url(config.redis_url)
    ledger = RedisLedger(config.redis_url, key_prefix=prefix)

    def ttls() -> dict[str, int]:
        return {key: client.ttl(key) for key in keys_of(client, prefix, root)}

    try:
        places = plan_run(config, executor="celery")
        async with open_run(
            config, places, root_id=root, executor="celery", budget_tokens=10_000
        ) as builder:
            workflow = builder.build()
            first = await workflow.phase("one", spend(3, "a"))
            await workflow.close()  # the host goes away without finishing: a resume point
        assert all(o.success for o in first)
        kept = keys_of(client, prefix, root)
        assert {f"{prefix}:journal:{tagged(root)}/one", f"{prefix}:events:{tagged(root)}"} <= kept
        assert f"{prefix}:budget:{tagged(root)}:account" in kept
        assert set(ttls().values()) == {-1}
        for older_than in (None, 3600.0):
            report = collect(
                client, key_prefix=prefix, retention_s=RETENTION_S, older_than_s=older_than
            )
            assert root not in report.workflows
        assert keys_of(client, prefix, root) == kept

        async with open_run(
            config, places, root_id=root, executor="celery", budget_tokens=10_000
        ) as builder:
            async with builder.build() as workflow:
                again = await workflow.phase("one", spend(3, "a"))
                slow = AgentStepSpec(
                    task_id="slow", agent="sleep_prompt", description="", prompt="1.5"
                )
                running = asyncio.create_task(workflow.phase("two", [slow]))
                await until(
                    lambda: any(":lease:" in k for k in keys_under(client, prefix)),
                    30,
                    "the slow step to run",
                )
                assert collect(client, key_prefix=prefix, retention_s=RETENTION_S).workflows == []
                assert set(ttls().values()) == {-1}
                (slept,) = await running
                tail = await workflow.phase("three", spend(2, "c"))
        assert [o.output for o in again] == [o.output for o in first]
        assert slept.success and all(o.success for o in tail)
        state = await ledger.state(root)
        assert state.consumed == 3 * 10 + 2 * 10  # phase one ran once, across both runs
        assert all(ttl != -1 and ttl <= RETENTION_S for ttl in ttls().values())
        await until(lambda: not keys_of(client, prefix, root), 30, "the ended run's records to go")
    finally:
        await ledger.close()
        client.close()


async def test_a_cancelled_run_resumed_within_its_retention_keeps_its_journal(
    workers: CeleryWorkers, tmp_path: Path
) -> None:
    """A cancel ends the run (expiry set); running it again clears the expiry before it counts."""
    config = run_config(workers.settings, tmp_path)
    prefix, root = config.key_prefix, "cancelled-then-resumed"
    client = redis.Redis.from_url(config.redis_url)
    journal = f"{prefix}:journal:{tagged(root)}/one"
    account = f"{prefix}:budget:{tagged(root)}:account"
    try:
        places = plan_run(config, executor="celery")
        async with open_run(
            config, places, root_id=root, executor="celery", budget_tokens=10_000
        ) as builder:
            async with builder.build() as workflow:
                await workflow.phase("one", spend(2, "a"))
                await workflow.cancel("stop for now")
        assert 0 < client.ttl(journal) <= RETENTION_S and 0 < client.ttl(account) <= RETENTION_S
        async with open_run(
            config, places, root_id=root, executor="celery", budget_tokens=10_000
        ) as builder:
            workflow = builder.build()
            resumed = await workflow.phase("one", spend(2, "a"))
            assert (client.ttl(journal), client.ttl(account)) == (-1, -1)
            await workflow.close()
        assert all(o.success for o in resumed)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _library_run(
    settings: FleetSettings, root: str, parents: list[str] | None = None
) -> AsyncIterator[Workflow]:
    """A workflow wired by hand, without retention (as before retention existed)."""
    url, prefix = settings.redis_url, settings.key_prefix
    ledger = RedisLedger(url, key_prefix=prefix)
    budget = WorkflowBudget(10_000, ledger=ledger, workflow_id=root, parents=parents or [])
    executor = CeleryExecutor(settings=settings, budget=budget)
    store = RedisCheckpointStore(url, key_prefix=prefix)
    board = RedisRunRegistry(url, key_prefix=prefix)
    try:
        yield (
            Workflow.builder(executor)
            .with_store(store)
            .with_budget(budget)
            .with_root_id(root)
            .with_event_stream(url, key_prefix=prefix)
            .with_cancel_board(board)
            .with_retention(None)
            .build()
        )
    finally:
        await executor.aclose()
        await store.close()
        await board.close()
        await ledger.close()


def _gc_cli(settings: FleetSettings, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_RETENTION_S"] = "1"
    command = [sys.executable, "-m", "fleet", "gc", "--redis-url", settings.redis_url]
    command += ["--key-prefix", settings.key_prefix, *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_gc_prunes_ended_workflows_only_and_never_another_prefix(
    workers: CeleryWorkers,
) -> None:
    """gc removes ended workflows past retention; running, abandoned, accounts and foreign keys stay."""
    settings = workers.settings
    prefix = settings.key_prefix
    client = redis.Redis.from_url(settings.redis_url)
    ledger = RedisLedger(settings.redis_url, key_prefix=prefix)
    foreign = {
        f"{prefix}-other:events:{{gc-0}}": "x",
        f"{prefix}x:budget:{{gc-0}}:account": "x",
        f"other:{prefix}:journal:{{gc-0}}/one": "x",
        f"unprefixed-{prefix}": "x",
    }
    try:
        await set_account(ledger, "team:gc", limit_tokens=1_000_000)
        for n in range(3):
            async with _library_run(settings, f"gc-{n}", ["team:gc"] if n == 0 else None) as wf:
                async with wf:
                    await wf.phase("one", spend(2, "a"))
        async with _library_run(settings, "gc-abandoned") as abandoned:
            await abandoned.phase("one", spend(1, "a"))
            await abandoned.close()
        for key, value in foreign.items():
            client.set(key, value)
        for n in range(3):  # copies of an ended workflow under another prefix
            for key in keys_of(client, prefix, f"gc-{n}"):
                client.copy(key, key.replace(f"{prefix}:", f"{prefix}-copy:", 1))
        copies = keys_under(client, f"{prefix}-copy")
        ended = {root: keys_of(client, prefix, root) for root in ("gc-0", "gc-1", "gc-2")}
        assert all(ended.values())
        await until(
            lambda: all(
                time.time() > float(client.hget(f"{prefix}:workflow:{{gc-{n}}}", "ended") or 0) + 1
                for n in range(3)
            ),
            10,
            "the runs' retention (1 s) to pass",
        )
        slow = AgentStepSpec(task_id="slow", agent="sleep_prompt", description="", prompt="2")
        async with _library_run(settings, "gc-running") as running, running:
            phase = asyncio.create_task(running.phase("one", [slow]))
            await until(lambda: bool(keys_of(client, prefix, "gc-running")), 30, "the run to start")
            everything = set().union(*ended.values(), keys_of(client, prefix, "gc-abandoned"))
            dry = _gc_cli(settings, "--dry-run").splitlines()
            assert everything <= keys_under(client, prefix)  # a dry run removes nothing
            out = _gc_cli(settings).splitlines()
            (outcome,) = await phase
        assert outcome.success  # the running workflow was not disturbed
        for root in ended:
            assert f"would remove {root}" in dry and f"removed {root}" in out, out
        for root in ("gc-running", "gc-abandoned"):
            assert not any(root in line for line in dry + out)
        assert out[-1].startswith("removed ") and " keys, " in out[-1]
        left = keys_under(client, prefix)
        assert not any(left & keys for keys in ended.values())
        assert keys_of(client, prefix, "gc-abandoned") and keys_of(client, prefix, "gc-running")
        team = await ledger.state("team:gc")
        assert team.exists and team.limit == 1_000_000 and team.consumed == 20
        assert {k: client.get(k).decode() for k in foreign} == foreign  # type: ignore[union-attr]
        assert keys_under(client, f"{prefix}-copy") == copies
        # Told to, gc also removes the abandoned run once it has been idle that long.
        report = collect(client, key_prefix=prefix, retention_s=3600, older_than_s=0.5)
        assert "gc-abandoned" in report.abandoned and report.bytes > 0
        assert not keys_of(client, prefix, "gc-abandoned")
    finally:
        await ledger.close()
        client.close()


def test_gc_refuses_a_bad_duration_in_one_line(redis_url: str) -> None:
    """``--older-than soon`` fails with one line naming the accepted forms, exit != 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    done = subprocess.run(
        [sys.executable, "-m", "fleet", "gc", "--redis-url", redis_url, "--older-than", "soon"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "15m" in lines[0] and "Traceback" not in done.stderr


async def test_a_notice_after_its_host_left_leaves_no_reply_list_without_expiry(
    workers: CeleryWorkers,
) -> None:
    """After a cancel, a worker drops the run's queued steps and says so on the host's list.

    The host is gone by then (its list deleted as it read it): the worker's push creates
    the list again, and it must expire like every reply list, or it stays forever.
    """
    settings = workers.settings
    prefix, root = settings.key_prefix, "cancelled-host-gone"
    client = redis.Redis.from_url(settings.redis_url)
    worker = workers.workers["worker1"]
    try:
        with BrokerLog(settings.redis_url) as log:
            async with _library_run(settings, root) as workflow:
                await workflow.phase("one", spend(2, "a"))
                await workflow.cancel("the test cancels")
        queue = settings.queue.encode()
        sent = [
            r for c in log.commands if c.name == "LPUSH" and c.args[1] == queue for r in c.args[2:]
        ]
        (reply,) = {
            c.args[1].decode() for c in log.commands if c.args[1:2] and b":reply:host-" in c.args[1]
        }
        before = worker.log_text().count("dropped unrun")
        for raw in sent:  # the broker delivers the run's messages once more, after the cancel
            client.lpush(settings.queue, raw)
        await until(
            lambda: worker.log_text().count("dropped unrun") == before + len(sent),
            30,
            "the worker to drop the cancelled run's steps",
        )
        assert len(sent) == 2 and 0 < client.ttl(reply) <= REPLY_TTL_S
    finally:
        stale = keys_of(client, prefix, root) | {
            k for k in keys_under(client, prefix) if ":reply:" in k
        }
        if stale:
            client.delete(*stale)
        client.close()
