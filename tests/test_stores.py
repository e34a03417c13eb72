"""One contract suite for every journal store: memory, SQLite and Redis run the same bodies."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_sync

from fleet import AgentStepSpec, LocalExecutor, StepOutcome, TokenUsage
from fleet.checkpoint import WorkflowCheckpoint, WorkflowStepRecord
from fleet.errors import CheckpointError, ConfigError, FleetError
from fleet.redis_server import RedisServer, free_port
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import (
    CheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    SQLiteCheckpointStore,
    open_store,
)
from fleet.stores.base import GroupCommit, encode_meta
from fleet.stores.memory import _Journal

Inject = Callable[[str, str | None, dict[str, str]], None]


@dataclass
class Backend:
    name: str
    store: CheckpointStore
    inject: Inject
    """Write raw stored text (meta, step records) behind the store's back."""
    reopen: Callable[[], CheckpointStore] | None
    """A second, independent store over the same data (None for memory)."""


def _memory() -> Backend:
    store = MemoryCheckpointStore()

    def inject(workflow_id: str, meta: str | None, steps: dict[str, str]) -> None:
        journal = _Journal(meta)  # type: ignore[arg-type]
        journal.steps.update(steps)
        store._journals[workflow_id] = journal

    return Backend("memory", store, inject, None)


def _sqlite(path: Path) -> Backend:
    def inject(workflow_id: str, meta: str | None, steps: dict[str, str]) -> None:
        conn = sqlite3.connect(path)
        with conn:
            if meta is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO fleet_journal_meta VALUES (?, ?)", (workflow_id, meta)
                )
            for task_id, raw in steps.items():
                conn.execute(
                    "INSERT OR REPLACE INTO fleet_journal_steps VALUES (?, ?, ?)",
                    (workflow_id, task_id, raw),
                )
        conn.close()

    store = SQLiteCheckpointStore(path)
    return Backend("sqlite", store, inject, lambda: SQLiteCheckpointStore(path))


def _redis(url: str, prefix: str) -> Backend:
    store = RedisCheckpointStore(url, key_prefix=prefix)

    def inject(workflow_id: str, meta: str | None, steps: dict[str, str]) -> None:
        client = redis_sync.Redis.from_url(url)
        key = store.key(workflow_id)
        if meta is not None:
            client.hset(key, "meta", meta)
        for task_id, raw in steps.items():
            client.hset(key, f"step:{task_id}", raw)
        client.close()

    return Backend("redis", store, inject, lambda: RedisCheckpointStore(url, key_prefix=prefix))


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> AsyncIterator[Backend]:
    if request.param == "memory":
        made = _memory()
    elif request.param == "sqlite":
        made = _sqlite(tmp_path / "journal" / "fleet.db")
        # Create the schema so raw injection has tables to write into.
        await made.store.list_workflows()
    else:
        made = _redis(request.getfixturevalue("redis_url"), key_prefix)
    try:
        yield made
    finally:
        await made.store.close()


def record(task_id: str, output: str = "done", *, workflow_id: str = "wf") -> WorkflowStepRecord:
    spec = AgentStepSpec(task_id=task_id, agent="echo", description="d", prompt=f"p-{task_id}")
    outcome = StepOutcome(
        task_id=task_id,
        session_id=f"task-run-{task_id}",
        agent="echo",
        output=output,
        success=True,
        usage=TokenUsage(prompt_tokens=3, completion_tokens=4),
        duration_s=0.25,
        worker="local",
    )
    return WorkflowStepRecord.for_outcome(workflow_id, spec, outcome)


async def test_missing_journal_loads_as_none(backend: Backend) -> None:
    """A workflow id that never journaled anything has no checkpoint."""
    assert await backend.store.load("nothing-here") is None
    assert await backend.store.delete("nothing-here") is False


async def test_recorded_steps_load_back_unchanged(backend: Backend) -> None:
    """Every recorded step comes back with its outcome byte-for-byte, under schema 1."""
    records = [record("a", "alpha"), record("b", "beta"), record("c", "gamma")]
    for item in records:
        await backend.store.record_step("wf", item)
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert checkpoint.schema_version == 1
    assert checkpoint.workflow_id == "wf"
    assert sorted(checkpoint.steps, key=lambda r: r.task_id) == records
    assert checkpoint.completed()["b"].output == "beta"
    assert checkpoint.completed()["b"].usage.total_tokens == 7
    assert checkpoint.checkpoint_ms == max(r.recorded_ms for r in records)


