"""The Celery host's own contract: app configuration, the wire, the budget guard, backpressure."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from bench.redis_cost import CountingProxy
from fleet import (
    AgentStepSpec,
    LocalExecutor,
    execute_steps_parallel,
    execute_steps_parallel_resumable,
)
from fleet.admission import refusal
from fleet.budget import WorkflowBudget
from fleet.celery import STEP_TASK, CeleryExecutor, configure_app, step_task_id
from fleet.celery.dispatch import HOST_CONNECTIONS
from fleet.celery.round import broker_failure
from fleet.config import FleetSettings
from fleet.errors import BudgetExhaustedError, ConfigError
from fleet.ledgers import RedisLedger
from fleet.stores import RedisCheckpointStore
from tests.celery_support import (
    REPO,
    BrokerLog,
    CeleryWorkers,
    fleet_settings,
    running_workers,
    sockets_to,
)

pytestmark = [pytest.mark.redis, pytest.mark.celery]


def spec(task_id: str, agent: str = "slow_echo", prompt: str = "", **extra: Any) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description="d", prompt=prompt or f"p-{task_id}", **extra
    )


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, counter_dir: Path
) -> Iterator[CeleryWorkers]:
    settings = fleet_settings(redis_url)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    with running_workers(
        settings, tmp_path_factory.mktemp("w"), "worker1", concurrency=4, env=env
    ) as fleet:
        yield fleet


def ran(counter_dir: Path, task_id: str) -> int:
    path = counter_dir / task_id
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------- the app


async def test_a_closed_executor_leaves_no_connection_open(workers: CeleryWorkers) -> None:
    """aclose() closes the broker connections the executor sent on, not only its own clients.

    Celery's ``app.close()`` only forgets its connection pool; its connections stayed open
    (counted here by the kernel, after a full garbage collection).
    """
    port = int(workers.settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    # Earlier tests' dropped clients close when collected: collect them before counting.
    gc.collect()
    before = sockets_to(port)
    executor = workers.executor()
    outcomes = await execute_steps_parallel(executor, [spec(f"close{i}") for i in range(6)])
    assert all(o.success for o in outcomes)
    assert sockets_to(port) > before, "the executor never connected"
    await executor.aclose()
    gc.collect()
    # At most as many as before: other clients of the session may close meanwhile, none of
    # the executor's may stay.
    assert sockets_to(port) <= before


async def test_a_one_step_round_writes_its_step_record_once(workers: CeleryWorkers) -> None:
    """The round's end notes its read step: no separate flush of read results before it.

    Counted at a proxy in front of Redis that only the host goes through.
    """
    settings = workers.settings
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CountingProxy(port, settings.key_prefix)
    proxy.start()
    proxied = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}/0"})
    executor = CeleryExecutor(settings=proxied)
    try:
        outcome = await executor.execute_step(spec("once1"))
    finally:
        await executor.aclose()
    assert outcome.success, outcome.output
    writes = Counter(
        shape.split()[0]
        for (_part, shape), n in proxy.shapes.items()
        for _ in range(n)
        if ":steps:" in shape
    )
    # One HSET (the ended dispatch's ``over:`` field) and one HDEL, in one pipeline.
    assert writes["hset"] == 1, proxy.shapes


def test_app_is_json_only_with_late_acks_and_events(redis_url: str) -> None:
    """The worker app accepts only JSON, acks late, prefetches one, and sends task events."""
    from workers.app import create_app

    app = create_app(fleet_settings(redis_url))
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_serializer == "json" and conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.result_expires == fleet_settings(redis_url).result_expires_s
    assert conf.broker_transport_options["visibility_timeout"] >= 300
    assert {STEP_TASK, "fleet.run_stage"} <= set(app.tasks)
    app.close()


def test_importing_the_worker_module_creates_nothing() -> None:
    """``import workers.app`` builds no app; ``workers.app.app`` builds it from settings."""
    code = (
        "import workers.app as m, sys; assert m._app is None; "
        "assert 'fleet.run_step' in m.app.tasks; print(m.app.conf.task_default_queue)"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "FLEET_QUEUE": "from-env.steps",
        "FLEET_AGENTS_FILE": str(REPO / "tests" / "agents.toml"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "from-env.steps"


def test_a_worker_prepares_its_agents_before_the_first_step(tmp_path: Path) -> None:
    """Price data loads when the worker app is built, not on the loop of its first steps."""
    agents = tmp_path / "agents.toml"
    agents.write_text(
        '[agents.llm]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "gpt-4o-mini"\n'
    )
    code = (
        "import sys, workers.app as m; loaded = lambda: 'genai_prices' in sys.modules; "
        "before = loaded(); m.app; print(before, loaded())"
    )
    env = {"PATH": "/usr/bin:/bin", "FLEET_AGENTS_FILE": str(agents)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "True"]


def test_a_worker_survives_acking_on_a_closed_broker_channel(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that finishes after the broker connection dropped is acked on a dead channel.

    kombu's Redis QoS then raises ``AttributeError`` ('NoneType' ... 'client'), which
    Celery's consumer treats as unrecoverable: the worker died in 1 of 3 trials of
    tests/faults/test_redis_restart.py. The worker app guards it with a warning.
    """
    import kombu
    from kombu.transport import redis as kombu_redis

    from workers.app import create_app

    create_app(fleet_settings(redis_url))
    assert getattr(kombu_redis.QoS.ack, "fleet_guarded", False)
    connection = kombu.Connection(redis_url)
    try:
        channel = connection.channel()
        qos = channel.qos
        channel._pool, channel.connection = None, None  # what closing the channel leaves
        with caplog.at_level("WARNING", logger="fleet.worker"):
            qos.ack("tag-1")
            qos.reject("tag-2")
            qos.restore_unacked()
    finally:
        connection.release()
    assert sum("broker connection was closed" in r.getMessage() for r in caplog.records) == 3


