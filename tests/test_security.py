"""Security checks as tests: pickle refused, Redis auth and TLS, no secrets where they leak.

Covered elsewhere, not repeated here:
- Flower basic auth in docker-compose.yml: tests/test_compose.py::test_flower_has_basic_auth;
  a live Flower refusing requests without the password: tests/test_flower.py.
- The worker app's JSON-only config: tests/test_celery_host.py::test_app_is_json_only_with_late_acks_and_events.
- The journal store with a password, over rediss://, and a wrong password without the
  password in the error: tests/test_stores.py::test_redis_with_password_and_tls.
- The OpenAI agent scrubbing its key from errors and outputs in-process:
  tests/test_openai_agent.py (key scrubbing tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from kombu import Connection
from typer.testing import CliRunner

from fleet import AgentStepSpec, LocalExecutor, execute_steps_parallel
from fleet.budget import WorkflowBudget
from fleet.celery import PROTOCOL_VERSION, STEP_TASK, CeleryExecutor, StepMessage, configure_app
from fleet.cli.app import app as cli_app
from fleet.config import FleetSettings
from fleet.errors import BrokerError, FleetError
from fleet.eventbus import event_stream_key
from fleet.ledgers import RedisLedger
from fleet.redis_server import RedisServer, free_port
from fleet.workflow import Workflow
from tests.celery_support import (
    AGENTS_FILE,
    CeleryWorkers,
    fleet_settings,
    running_workers,
    step_task_headers,
)
from tests.fake_openai import FakeOpenAI, error, reply
from tests.test_stores import _make_cert
from workers.tasks import WorkerRuntime

PROMPT = "PROMPT-MARKER-5b1e"
"""Planted in prompts: it may only sit in the task body on the broker."""
KEY = "sk-KEY-MARKER-90c4"
"""The OpenAI agent's API key: it may appear nowhere but the Authorization header."""
PASSWORD = "redis-PW-MARKER-3d2a"
KEY_ENV = "FLEET_TEST_SECURITY_KEY"


def wait_until(predicate: Any, timeout_s: float) -> None:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes (the caller asserts after)."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def spec(task_id: str, agent: str, prompt: str = "") -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description="security", prompt=prompt or f"p-{task_id}"
    )


# --- pickle is refused end to end ---------------------------------------------------------


def test_host_app_sends_and_accepts_json_only(redis_url: str) -> None:
    """The host's Celery app (what CeleryExecutor sends with) is JSON only, like the workers'."""
    executor = CeleryExecutor(settings=fleet_settings(redis_url))
    conf = executor.app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"] and list(conf.result_accept_content) == ["json"]
    executor.close()


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters")


@pytest.fixture(scope="module")
def workers(
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    counter_dir: Path,
    openai_server: FakeOpenAI,
) -> Iterator[CeleryWorkers]:
    """One real worker whose agents file adds an OpenAI agent keyed by KEY (from its env)."""
    directory = tmp_path_factory.mktemp("security")
    agents = directory / "agents.toml"
    agents.write_text(
        AGENTS_FILE.read_text()
        + f'\n[agents.llm]\nkind = "openai"\nbase_url = "{openai_server.base_url}"\n'
        f'model = "m"\napi_key_env = "{KEY_ENV}"\nmax_retries = 0\n'
    )
    settings = fleet_settings(redis_url, agents_file=agents)
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir), KEY_ENV: KEY}
    with running_workers(settings, directory, "worker1", concurrency=2, env=env) as fleet:
        yield fleet