async def test_recording_a_step_again_replaces_it(backend: Backend) -> None:
    """record_step is an upsert: one record per task id, the latest wins."""
    await backend.store.record_step("wf", record("a", "first"))
    await backend.store.record_step("wf", record("a", "second"))
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert [r.outcome.output for r in checkpoint.steps] == ["second"]


async def test_delete_removes_only_that_workflow(backend: Backend) -> None:
    """Deleting one journal leaves the others; deleting twice reports nothing to delete."""
    await backend.store.record_step("one", record("a", workflow_id="one"))
    await backend.store.record_step("two", record("a", workflow_id="two"))
    assert await backend.store.list_workflows() == ["one", "two"]
    assert await backend.store.delete("one") is True
    assert await backend.store.delete("one") is False
    assert await backend.store.load("one") is None
    assert await backend.store.load("two") is not None
    assert await backend.store.list_workflows() == ["two"]


async def test_save_replaces_the_whole_journal(backend: Backend) -> None:
    """save() imports a checkpoint wholesale; records not in it are gone."""
    await backend.store.record_step("wf", record("old"))
    imported = WorkflowCheckpoint.from_records("wf", [record("x"), record("y")])
    await backend.store.save(imported)
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert sorted(checkpoint.completed()) == ["x", "y"]


async def test_future_schema_version_is_refused_and_left_in_place(backend: Backend) -> None:
    """A journal written by a newer build fails to load, naming both versions, and stays."""
    await backend.store.save(WorkflowCheckpoint.from_records("wf", [record("a")], schema_version=2))
    with pytest.raises(CheckpointError, match="schema version 2") as caught:
        await backend.store.load("wf")
    assert "at most 1" in str(caught.value)
    assert caught.value.workflow_id == "wf"
    assert await backend.store.list_workflows() == ["wf"]
    assert await backend.store.delete("wf") is True


async def test_future_version_is_refused_even_when_records_do_not_parse(backend: Backend) -> None:
    """The version check comes first: a future format's records are not judged as corrupt."""
    backend.inject("wf", encode_meta("wf", 7), {"a": '{"new": "format"}'})
    with pytest.raises(CheckpointError, match="schema version 7"):
        await backend.store.load("wf")


async def test_meta_for_another_workflow_is_a_key_mismatch(backend: Backend) -> None:
    """A journal whose meta names a different workflow id is refused."""
    backend.inject("wf", encode_meta("someone-else"), {"a": record("a").to_json()})
    with pytest.raises(CheckpointError, match="key mismatch"):
        await backend.store.load("wf")


async def test_corrupt_record_is_refused_with_the_step_named(backend: Backend) -> None:
    """A truncated record makes the journal unreadable; the error names the step."""
    good = record("a").to_json()
    backend.inject("wf", encode_meta("wf"), {"a": good, "b": record("b").to_json()[:40]})
    with pytest.raises(CheckpointError, match="'b' is corrupt"):
        await backend.store.load("wf")


@pytest.mark.parametrize(
    "meta", ["not json", "[1, 2]", '{"schema_version": "one", "workflow_id": "wf"}']
)
async def test_unreadable_meta_is_refused(backend: Backend, meta: str) -> None:
    """A meta document that is not the expected JSON object fails the load clearly."""
    backend.inject("wf", meta, {"a": record("a").to_json()})
    with pytest.raises(CheckpointError, match="unreadable"):
        await backend.store.load("wf")


async def test_record_under_the_wrong_task_id_is_refused(backend: Backend) -> None:
    """A record stored under one id but naming another is a task id mismatch."""
    backend.inject("wf", encode_meta("wf"), {"a": record("b").to_json()})
    with pytest.raises(CheckpointError, match="task id mismatch"):
        await backend.store.load("wf")


async def test_journal_without_meta_reads_as_pre_v1_and_loads(backend: Backend) -> None:
    """Records without a meta document load with schema version 0."""
    backend.inject("wf", None, {"a": record("a").to_json()})
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert checkpoint.schema_version == 0
    assert list(checkpoint.completed()) == ["a"]