def test_missing_agents_file_fails_at_worker_start(redis_url: str, tmp_path: Path) -> None:
    """A worker without its agents file refuses to start and names the path."""
    from workers.app import create_app

    with pytest.raises(ConfigError, match="nowhere.toml"):
        create_app(fleet_settings(redis_url, agents_file=tmp_path / "nowhere.toml"))


def test_executor_options_are_validated(redis_url: str) -> None:
    """A bad option fails at construction and names the setting."""
    with pytest.raises(ConfigError, match="max_in_flight"):
        CeleryExecutor(settings=fleet_settings(redis_url), max_in_flight=0)
    executor = CeleryExecutor(settings=fleet_settings(redis_url), max_in_flight=3)
    assert executor.concurrency_hint() == 3
    assert "max_in_flight=3" in repr(executor)


def test_journaled_task_ids_are_deterministic() -> None:
    """Same workflow, step and identity: same task id; any identity change: another one."""
    a = spec("a", prompt="x")
    assert step_task_id("wf", a) == step_task_id("wf", spec("a", prompt="x"))
    assert step_task_id("wf", a) != step_task_id("wf", spec("a", prompt="y"))
    assert step_task_id("wf", a) != step_task_id("wf2", a)


# --------------------------------------------------------------------------- the wire


async def test_message_is_json_and_its_summary_never_holds_the_prompt(redis_url: str) -> None:
    """The queued message is JSON; monitoring sees "workflow step agent", never the prompt."""
    settings = fleet_settings(redis_url)  # no worker consumes this queue
    executor = CeleryExecutor(settings=settings)
    secret = "TOP-SECRET-PROMPT"
    step = asyncio.create_task(executor.execute_step(spec("t1", prompt=secret)))
    client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(500):
            if client.llen(settings.queue):
                break
            await asyncio.sleep(0.02)
        message = json.loads(client.lindex(settings.queue, 0))
    finally:
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        await executor.aclose()
        client.delete(settings.queue)
        client.close()
    assert message["content-type"] == "application/json"
    headers = message["headers"]
    assert headers["task"] == STEP_TASK
    assert headers["argsrepr"] == "- t1 slow_echo"
    assert secret not in json.dumps(headers)