class Canary:
    """Unpickling this creates ``path``: proof that someone deserialised the message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


async def test_pickled_step_message_is_never_executed_and_the_worker_keeps_serving(
    workers: CeleryWorkers, counter_dir: Path, tmp_path: Path
) -> None:
    """A pickle message on the steps queue is refused unread; the next JSON step runs."""
    settings = workers.settings
    canary = tmp_path / "unpickled"
    task_id = f"pickled-{uuid.uuid4().hex[:8]}"
    payload = StepMessage(
        v=PROTOCOL_VERSION,
        spec=spec(task_id, "count_where"),
        reply=f"{settings.key_prefix}:reply:pickled",
        nonce="n",
    ).to_json()
    headers = step_task_headers(task_id, argsrepr="pickled", origin="test")
    body = ([payload], {"canary": Canary(canary)}, {"callbacks": None, "errbacks": None})
    with Connection(settings.redis_url) as connection:
        producer = connection.Producer()
        producer.publish(
            body,
            exchange="",
            routing_key=settings.queue,
            serializer="pickle",
            headers=headers,
            correlation_id=task_id,
        )
        # What went on the wire really is pickle.
    client = redis_sync.Redis.from_url(settings.redis_url)
    try:
        queued = [json.loads(m) for m in client.lrange(settings.queue, 0, -1)]
        assert any(m["content-type"] == "application/x-python-serialize" for m in queued) or (
            not queued  # already taken by the worker
        )
        executor = workers.executor()
        try:
            (after,) = await execute_steps_parallel(executor, [spec("after-pickle", "slow_echo")])
        finally:
            await executor.aclose()
        assert after.success, after.output
        worker = workers.workers["worker1"]
        await asyncio.to_thread(wait_until, lambda: "pickle" in worker.log_text(), 10)
        log = worker.log_text()
        assert "pickle" in log and ("untrusted" in log or "ContentDisallowed" in log), log[-3000:]
        assert client.llen(settings.queue) == 0
    finally:
        client.close()
    assert not (counter_dir / task_id).exists(), "the pickled step ran"
    assert not canary.exists(), "the worker unpickled the message"


# --- prompts and secrets stay out of logs, monitoring and Redis ---------------------------


class EventTap:
    """Collects the Celery task events the workers publish (what Flower shows)."""

    def __init__(self, settings: FleetSettings) -> None:
        self.events: list[dict[str, Any]] = []
        self._app = configure_app(settings)
        self._connection = self._app.connection_for_read()
        self._receiver = self._app.events.Receiver(
            self._connection, handlers={"*": self.events.append}
        )
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._receiver.consumer_context() as (connection, _channel, _consumers):
            self._ready.set()
            while not self._receiver.should_stop:
                try:
                    connection.drain_events(timeout=0.2)
                except TimeoutError:
                    continue

    def __enter__(self) -> EventTap:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=5)
        self._connection.release()
        self._app.close()


def redis_text(url: str, *, skip: set[bytes]) -> str:
    """Every key and value in the Redis database, as text (except the ``skip`` keys)."""
    client = redis_sync.Redis.from_url(url)
    chunks: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            if key in skip:
                continue
            kind = client.type(key)
            chunks.append(key)
            if kind == b"string":
                chunks.append(client.get(key) or b"")
            elif kind == b"list":
                chunks.extend(client.lrange(key, 0, -1))
            elif kind == b"hash":
                for field, value in client.hgetall(key).items():
                    chunks += [field, value]
            elif kind == b"set":
                chunks.extend(client.smembers(key))
            elif kind == b"zset":
                chunks.extend(client.zrange(key, 0, -1))
            elif kind == b"stream":
                for _id, entry in client.xrange(key):
                    for field, value in entry.items():
                        chunks += [field, value]
    finally:
        client.close()
    return b"\n".join(chunks).decode(errors="replace")


async def test_prompt_and_key_stay_out_of_logs_monitoring_and_redis_on_celery(
    workers: CeleryWorkers, openai_server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Host logs, the worker's log, task events (Flower) and Redis never hold prompt or key."""
    openai_server.script(reply("an answer"), error(500, f"internal error for key {KEY}"))
    steps = [spec("quiet", "noop", PROMPT), spec("llm-ok", "llm", PROMPT)]
    executor = workers.executor()
    caplog.set_level(logging.DEBUG)
    try:
        with EventTap(workers.settings) as tap:
            first = await execute_steps_parallel(executor, steps)
            (failed,) = await execute_steps_parallel(executor, [spec("llm-bad", "llm", PROMPT)])
            await asyncio.to_thread(
                wait_until,
                lambda: sum(e.get("type") == "task-succeeded" for e in tap.events) >= 3,
                5,
            )
    finally:
        await executor.aclose()
    assert [o.success for o in first] == [True, True], [o.output for o in first]
    assert not failed.success
    # The model server really got the prompt and the key (so their absence below means
    # something): the prompt in the body, the key only in the Authorization header.
    sent = openai_server.requests[-2:]
    assert all(PROMPT in json.dumps(r.body) for r in sent)
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in sent)

    received = [e for e in tap.events if e.get("type") == "task-received"]
    assert len(received) >= 3, tap.events
    assert all(e.get("name") == STEP_TASK for e in received)
    monitoring = json.dumps(tap.events, default=str)
    worker_log = workers.workers["worker1"].log_text()
    outcomes = json.dumps([o.to_dict() for o in [*first, failed]])
    queue = workers.settings.queue.encode()
    stored = redis_text(
        workers.settings.redis_url, skip={queue, b"unacked", b"unacked_index"}
    )  # the broker's own copies of the task body are where the prompt legitimately is
    for where, text in [
        ("host log", caplog.text),
        ("worker log", worker_log),
        ("task events", monitoring),
        ("redis", stored),
    ]:
        assert PROMPT not in text, f"prompt leaked into the {where}"
        assert KEY not in text, f"API key leaked into the {where}"
    assert KEY not in outcomes
    assert caplog.records and "task-received" in monitoring