async def test_unknown_record_fields_are_ignored(backend: Backend) -> None:
    """Forward compatibility: extra keys in a stored record do not stop it loading."""
    raw = record("a").to_json()[:-1] + ',"added_later":{"x":1}}'
    backend.inject("wf", encode_meta("wf"), {"a": raw})
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert checkpoint.completed()["a"].output == "done"


async def test_odd_ids_round_trip(backend: Backend) -> None:
    """Ids with separators, glob characters and non-ASCII are kept apart and listed exactly."""
    odd = ["a/b:c", "x*?[y]", "ünï côdé", "step:meta"]
    for workflow_id in odd:
        for task_id in odd:
            await backend.store.record_step(workflow_id, record(task_id, workflow_id=workflow_id))
    assert await backend.store.list_workflows() == sorted(odd)
    for workflow_id in odd:
        checkpoint = await backend.store.load(workflow_id)
        assert checkpoint is not None
        assert sorted(checkpoint.completed()) == sorted(odd)


def test_one_store_serves_two_event_loops(backend: Backend) -> None:
    """One store object works from successive asyncio.run() calls (a script, a CLI, a notebook)."""
    store = backend.store
    asyncio.run(store.record_step("wf", record("a")))
    asyncio.run(store.record_step("wf", record("b")))
    loaded = asyncio.run(store.load("wf"))
    assert loaded is not None and sorted(loaded.completed()) == ["a", "b"]
    assert asyncio.run(store.list_workflows()) == ["wf"]
    assert asyncio.run(store.delete("wf")) is True


def test_resumed_under_a_second_event_loop_runs_only_the_failed_step(backend: Backend) -> None:
    """The issue's reproduction: step b fails under one asyncio.run; the next run runs b only."""
    ran: list[str] = []
    fail_once = {"b"}

    async def flaky(spec: AgentStepSpec, ctx: object) -> str:
        ran.append(spec.task_id)
        if spec.task_id in fail_once:
            fail_once.discard(spec.task_id)
            raise RuntimeError("fails the first time")
        return f"ok {spec.task_id}"

    executor = LocalExecutor(agents={"flaky": flaky})
    specs = [AgentStepSpec(task_id=t, agent="flaky", description="d", prompt="p") for t in "abc"]
    first = asyncio.run(execute_steps_parallel_resumable(executor, specs, "w1", backend.store))
    assert [o.success for o in first] == [True, False, True]
    assert sorted(ran) == ["a", "b", "c"]
    ran.clear()
    second = asyncio.run(execute_steps_parallel_resumable(executor, specs, "w1", backend.store))
    assert ran == ["b"]
    assert [(o.success, o.output) for o in second] == [
        (True, "ok a"),
        (True, "ok b"),
        (True, "ok c"),
    ]
    assert asyncio.run(backend.store.load("w1")) is None  # full success clears the journal


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
async def test_a_second_store_sees_what_the_first_recorded(backend: Backend) -> None:
    """Durable stores share journals between instances (another process, another machine)."""
    assert backend.reopen is not None
    await backend.store.record_step("wf", record("a", "from-one"))
    other = backend.reopen()
    try:
        checkpoint = await other.load("wf")
        assert checkpoint is not None
        assert checkpoint.completed()["a"].output == "from-one"
        await other.record_step("wf", record("b", "from-two"))
    finally:
        await other.close()
    checkpoint = await backend.store.load("wf")
    assert checkpoint is not None
    assert sorted(checkpoint.completed()) == ["a", "b"]


async def test_concurrent_records_all_land(backend: Backend) -> None:
    """Many steps finishing at once (shared group commits) are each journaled."""
    await asyncio.gather(
        *(
            backend.store.record_step(f"wf{n % 3}", record(f"t{n}", workflow_id=f"wf{n % 3}"))
            for n in range(150)
        )
    )
    for w in range(3):
        checkpoint = await backend.store.load(f"wf{w}")
        assert checkpoint is not None
        assert sorted(checkpoint.completed()) == sorted(f"t{n}" for n in range(w, 150, 3))