async def test_poison_messages_are_rejected_and_never_run(
    workers: CeleryWorkers, counter_dir: Path
) -> None:
    """Bad JSON or an unknown schema version: logged, rejected, the agent never runs."""
    app = configure_app(workers.settings)
    good = json.loads(
        json.dumps({"v": 1, "spec": spec("poison", "count_where").to_dict(), "nonce": "n"})
    )
    bad = [
        "{not json",
        json.dumps({**good, "v": 99, "reply": f"{workers.settings.key_prefix}:reply:x"}),
        json.dumps({**good, "reply": "elsewhere:reply:x"}),
        json.dumps({"v": 1}),
    ]
    try:
        for n, payload in enumerate(bad):
            app.send_task(STEP_TASK, args=[payload], task_id=f"poison-{n}")
    finally:
        app.close()
    executor = workers.executor()
    try:  # the worker is still healthy afterwards
        (after,) = await execute_steps_parallel(executor, [spec("after")])
    finally:
        await executor.aclose()
    assert after.success
    log = workers.workers["worker1"].log_text()
    deadline = time.monotonic() + 10
    while log.count("rejected fleet.run_step message poison-") < 4:
        assert time.monotonic() < deadline, log[-3000:]
        await asyncio.sleep(0.1)
        log = workers.workers["worker1"].log_text()
    assert "not valid JSON" in log and "unknown message schema version 99" in log
    assert "outside key prefix" in log
    assert ran(counter_dir, "poison") == 0


async def test_unreachable_broker_is_a_failed_step(tmp_path: Path) -> None:
    """No Redis: the step fails with ``unavailable`` and a masked URL; nothing raises."""
    settings = FleetSettings(
        redis_url="redis://:hunter2@127.0.0.1:1/0", agents_file=tmp_path / "none.toml"
    )
    executor = CeleryExecutor(settings=settings)
    outcome = await executor.execute_step(spec("x"))
    await executor.aclose()
    assert not outcome.success and outcome.error == "unavailable"
    assert "hunter2" not in outcome.output and "***" in outcome.output


# --------------------------------------------------------------------------- budget


async def test_budget_guard_refuses_before_sending(
    workers: CeleryWorkers, counter_dir: Path, key_prefix: str
) -> None:
    """A step that cannot fit is never sent; the worker charges what a step used."""
    ledger = RedisLedger(workers.settings.redis_url, key_prefix=workers.settings.key_prefix)
    budget = WorkflowBudget(100, ledger=ledger, workflow_id=f"{key_prefix}-budget")
    executor = workers.executor(budget=budget, max_in_flight=1)
    try:
        outcomes = await execute_steps_parallel(
            executor,
            [
                spec("spender", "spend", "80", max_tokens=90),
                spec("refused", "count_where", max_tokens=30),
            ],
        )
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
        await ledger.close()
    assert outcomes[0].success and outcomes[0].usage.total_tokens == 80
    assert not outcomes[1].success and outcomes[1].error == "budget_exhausted"
    assert ran(counter_dir, "refused") == 0  # never sent
    assert snapshot.consumed_tokens == 80 and snapshot.reserved_tokens == 0


async def test_both_hosts_refuse_a_step_with_the_same_outcome(
    workers: CeleryWorkers, counter_dir: Path, key_prefix: str
) -> None:
    """A refused step fails the same on the Celery host and the local one (fleet.admission)."""
    url = workers.settings.redis_url
    outcomes = {}
    for host in ("celery", "local"):
        # The same workflow id on two ledgers, so each host hits the same refusal.
        ledger = RedisLedger(url, key_prefix=f"{workers.settings.key_prefix}-{host}")
        budget = WorkflowBudget(50, ledger=ledger, workflow_id=f"{key_prefix}-refusal")
        executor = workers.executor(budget=budget) if host == "celery" else None
        try:
            step = spec(f"refused-{key_prefix}", "count_where", max_tokens=80)
            if executor is not None:
                (outcomes[host],) = await execute_steps_parallel(executor, [step])
            else:
                agents = {"count_where": "tests.agents:count_where"}
                in_process = LocalExecutor(agents=agents, budget=budget)
                outcomes[host] = await in_process.execute_step(step)
            try:
                await budget.reserve(80, holder="probe")
            except BudgetExhaustedError as error:
                expected = refusal(step, error)
        finally:
            if executor is not None:
                await executor.aclose()
            await ledger.close()
        assert outcomes[host].error == "budget_exhausted"
        assert outcomes[host].output == expected.output
    assert ran(counter_dir, f"refused-{key_prefix}") == 0  # never sent
    celery, local = (outcomes[h].model_dump(exclude={"worker"}) for h in ("celery", "local"))
    assert celery == local
    assert outcomes["local"].worker == "local" and outcomes["celery"].worker is None