async def test_prompt_and_key_stay_out_of_local_logs_and_outcomes(
    openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same step in-process: DEBUG logs and outcomes hold neither prompt nor key."""
    from fleet.agents import OpenAIAgent, OpenAIAgentConfig

    monkeypatch.setenv(KEY_ENV, KEY)
    agent = OpenAIAgent(
        OpenAIAgentConfig(
            base_url=openai_server.base_url, model="m", api_key_env=KEY_ENV, max_retries=0
        ),
        name="llm",
    )
    openai_server.script(reply("an answer"), error(500, f"internal error for key {KEY}"))
    caplog.set_level(logging.DEBUG)
    executor = LocalExecutor(agents={"llm": agent, "quiet": "tests.agents:noop"})
    ok = await execute_steps_parallel(
        executor, [spec("q", "quiet", PROMPT), spec("l", "llm", PROMPT)]
    )
    (bad,) = await execute_steps_parallel(executor, [spec("l2", "llm", PROMPT)])
    assert [o.success for o in ok] == [True, True] and not bad.success
    assert openai_server.requests[-1].headers["Authorization"] == f"Bearer {KEY}"
    texts = [caplog.text, json.dumps([o.to_dict() for o in [*ok, bad]]), repr(executor)]
    for text in texts:
        assert PROMPT not in text and KEY not in text


# --- Redis with a password, and rediss:// --------------------------------------------------


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("locked"), password=PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


def wrong(server: RedisServer) -> str:
    return f"redis://:{PASSWORD}-wrong@127.0.0.1:{server.port}/0"


async def test_budget_ledger_with_a_password(locked_redis: RedisServer) -> None:
    """The ledger works with the password in the URL; a wrong one fails without echoing it."""
    budget = WorkflowBudget(100, ledger=RedisLedger(locked_redis.url, key_prefix="sec"))
    reservation = await budget.reserve(40, holder="h")
    await reservation.settle(25)
    snapshot = await budget.snapshot()
    assert (snapshot.consumed_tokens, snapshot.reserved_tokens) == (25, 0)
    await budget.ledger.close()

    ledger = RedisLedger(wrong(locked_redis), key_prefix="sec")
    with pytest.raises(BrokerError) as caught:
        await ledger.state("wf")
    assert PASSWORD not in str(caught.value) and PASSWORD not in repr(ledger)
    assert PASSWORD not in str(caught.value.url)
    await ledger.close()


async def test_event_stream_with_a_password(
    locked_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Events reach a password-protected stream; a wrong password only drops them.

    The warning does not hold the password, and the workflow still finishes.
    """
    executor = LocalExecutor(agents={"quiet": "tests.agents:noop"})
    for url, root in [(locked_redis.url, "good"), (wrong(locked_redis), "bad")]:
        workflow = (
            Workflow.builder(executor)
            .with_root_id(root)
            .with_event_stream(url, key_prefix="sec", maxlen=1000)
            .build()
        )
        async with workflow:
            (outcome,) = await workflow.phase("p", [spec(f"{root}-a", "quiet")])
        assert outcome.success
    client = redis_sync.Redis.from_url(locked_redis.url)
    try:
        good = client.xrange(event_stream_key("good", key_prefix="sec"))
        assert good[0][1][b"control"] == b"start" and good[-1][1][b"control"] == b"end"
        assert client.xlen(event_stream_key("bad", key_prefix="sec")) == 0
    finally:
        client.close()
    assert "cannot append workflow events" in caplog.text
    assert PASSWORD not in caplog.text


def test_cli_errors_with_a_wrong_password_do_not_print_it(
    locked_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fleet budget show`, `fleet journal show`, `fleet status`, `fleet run`: password masked."""
    config = tmp_path / "fleet.toml"
    config.write_text("")
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    monkeypatch.setenv("FLEET_REDIS_URL", wrong(locked_redis))
    monkeypatch.setenv("FLEET_STORE", "memory")
    monkeypatch.setenv("FLEET_AGENTS_FILE", str(tmp_path / "none.toml"))
    program = tmp_path / "flow.py"
    program.write_text("async def main(workflow):\n    return 1\n")
    runner = CliRunner()
    bad, good = wrong(locked_redis), locked_redis.url
    runs = {
        "budget show": (["budget", "show", "wf", "--redis-url", bad], BrokerError),
        "journal show": (["journal", "show", "wf", "--store", bad], FleetError),
        "status": (["status", "wf", "--store", bad], FleetError),
        "status (budget line)": (["status", "wf"], None),
        "run": (["run", str(program), "--store", good, "--event-stream", "off"], None),
    }
    for name, (args, raised) in runs.items():
        result = runner.invoke(cli_app, args)
        text = result.output + str(result.exception)
        assert PASSWORD not in text, f"fleet {name} printed the password:\n{text}"
        if raised is None:
            assert result.exception is None or isinstance(result.exception, SystemExit), text
        else:
            assert isinstance(result.exception, raised), text
    assert "***" in runner.invoke(cli_app, ["status", "wf", "--store", good]).output


REDISS = "rediss://:pw@127.0.0.1:6390/0"


def test_rediss_urls_build_verifying_tls_clients(tmp_path: Path) -> None:
    """Ledger, host and worker Redis clients from a rediss:// URL use TLS and verify."""
    url = REDISS
    settings = fleet_settings(url, agents_file=tmp_path / "none.toml")

    async def async_pools() -> list[Any]:
        ledger = RedisLedger(url)
        executor = CeleryExecutor(settings=settings)
        try:
            async with executor._client() as host_client:
                return [ledger._client()[0].connection_pool, host_client.connection_pool]
        finally:
            await ledger.close()

    pools = asyncio.run(async_pools())
    runtime = WorkerRuntime(settings, registry=None, stages={})  # type: ignore[arg-type]
    worker_pool = runtime.redis().connection_pool
    for pool in [*pools, worker_pool]:
        assert "SSL" in pool.connection_class.__name__, pool
        assert pool.connection_kwargs.get("ssl_cert_reqs", "required") in (
            "required",
            ssl.CERT_REQUIRED,
        )


def test_celery_broker_over_rediss_verifies_the_server(tmp_path: Path) -> None:
    """Host and workers' broker connection from a plain rediss:// URL checks certificates."""
    app = configure_app(fleet_settings(REDISS, agents_file=tmp_path / "none.toml"))
    try:
        broker = app.connection_for_write()
        assert broker.transport_cls == "rediss"
        assert broker.ssl and broker.ssl.get("ssl_cert_reqs") == ssl.CERT_REQUIRED, broker.ssl
    finally:
        app.close()


def test_celery_result_backend_accepts_a_plain_rediss_url(tmp_path: Path) -> None:
    """The Celery app's result backend builds a TLS pool from a plain rediss:// URL."""
    app = configure_app(fleet_settings(REDISS, agents_file=tmp_path / "none.toml"))
    try:
        backend = app.backend
        assert "SSL" in backend.connparams["connection_class"].__name__
    finally:
        app.close()


async def test_ledger_and_event_stream_over_tls_with_a_password(tmp_path: Path) -> None:
    """A real TLS Redis with a password: the budget ledger and the event stream both work."""
    cert, key = _make_cert(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        password=PASSWORD,
        extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                    "--tls-auth-clients", "no"],
    )  # fmt: skip
    server.start()
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        budget = WorkflowBudget(50, ledger=RedisLedger(url, key_prefix="tls"))
        await (await budget.reserve(10, holder="h")).settle(10)
        assert (await budget.snapshot()).consumed_tokens == 10
        await budget.ledger.close()
        workflow = (
            Workflow.builder(LocalExecutor(agents={"quiet": "tests.agents:noop"}))
            .with_root_id("tls")
            .with_event_stream(url, key_prefix="tls", maxlen=1000)
            .build()
        )
        async with workflow:
            await workflow.phase("p", [spec("t", "quiet")])
        client = redis_sync.Redis.from_url(server.url)
        try:
            assert client.xlen(event_stream_key("tls", key_prefix="tls")) >= 2
        finally:
            client.close()
    finally:
        server.stop()