async def test_group_commit_coalesces_and_reports_failure_to_every_caller() -> None:
    """Callers arriving together share one write; if it fails, each of them hears so."""
    batches: list[list[str]] = []
    failing = False

    async def write(batch: list[tuple[str, WorkflowStepRecord]]) -> None:
        batches.append([rec.task_id for _, rec in batch])
        if failing:
            raise OSError("disk full")

    group = GroupCommit(write)
    await asyncio.gather(*(group.submit("wf", record(f"t{n}")) for n in range(10)))
    assert batches == [[f"t{n}" for n in range(10)]]
    failing = True
    results = await asyncio.gather(
        *(group.submit("wf", record(f"u{n}")) for n in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, OSError | CheckpointError) for r in results)
    assert all("disk full" in str(r) for r in results)
    failing = False
    await group.submit("wf", record("after"))
    assert batches[-1] == ["after"]


# --- store-specific behaviour ---------------------------------------------------------------


async def test_sqlite_uses_wal_and_creates_its_directory(tmp_path: Path) -> None:
    """The SQLite journal creates missing directories and runs in WAL mode."""
    path = tmp_path / "deep" / "er" / "journal.db"
    async with SQLiteCheckpointStore(path) as store:
        await store.record_step("wf", record("a"))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM fleet_journal_steps").fetchone()[0] == 1
    conn.close()


async def test_sqlite_file_that_is_not_a_database_fails_as_checkpoint_error(
    tmp_path: Path,
) -> None:
    """A garbage file at the journal path is a CheckpointError naming the file."""
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not sqlite" * 100)
    store = SQLiteCheckpointStore(path)
    with pytest.raises(CheckpointError, match="journal.db"):
        await store.load("wf")
    await store.close()


async def test_redis_layout_is_one_hash_per_workflow(redis_url: str, key_prefix: str) -> None:
    """Redis keeps meta and one field per step in {prefix}:journal:{{workflow_id}}."""
    async with RedisCheckpointStore(redis_url, key_prefix=key_prefix) as store:
        await store.record_step("wf", record("a"))
        await store.record_step("wf", record("b"))
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    fields = client.hgetall(f"{key_prefix}:journal:{{wf}}")
    client.close()
    assert sorted(fields) == ["meta", "step:a", "step:b"]
    assert fields["meta"] == '{"schema_version":1,"workflow_id":"wf"}'
    assert WorkflowStepRecord.from_json(fields["step:a"]) is not None