async def test_step_cannot_spend_more_than_it_holds(
    workers: CeleryWorkers, key_prefix: str
) -> None:
    """On the worker the agent's hold is the host's reservation (echo needs 200 of 20)."""
    ledger = RedisLedger(workers.settings.redis_url, key_prefix=workers.settings.key_prefix)
    budget = WorkflowBudget(1000, ledger=ledger, workflow_id=f"{key_prefix}-hold")
    executor = workers.executor(budget=budget)
    try:
        (outcome,) = await execute_steps_parallel(
            executor, [spec("greedy", "echo", "x" * 400, max_tokens=20)]
        )
        snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
        await ledger.close()
    assert outcome.error == "budget_exhausted"
    assert snapshot.reserved_tokens == 0


async def test_a_budgeted_step_is_settled_once_by_its_worker(
    workers: CeleryWorkers, key_prefix: str
) -> None:
    """The worker settles each step it ran; the host does not settle it again (one settle)."""
    ledger = RedisLedger(workers.settings.redis_url, key_prefix=workers.settings.key_prefix)
    budget = WorkflowBudget(10_000, ledger=ledger, workflow_id=f"{key_prefix}-once")
    executor = workers.executor(budget=budget)
    steps = [spec(f"once-{i}", "echo", "x" * 40, max_tokens=500) for i in range(4)]
    try:
        with BrokerLog(workers.settings.redis_url) as log:
            outcomes = await execute_steps_parallel(executor, steps)
            snapshot = await budget.snapshot()
    finally:
        await executor.aclose()
        await ledger.close()
    assert all(o.success for o in outcomes), [o.output for o in outcomes]
    settled = f"{{{budget.workflow_id}}}:settled".encode()
    # The ledger's settle script charges a reservation once (HSETNX on its id) per call.
    settles = Counter(
        c.args[2].decode()
        for c in log.commands
        if c.client == "lua" and c.name == "HSETNX" and c.args[1].endswith(settled)
    )
    assert len(settles) == len(steps) and set(settles.values()) == {1}, settles
    # Settled before the host had the outcome: nothing left reserved when the round returns.
    assert snapshot.reserved_tokens == 0
    assert snapshot.consumed_tokens == sum(o.usage.total_tokens for o in outcomes) > 0


# --------------------------------------------------------------------------- backpressure


async def test_dispatch_pauses_at_the_queue_high_water_mark(
    redis_url: str, tmp_path: Path, counter_dir: Path
) -> None:
    """With nobody consuming, the queue never grows past the high-water mark."""
    settings = fleet_settings(redis_url, queue_high_water=3, max_in_flight=8)
    executor = CeleryExecutor(settings=settings)
    client = redis.Redis.from_url(redis_url)
    round_ = asyncio.create_task(
        execute_steps_parallel(executor, [spec(f"q{i}") for i in range(8)])
    )
    try:
        deepest = 0
        for _ in range(40):
            deepest = max(deepest, client.llen(settings.queue))
            await asyncio.sleep(0.025)
        assert deepest == 3
        env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
        with running_workers(settings, tmp_path, "drain", env=env):
            outcomes = await round_
        assert [o.output for o in outcomes] == [f"p-q{i}" for i in range(8)]
    finally:
        round_.cancel()
        await executor.aclose()
        client.delete(settings.queue)
        client.close()


_IN_FLIGHT = """
local queued = redis.call('LRANGE', KEYS[1], 0, -1)
local leased = redis.call('KEYS', ARGV[1])
return {queued, leased}
"""


async def test_at_most_max_in_flight_steps_are_queued_or_running(
    redis_url: str, tmp_path: Path, counter_dir: Path
) -> None:
    """max_in_flight 3, 12 steps of 0.2 s on 8 worker threads: never over 3 queued or running.

    An atomic snapshot (one script) of the steps waiting in the broker queue and the steps a
    worker holds a lease on; the workers have room for 8 at once, so only the host's
    admission keeps the count at 3.
    """
    settings = fleet_settings(
        redis_url, max_in_flight=3, queue_high_water=1000, claim_timeout_s=60.0, step_lease_s=5.0
    )
    executor = CeleryExecutor(settings=settings)
    client = redis.Redis.from_url(redis_url)
    snapshot = client.register_script(_IN_FLIGHT)
    lease_head = f"{settings.key_prefix}:lease:"

    def in_flight() -> tuple[set[str], set[str]]:
        raw_queued, raw_leased = snapshot(keys=[settings.queue], args=[lease_head + "*"])
        queued = {json.loads(raw)["headers"]["id"] for raw in raw_queued}
        return queued, {key.decode()[len(lease_head) :] for key in raw_leased}

    specs = [spec(f"m{i}", "count_and_echo") for i in range(12)]
    round_ = asyncio.create_task(execute_steps_parallel(executor, specs))
    samples: list[tuple[set[str], set[str]]] = []
    try:
        # Nobody consumes yet: exactly max_in_flight steps wait in the queue.
        for _ in range(25):
            samples.append(in_flight())
            await asyncio.sleep(0.02)
        assert [len(q) for q, _ in samples[-5:]] == [3] * 5
        env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), "FLEET_TEST_STEP_SLEEP": "0.2"}
        with running_workers(settings, tmp_path, "bp1", "bp2", concurrency=4, env=env):
            while not round_.done():
                samples.append(in_flight())
                await asyncio.sleep(0.01)
            outcomes = await round_
    finally:
        round_.cancel()
        await executor.aclose()
        client.delete(settings.queue)
        client.close()
    assert [o.output for o in outcomes] == [f"p-m{i}" for i in range(12)]
    assert max(len(queued | leased) for queued, leased in samples) == 3
    assert max(len(leased) for _, leased in samples) >= 2  # running steps were observed


# --------------------------------------------------------------------------- journal


async def test_workers_journal_each_step_at_the_step_boundary(
    workers: CeleryWorkers, key_prefix: str
) -> None:
    """With ``worker_journal``, each successful step's record is written by the worker."""
    store = RedisCheckpointStore(workers.settings.redis_url, key_prefix=workers.settings.key_prefix)
    executor = workers.executor(worker_journal=True)
    workflow_id = f"{key_prefix}-wj"
    try:
        outcomes = await executor.native_round(
            [spec("a"), spec("b"), spec("f", "fail")], workflow_id=workflow_id
        )
        checkpoint = await store.load(workflow_id)
    finally:
        await store.delete(workflow_id)
        await store.close()
        await executor.aclose()
    assert outcomes is not None and [o.success for o in outcomes] == [True, True, False]
    assert checkpoint is not None
    assert sorted(checkpoint.completed()) == ["a", "b"]
    assert checkpoint.completed()["a"].worker == workers.workers["worker1"].node


class _CountingStore(RedisCheckpointStore):
    """The real Redis journal, counting the records the host writes itself."""

    written: list[str]

    async def record_step(self, workflow_id: str, record: Any) -> None:
        self.written.append(record.task_id)
        await super().record_step(workflow_id, record)