async def test_redis_unreachable_is_a_checkpoint_error_without_the_password() -> None:
    """A Redis that is not there fails the load as CheckpointError, password masked."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    store = RedisCheckpointStore(url)
    with pytest.raises(CheckpointError) as caught:
        await store.load("wf")
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)
    assert "hunter2" not in repr(store)
    await store.close()


def _make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_redis_with_password_and_tls(tmp_path: Path) -> None:
    """rediss:// with a password (and redis:// with one) journal through open_store."""
    cert, key = _make_cert(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        password="s3cret",
        extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                    "--tls-auth-clients", "no"],
    )  # fmt: skip
    server.start()
    try:
        plain = open_store(server.url, key_prefix="pw")
        tls = open_store(
            f"rediss://:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", key_prefix="pw"
        )
        await tls.record_step("wf", record("over-tls"))
        await plain.record_step("wf", record("in-clear"))
        for store in (plain, tls):
            checkpoint = await store.load("wf")
            assert checkpoint is not None
            assert sorted(checkpoint.completed()) == ["in-clear", "over-tls"]
            await store.close()
        wrong = open_store(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(CheckpointError) as caught:
            await wrong.load("wf")
        assert "nope" not in str(caught.value)
        await wrong.close()
    finally:
        server.stop()


def test_open_store_understands_each_target(tmp_path: Path) -> None:
    """open_store maps the store setting to the right store class."""
    assert isinstance(open_store("memory"), MemoryCheckpointStore)
    sqlite_store = open_store(f"sqlite:{tmp_path}/j.db")
    assert isinstance(sqlite_store, SQLiteCheckpointStore)
    assert sqlite_store.path == tmp_path / "j.db"
    assert open_store(f"sqlite://{tmp_path}/k.db").path == tmp_path / "k.db"  # type: ignore[attr-defined]
    redis_store = open_store("rediss://:pw@example.invalid:6380/1", key_prefix="p")
    assert isinstance(redis_store, RedisCheckpointStore)
    assert redis_store.key("w") == "p:journal:{w}"
    assert redis_store.key("w/review#2") == "p:journal:{w}/review#2"


@pytest.mark.parametrize("target", ["postgres://x", "sqlite:", "file:/tmp/x", "mysql://u:pw@h"])
def test_open_store_rejects_unknown_targets(target: str) -> None:
    """An unknown store setting is a ConfigError that lists the accepted forms."""
    with pytest.raises(ConfigError, match="sqlite") as caught:
        open_store(target)
    assert isinstance(caught.value, FleetError)
    assert caught.value.key == "store"
    assert ":pw@" not in str(caught.value)


# --- fleet journal CLI ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def cli_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A store target for the CLI; the key prefix comes from FLEET_KEY_PREFIX like in real use."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'cli.db'}"
    monkeypatch.setenv("FLEET_KEY_PREFIX", request.getfixturevalue("key_prefix"))
    return str(request.getfixturevalue("redis_url"))


async def _seed(target: str, key_prefix: str | None) -> None:
    store = open_store(target, key_prefix=key_prefix or "fleet")
    await store.record_step("cli-wf", record("alpha", "SECRET-OUTPUT", workflow_id="cli-wf"))
    await store.record_step("cli-wf", record("beta", "SECRET-OUTPUT", workflow_id="cli-wf"))
    await store.close()


async def test_cli_show_lists_steps_without_prompt_or_output(cli_store: str) -> None:
    """`fleet journal show` prints task id, agent, success and tokens, never prompt or output."""
    from typer.testing import CliRunner

    from fleet.cli import app

    await _seed(cli_store, os.environ.get("FLEET_KEY_PREFIX"))
    runner = CliRunner()
    shown = await asyncio.to_thread(
        runner.invoke, app, ["journal", "show", "cli-wf", "--store", cli_store]
    )
    assert shown.exit_code == 0, shown.output
    assert "alpha" in shown.output and "beta" in shown.output and "echo" in shown.output
    assert "2 completed steps" in shown.output and " 7 " in shown.output
    assert "SECRET-OUTPUT" not in shown.output and "p-alpha" not in shown.output
    listed = await asyncio.to_thread(runner.invoke, app, ["journal", "list", "--store", cli_store])
    assert listed.output.split() == ["cli-wf"]
    missing = await asyncio.to_thread(
        runner.invoke, app, ["journal", "show", "nope", "--store", cli_store]
    )
    assert missing.exit_code == 1 and "no journal" in missing.output


async def test_cli_rm_asks_first_and_yes_skips_the_question(cli_store: str) -> None:
    """`fleet journal rm` deletes only after confirmation (or with --yes)."""
    from typer.testing import CliRunner

    from fleet.cli import app

    await _seed(cli_store, os.environ.get("FLEET_KEY_PREFIX"))
    runner = CliRunner()
    args = ["journal", "rm", "cli-wf", "--store", cli_store]
    declined = await asyncio.to_thread(runner.invoke, app, args, input="n\n")
    assert declined.exit_code == 1 and "Delete the journal" in declined.output
    store = open_store(cli_store, key_prefix=os.environ.get("FLEET_KEY_PREFIX", "fleet"))
    assert await store.load("cli-wf") is not None
    accepted = await asyncio.to_thread(runner.invoke, app, args, input="y\n")
    assert accepted.exit_code == 0 and "deleted" in accepted.output
    assert await store.load("cli-wf") is None
    await _seed(cli_store, os.environ.get("FLEET_KEY_PREFIX"))
    forced = await asyncio.to_thread(runner.invoke, app, [*args, "--yes"])
    assert forced.exit_code == 0 and "Delete the journal" not in forced.output
    assert await store.load("cli-wf") is None
    await store.close()


async def test_cli_uses_the_configured_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --store the CLI reads FLEET_STORE; an unreadable journal is a CheckpointError."""
    from typer.testing import CliRunner

    from fleet.cli import app

    target = f"sqlite:{tmp_path / 'configured.db'}"
    monkeypatch.setenv("FLEET_STORE", target)
    store = open_store(target)
    await store.save(WorkflowCheckpoint.from_records("cli-wf", [record("a")], schema_version=9))
    await store.close()
    result = await asyncio.to_thread(CliRunner().invoke, app, ["journal", "show", "cli-wf"])
    assert isinstance(result.exception, CheckpointError)
    assert "schema version 9" in str(result.exception)
    removed = await asyncio.to_thread(CliRunner().invoke, app, ["journal", "rm", "cli-wf", "-y"])
    assert removed.exit_code == 0