@pytest.mark.parametrize("worker_journal", [True, False])
async def test_a_step_the_worker_journaled_is_not_journaled_again_by_the_host(
    workers: CeleryWorkers, key_prefix: str, worker_journal: bool
) -> None:
    """The worker's finish script journals the step; the host then writes nothing for it.

    Without ``worker_journal`` the host journals each success itself; either way the
    journal holds every success (and no failure), and a resume runs nothing again.
    """
    url, prefix = workers.settings.redis_url, workers.settings.key_prefix
    store = _CountingStore(url, key_prefix=prefix)
    store.written = []
    executor = workers.executor(worker_journal=worker_journal)
    workflow_id = f"{key_prefix}-once-{worker_journal}"
    specs = [spec(f"j{i}", "echo") for i in range(6)] + [spec("jf", "fail")]
    try:
        first = await execute_steps_parallel_resumable(
            executor, specs, workflow_id, store, keep_journal=True
        )
        checkpoint = await store.load(workflow_id)
        resumed: list[object] = []
        again = await execute_steps_parallel_resumable(
            executor, specs[:-1], workflow_id, store, events=resumed.append, keep_journal=True
        )
    finally:
        await store.delete(workflow_id)
        await store.close()
        await executor.aclose()
    assert [o.success for o in first] == [True] * 6 + [False]
    assert checkpoint is not None
    assert sorted(checkpoint.completed()) == [f"j{i}" for i in range(6)]
    assert sorted(store.written) == ([] if worker_journal else [f"j{i}" for i in range(6)])
    assert [o.output for o in again] == [o.output for o in first[:-1]]
    assert resumed == []  # served from the journal: nothing sent, nothing ran


async def test_a_worker_shares_its_ledger_and_journal_connections_across_steps(
    workers: CeleryWorkers, key_prefix: str
) -> None:
    """Budgeted, journaled steps: the worker's Redis connections do not grow with its steps.

    A worker that built a ledger and a journal client per step opened two connections for
    each (80 for this round), and paid ~1.9 ms of CPU a step to set them up.
    """
    url, prefix = workers.settings.redis_url, workers.settings.key_prefix
    ledger = RedisLedger(url, key_prefix=prefix)
    store = RedisCheckpointStore(url, key_prefix=prefix)
    workflow_id = f"{key_prefix}-conns"
    budget = WorkflowBudget(10**6, ledger=ledger, workflow_id=workflow_id)
    executor = workers.executor(budget=budget, worker_journal=True)
    client = redis.Redis.from_url(url)

    def received() -> int:
        return int(client.info("stats")["total_connections_received"])

    try:
        warm = await executor.native_round(
            [spec(f"w{i}", "echo") for i in range(8)], workflow_id=workflow_id
        )
        before = received()
        outcomes = await executor.native_round(
            [spec(f"s{i}", "echo") for i in range(40)], workflow_id=workflow_id
        )
        opened = received() - before
        checkpoint = await store.load(workflow_id)
        spent = (await budget.snapshot()).consumed_tokens
    finally:
        await store.delete(workflow_id)
        await store.close()
        await executor.aclose()
        await ledger.close()
        client.close()
    assert warm is not None and outcomes is not None
    assert all(o.success for o in warm + outcomes), [o.output for o in outcomes]
    assert checkpoint is not None and len(checkpoint.completed()) == 48
    assert spent == sum(o.usage.total_tokens for o in warm + outcomes) > 0
    assert opened < 10, f"{opened} Redis connections opened for 40 budgeted, journaled steps"


def test_a_busy_connection_pool_is_not_blamed_on_redis() -> None:
    """An exhausted host pool says so; only a real connection failure asks whether Redis runs."""
    url = "redis://:secret@127.0.0.1:6399/0"
    busy = broker_failure(url, MaxConnectionsError("Too many connections"))
    assert "is Redis running" not in busy
    assert f"{HOST_CONNECTIONS} Redis connections" in busy and "secret" not in busy
    down = broker_failure(url, RedisConnectionError("Connection refused"))
    assert down.endswith("is Redis running?") and "secret" not in down


def test_fleet_run_lets_workers_journal_when_the_journal_is_the_fleets_redis(
    redis_url: str, tmp_path: Path
) -> None:
    """``fleet run --executor celery`` with its journal on the broker's Redis: workers journal."""
    from fleet.runner import build_executor

    settings = fleet_settings(redis_url)
    shared = build_executor("celery", {}, None, 8, settings, store=settings.redis_url)
    apart = build_executor("celery", {}, None, 8, settings, store=f"sqlite:{tmp_path}/j.db")
    try:
        assert isinstance(shared, CeleryExecutor) and shared.worker_journal
        assert isinstance(apart, CeleryExecutor) and not apart.worker_journal
    finally:
        shared.close()
        apart.close()
