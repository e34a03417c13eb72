"""Bad input at every boundary a user or the network feeds fleet, fuzzed with hypothesis.

Each boundary may accept what it is given or refuse it with a ``FleetError`` (or, for a
worker's task message, a ``PoisonMessage`` reason) whose message says what is wrong.
Nothing else may come out, no step runs on input that was refused, and a journal that
cannot be trusted is left exactly as it was.

Extends (does not repeat) tests/test_spec.py, tests/test_checkpoint.py (memory journal
JSON fuzz) and tests/test_config.py (random config-file text).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis as redis_sync
from celery.exceptions import Reject
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fleet import AgentStepSpec, StepOutcome, TokenUsage, load_agents
from fleet.agents import AgentRegistry
from fleet.celery import PROTOCOL_VERSION, StepMessage
from fleet.celery.protocol import decode as _parse
from fleet.checkpoint import WorkflowStepRecord
from fleet.cli.app import app
from fleet.config import FleetSettings, load_settings
from fleet.errors import CheckpointError, ConfigError, FleetError, SpecError
from fleet.redis.keys import tagged
from fleet.redis_server import free_port
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import (
    CheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    SQLiteCheckpointStore,
)
from fleet.stores.base import encode_meta
from fleet.stores.memory import _Journal
from tests.test_resumable import EchoExecutor
from workers.tasks import PoisonMessage, WorkerRuntime, run_step

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRET = "MARKER-7f3a-do-not-echo"
"""Planted in prompts, passwords and keys: no error message may repeat it."""

FULL_SPEC: dict[str, Any] = {
    "task_id": "a",
    "agent": "review",
    "description": "review a",
    "prompt": f"look at a {SECRET}",
    "max_steps": 3,
    "parent_session_id": "parent",
    "output_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    "max_tokens": 500,
    "timeout_s": 2.5,
}
FULL_OUTCOME: dict[str, Any] = {
    "task_id": "a",
    "session_id": "task-run-a",
    "agent": "review",
    "output": f"fine {SECRET}",
    "success": True,
    "structured": {"ok": True},
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    "error": "timeout",
    "duration_s": 0.5,
    "worker": "w1@host",
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int, kind: str) -> str:
    """JSON nested ``depth`` levels: arrays, objects, or a chain of ``not`` schemas."""
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return '{"not":' * depth + "{}" + "}" * depth


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> str:
    """``base`` as JSON, then one field retyped, dropped, enlarged or deepened, or the text cut."""
    data = dict(base)
    key = draw(st.sampled_from(sorted(base)))
    how = draw(
        st.sampled_from(
            ["retype", "drop", "huge_str", "huge_int", "deep", "nonfinite", "truncate", "valid"]
        )
    )
    if how == "retype":
        data[key] = draw(json_values)
    elif how == "drop":
        del data[key]
    elif how == "huge_str":
        data[key] = "x" * draw(st.integers(100_000, 1_000_000))
    elif how == "huge_int":
        data[key] = draw(st.sampled_from([2**63, -(2**63) - 1, 10**40, 10**4000]))
    text = json.dumps(data)
    if how == "deep" and key != "structured":
        # (``structured: Any`` nested past 255 levels loads but cannot be serialised: known,
        # reported; ``output_schema`` is capped at MAX_SCHEMA_DEPTH and is fuzzed here.)
        nested = deep(
            draw(st.integers(50, 3000)), draw(st.sampled_from(["array", "object", "not"]))
        )
        text = text[:-1] + f', "{key}_x": 0, "{key}": {nested}}}'
    elif how == "nonfinite" and key != "structured":
        # (``structured: Any`` keeps a NaN/inf as given and writes it as null: known, reported)
        text = text[:-1] + f', "{key}": {draw(st.sampled_from(["1e999", "-1e999", "NaN"]))}}}'
    elif how == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


def assert_clean(error: BaseException, what: str) -> None:
    """A refusal names what it refused and never quotes the planted secret."""
    message = str(error)
    assert message.startswith(f"invalid {what}"), message[:300]
    assert SECRET not in message
    assert "Value error," not in message, message[:300]  # no doubly wrapped errors


# --- spec and outcome JSON ----------------------------------------------------------------


@FUZZ
@given(text=mutated(FULL_SPEC))
@example(text=json.dumps({**FULL_SPEC, "output_schema": None})[:-1] + ', "output_schema": '
         + deep(600, "not") + "}")  # fmt: skip
@example(text=json.dumps({**FULL_SPEC, "timeout_s": 1})[:-1] + ', "timeout_s": 1e999}')
def test_mutated_spec_json_loads_stably_or_raises_spec_error(text: str) -> None:
    """A mutated spec payload loads (and re-serialises stably) or raises a clean SpecError."""
    try:
        spec = AgentStepSpec.from_json(text)
    except SpecError as error:
        assert_clean(error, "AgentStepSpec")
        return
    again = spec.to_json()
    assert AgentStepSpec.from_json(again) == spec
    assert AgentStepSpec.from_json(again).to_json() == again


@FUZZ
@given(text=mutated(FULL_OUTCOME))
@example(text=json.dumps(FULL_OUTCOME)[:-1] + ', "duration_s": 1e999}')
def test_mutated_outcome_json_loads_stably_or_raises_spec_error(text: str) -> None:
    """A mutated outcome payload loads (and re-serialises stably) or raises a clean SpecError."""
    try:
        outcome = StepOutcome.from_json(text)
    except SpecError as error:
        assert_clean(error, "StepOutcome")
        return
    again = outcome.to_json()
    assert StepOutcome.from_json(again) == outcome
    assert StepOutcome.from_json(again).to_json() == again


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_id", 5),
        ("task_id", ""),
        ("agent", ["review"]),
        ("description", None),
        ("prompt", {"text": "p"}),
        ("max_steps", -1),
        ("max_steps", "many"),
        ("max_tokens", -5),
        ("timeout_s", 0),
        ("timeout_s", "soon"),
        ("output_schema", "object"),
        ("output_schema", {"type": 12}),
    ],
)
def test_each_wrong_spec_field_is_named(field: str, value: Any) -> None:
    """A wrong value in any spec field is refused with that field's name."""
    with pytest.raises(SpecError) as caught:
        AgentStepSpec.from_dict({**FULL_SPEC, field: value})
    assert field in str(caught.value)
    assert_clean(caught.value, "AgentStepSpec")


# --- journal records written straight into each store backend -----------------------------


@dataclass
class Raw:
    """One backend's store, plus raw access to what it keeps for a workflow."""

    open: Callable[[], CheckpointStore]
    inject: Callable[[str, object, dict[str, object]], None]
    dump: Callable[[str], object]


def _memory_raw() -> Raw:
    store = MemoryCheckpointStore()

    def inject(workflow_id: str, meta: object, steps: dict[str, object]) -> None:
        journal = _Journal(meta)  # type: ignore[arg-type]
        journal.steps.update(steps)  # type: ignore[arg-type]
        store._journals[workflow_id] = journal

    def dump(workflow_id: str) -> object:
        journal = store._journals.get(workflow_id)
        return None if journal is None else (journal.meta, dict(journal.steps))

    return Raw(lambda: store, inject, dump)


def _sqlite_raw(path: Path) -> Raw:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path)
        conn.executescript(
            "CREATE TABLE IF NOT EXISTS fleet_journal_meta (workflow_id TEXT PRIMARY KEY,"
            " meta TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS fleet_journal_steps (workflow_id TEXT NOT NULL,"
            " task_id TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (workflow_id, task_id))"
            " WITHOUT ROWID;"
        )
        return conn

    def inject(workflow_id: str, meta: object, steps: dict[str, object]) -> None:
        conn = connect()
        with conn:
            if meta is not None:
                conn.execute("INSERT INTO fleet_journal_meta VALUES (?, ?)", (workflow_id, meta))
            for task_id, raw in steps.items():
                conn.execute(
                    "INSERT INTO fleet_journal_steps VALUES (?, ?, ?)", (workflow_id, task_id, raw)
                )
        conn.close()

    def dump(workflow_id: str) -> object:
        conn = connect()
        meta = conn.execute(
            "SELECT meta, typeof(meta) FROM fleet_journal_meta WHERE workflow_id = ?",
            (workflow_id,),
        ).fetchall()
        steps = conn.execute(
            "SELECT task_id, record, typeof(record) FROM fleet_journal_steps "
            "WHERE workflow_id = ? ORDER BY task_id",
            (workflow_id,),
        ).fetchall()
        conn.close()
        return meta, steps

    return Raw(lambda: SQLiteCheckpointStore(path), inject, dump)


def _redis_raw(url: str, prefix: str) -> Raw:
    def key(workflow_id: str) -> str:
        return f"{prefix}:journal:{tagged(workflow_id)}"

    def inject(workflow_id: str, meta: object, steps: dict[str, object]) -> None:
        client = redis_sync.Redis.from_url(url)
        mapping: dict[Any, Any] = {} if meta is None else {"meta": meta}
        for task_id, raw in steps.items():
            mapping[task_id if isinstance(task_id, bytes) else f"step:{task_id}"] = raw
        client.hset(key(workflow_id), mapping=mapping)
        client.close()

    def dump(workflow_id: str) -> object:
        client = redis_sync.Redis.from_url(url)
        fields = client.hgetall(key(workflow_id))
        client.close()
        return sorted(fields.items())

    return Raw(lambda: RedisCheckpointStore(url, key_prefix=prefix), inject, dump)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def raw(request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str) -> Raw:
    if request.param == "memory":
        return _memory_raw()
    if request.param == "sqlite":
        return _sqlite_raw(tmp_path / "journal.db")
    return _redis_raw(request.getfixturevalue("redis_url"), key_prefix)


def spec(task_id: str) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="echo", description="d", prompt=f"p-{task_id}")


def record_json(workflow_id: str, task_id: str) -> str:
    outcome = StepOutcome(
        task_id=task_id,
        session_id=f"task-run-{task_id}",
        agent="echo",
        output=f"ran:p-{task_id}",
        success=True,
        usage=TokenUsage(prompt_tokens=1, completion_tokens=2),
        worker="echo",
    )
    return WorkflowStepRecord.for_outcome(workflow_id, spec(task_id), outcome).to_json()


WRONG_TYPES: dict[tuple[str, ...], list[Any]] = {
    ("task_id",): [5, None, ["a"], {"a": 1}, True],
    ("outcome",): [5, "ok", ["a"], None],
    ("outcome", "task_id"): [5, None, ["a"], "someone-else"],
    ("outcome", "success"): [["yes"], {"a": 1}, "maybe", None, 2],
    ("outcome", "output"): [5, None, ["out"]],
    ("outcome", "usage"): ["lots", [1], {"prompt_tokens": -1}],
    ("outcome", "duration_s"): [-1, "slow", [1.0]],
    ("identity",): ["sha256:xyz", 5, "md5:" + "0" * 32, ["sha256:"]],
    ("recorded_ms",): ["soon", 1.5, [1], {"ms": 1}],
}


@st.composite
def damaged_journal(draw: st.DrawFn, workflow_id: str) -> tuple[object, dict[str, object]]:
    """(meta, {task id: record}) a store must refuse: every variant is untrustworthy."""
    meta: object = encode_meta(workflow_id)
    good = {task_id: record_json(workflow_id, task_id) for task_id in ("a", "b")}
    steps: dict[str, object] = dict(good)
    target = draw(st.sampled_from(["a", "b"]))
    how = draw(
        st.sampled_from(
            ["truncate", "retype", "junk", "deep", "huge", "swapped", "meta", "meta_version"]
        )
    )
    if how == "truncate":
        text = good[target]
        steps[target] = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "retype":
        path = draw(st.sampled_from(sorted(WRONG_TYPES)))
        data = json.loads(good[target])
        holder = data
        for part in path[:-1]:
            holder = holder[part]
        holder[path[-1]] = draw(st.sampled_from(WRONG_TYPES[path]))
        steps[target] = json.dumps(data)
    elif how == "junk":
        steps[target] = json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    elif how == "deep":
        steps[target] = deep(
            draw(st.integers(100, 5000)), draw(st.sampled_from(["array", "object"]))
        )
    elif how == "huge":
        steps[target] = good[target][:-1] + ',"pad":"' + "x" * draw(st.integers(10_000, 1_000_000))
    elif how == "swapped":
        steps[target] = good["b" if target == "a" else "a"]
    elif how == "meta":
        meta = draw(
            st.sampled_from(['{"schema_version":1', "[]", '"meta"', "null", "{", ""])
            | st.builds(lambda wid: encode_meta(wid), st.text(max_size=10))
        )
        assume(meta != encode_meta(workflow_id))
    else:
        version = draw(st.sampled_from([2, 99, 2**40, -1, "1", 1.5, True, None, [1]]))
        meta = json.dumps({"schema_version": version, "workflow_id": workflow_id})
    return meta, steps


def _refused(raw: Raw, workflow_id: str) -> None:
    """A resumable round over ``raw``'s journal runs nothing and leaves it byte-identical."""
    before = raw.dump(workflow_id)
    executor = EchoExecutor(delay_s=0.0)

    async def attempt() -> list[StepOutcome]:
        store = raw.open()
        try:
            with pytest.raises(CheckpointError) as caught:
                await store.load(workflow_id)
            assert SECRET not in str(caught.value)
            return await execute_steps_parallel_resumable(
                executor, [spec("a"), spec("b")], workflow_id, store
            )
        finally:
            await store.close()

    outcomes = asyncio.run(attempt())
    assert not executor.calls, "a step ran on an untrusted journal"
    for outcome in outcomes:
        assert (outcome.success, outcome.error) == (False, "checkpoint")
        assert "cannot be resumed" in outcome.output
    assert raw.dump(workflow_id) == before, "the journal changed"


@FUZZ
@given(data=st.data())
def test_damaged_journal_in_any_store_fails_closed_and_is_kept(
    raw: Raw, data: st.DataObject
) -> None:
    """Corrupt, truncated, retyped, oversized or foreign records: nothing runs, nothing is lost."""
    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    meta, steps = data.draw(damaged_journal(workflow_id))
    raw.inject(workflow_id, meta, steps)
    _refused(raw, workflow_id)


@pytest.mark.parametrize(
    ("meta", "value"),
    [(None, 5), (None, 1.5), (None, b"\xff\xfe not utf-8"), (7, None), (b"\x00\x01", None)],
)
def test_sqlite_rows_of_the_wrong_storage_type_fail_closed(
    tmp_path: Path, meta: object, value: object
) -> None:
    """SQLite keeps whatever type a row was given: integers, reals and blobs are refused."""
    raw = _sqlite_raw(tmp_path / "journal.db")
    workflow_id = "wf"
    steps: dict[str, object] = {"a": record_json(workflow_id, "a")}
    if value is not None:
        steps["b"] = value
    raw.inject(workflow_id, encode_meta(workflow_id) if meta is None else meta, steps)
    _refused(raw, workflow_id)


@pytest.mark.parametrize(
    "fields",
    [
        {"step:b": b"\xff\xfe\xfd"},  # not UTF-8
        {b"\xff-field": b"{}"},  # a field name that is not UTF-8
        {b"extra": b"1"},  # a field that is neither meta nor a step
        {b"step:": b"{}"},  # a step with an empty task id
    ],
)
def test_redis_hash_fields_fleet_never_writes_fail_closed(
    redis_url: str, key_prefix: str, fields: dict[Any, bytes]
) -> None:
    """Foreign or undecodable fields in a Redis journal hash are refused, never skipped."""
    raw = _redis_raw(redis_url, key_prefix)
    workflow_id = "wf"
    client = redis_sync.Redis.from_url(redis_url)
    key = f"{key_prefix}:journal:{{{workflow_id}}}"
    client.hset(key, mapping={"meta": encode_meta(workflow_id), "step:a": record_json("wf", "a")})
    client.hset(key, mapping=fields)  # type: ignore[arg-type]
    client.close()
    _refused(raw, workflow_id)


# --- config files: fleet.toml and the agents file ------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML literal for ``value`` (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    items = ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
    return "{" + items + "}"


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
SETTING_NAMES = sorted(FleetSettings.model_fields)


@FUZZ
@given(
    key=st.sampled_from(SETTING_NAMES),
    value=st.lists(toml_scalars, max_size=3) | st.dictionaries(st.text(max_size=6), toml_scalars),
    others=st.dictionaries(st.sampled_from(SETTING_NAMES), toml_values, max_size=3),
)
def test_config_file_with_a_table_or_array_setting_names_the_key(
    key: str,
    value: Any,
    others: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No setting takes an array or a table: such a file is refused, naming that key."""
    path = tmp_path_factory.mktemp("cfg") / "fleet.toml"
    lines = [f"{name} = {toml_value(v)}" for name, v in others.items() if name != key]
    path.write_text("\n".join([*lines, f"{key} = {toml_value(value)}"]) + "\n", encoding="utf-8")
    monkeypatch.setenv("FLEET_CONFIG", str(path))
    for name in SETTING_NAMES:
        monkeypatch.delenv(f"FLEET_{name.upper()}", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert f"{key} (FLEET_{key.upper()})" in str(caught.value)


@FUZZ
@given(key=st.sampled_from(SETTING_NAMES), value=st.text(max_size=30))
def test_any_environment_value_loads_or_names_its_variable(key: str, value: str) -> None:
    """Whatever a FLEET_* variable holds, settings load or the error names that variable."""
    assume("\x00" not in value)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("FLEET_CONFIG", raising=False)
        for name in SETTING_NAMES:
            env.delenv(f"FLEET_{name.upper()}", raising=False)
        env.setenv(f"FLEET_{key.upper()}", value)
        try:
            loaded = load_settings()
        except ConfigError as error:
            assert f"FLEET_{key.upper()}" in str(error)
            return
    assert isinstance(loaded, FleetSettings)


_TOP_LEVEL = set(sys.stdlib_module_names) | {"fleet", "tests", "workers", "bench", "examples"}
unimportable = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=12
).filter(lambda name: name.split(".")[0].split(":")[0] not in _TOP_LEVEL)
targets = st.sampled_from(
    [
        ".relative:fn",
        "..up:fn",
        "a..b:fn",
        ":fn",
        "module:",
        "no_colon",
        "tests.agents:not_there",
        "tests.agents:_append",  # a sync function
        "tests.agents:slow_echo",  # valid
        "tests.agents:slow_echo.attr",
        "fleet.errors:FleetError",  # a class, not an async function
    ]
) | st.builds(lambda m, f: f"{m}:{f}", unimportable, unimportable)
python_tables = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.just("python"),
        "target": targets | toml_scalars,
        "reserve_tokens": st.integers(-5, 10**6)
        | st.booleans()
        | st.text(max_size=4)
        | st.floats(allow_nan=False, allow_infinity=False),
    },
)
openai_tables = st.fixed_dictionaries(
    {"kind": st.just("openai")},
    optional={
        "base_url": st.just("http://127.0.0.1:9/v1") | toml_scalars,
        "model": st.just("m") | toml_scalars,
        "api_key": st.just(SECRET),
        "api_key_env": st.text(max_size=10) | st.integers(),
        "temperature": st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=3),
        "max_tokens": st.integers(-10, 10**6) | st.text(max_size=3),
        "timeout_s": st.floats(-1, 100) | st.text(max_size=3),
        "tools": st.lists(targets | toml_values, max_size=3) | toml_scalars,
        "unknown_key": toml_scalars,
    },
)
odd_tables = st.fixed_dictionaries({"kind": toml_values}) | toml_values
agent_names = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8
)


@FUZZ
@given(tables=st.dictionaries(agent_names, python_tables | openai_tables | odd_tables, max_size=3))
@example(tables={"a": {"kind": "python", "target": ".relative:fn"}})
@example(tables={"a": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                       "tools": [".relative:fn"]}})  # fmt: skip
@example(tables={"a": {"kind": "python", "target": "tests.agents:slow_echo",
                       "reserve_tokens": True}})  # fmt: skip
def test_agents_file_loads_or_names_the_file_and_key(
    tables: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Any agents file loads exactly its agents or raises a ConfigError naming file and key."""
    path = tmp_path_factory.mktemp("agents") / "agents.toml"
    chunks = []
    for name, table in tables.items():
        if isinstance(table, dict):
            body = "".join(f"{toml_value(k)} = {toml_value(v)}\n" for k, v in table.items())
            chunks.append(f"[agents.{toml_value(name)}]\n{body}")
        else:
            chunks.append(f"[agents]\n{toml_value(name)} = {toml_value(table)}\n")
    path.write_text("\n".join(chunks), encoding="utf-8")
    try:
        agents = load_agents(path)
    except ConfigError as error:
        message = str(error)
        assert str(path) in message, message
        assert SECRET not in message
        assert error.key, message
        assert (
            error.key == str(path)
            or error.key.startswith(("agents.", str(path)))
            or (
                ":" in error.key  # a target, as written
            )
        ), error.key
        assert not error.key.endswith("."), error.key  # names a field, not "agents.x."
        return
    assert set(agents) == set(tables)
    for table in tables.values():
        reserve = table.get("reserve_tokens") if isinstance(table, dict) else None
        assert reserve is None or (type(reserve) is int and reserve >= 0)


# --- CLI arguments --------------------------------------------------------------------------

runner = CliRunner()


def invoke(args: list[str]) -> Any:
    """Run ``fleet ARGS`` in-process; only a clean exit or a FleetError may come out."""
    result = runner.invoke(app, args, catch_exceptions=True)
    error = result.exception
    shown = f"fleet {args!r} -> {type(error).__name__}: {error}\n{result.output[-2000:]}"
    # SystemExit: click's usage errors (exit 2) and typer.Exit; FleetError: `fleet`'s
    # entry point prints it as one line and exits with 2. Anything else is a traceback.
    assert error is None or isinstance(error, SystemExit | FleetError), shown
    assert "Traceback" not in result.output, shown
    assert SECRET not in result.output and SECRET not in str(error), shown
    return result


@pytest.fixture
def cli_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str
) -> Path:
    """Settings that point the CLI at this test's Redis prefix and a temporary journal."""
    config = tmp_path / "fleet.toml"
    config.write_text("")
    for name in SETTING_NAMES:
        monkeypatch.delenv(f"FLEET_{name.upper()}", raising=False)
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    monkeypatch.setenv("FLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("FLEET_KEY_PREFIX", key_prefix)
    monkeypatch.setenv("FLEET_STORE", f"sqlite:{tmp_path / 'journal.db'}")
    monkeypatch.setenv("FLEET_AGENTS_FILE", str(tmp_path / "no-agents.toml"))

    def no_exec(args: list[str], env: dict[str, str]) -> None:
        raise AssertionError(f"the fuzzer started a process: {args}")

    monkeypatch.setattr("fleet.cli.fleetops._exec", no_exec)
    return tmp_path


closed_port = free_port()
redis_urls = st.sampled_from(
    [
        "junk",
        "",
        "http://127.0.0.1:1/0",
        f"redis://:{SECRET}@127.0.0.1:{closed_port}/0",
        f"rediss://:{SECRET}@127.0.0.1:{closed_port}/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/notadb",
        f"redis://:{SECRET}@[::1/0",
        "unix:///nonexistent/redis.sock",
    ]
)
stores = redis_urls | st.sampled_from(
    ["memory", "sqlite:", "sqlite:/proc/none/x.db", "sqlite:\x00", "postgres://u:p@h/db", "file:x"]
)
COMMANDS = {"up", "demo", "worker", "flower", "run", "watch", "status", "journal", "budget"}
ids = st.text(max_size=20).filter(lambda s: "\x00" not in s)
words = st.text(max_size=12).filter(
    lambda s: "\x00" not in s and s not in COMMANDS
) | st.sampled_from(
    ["--help", "--yes", "-y", "--store", "--redis-url", "--key-prefix", "--", "-1", "none"]
)


@st.composite
def journal_args(draw: st.DrawFn) -> list[str]:
    sub = draw(st.sampled_from(["list", "show", "rm", "nope"]))
    args = ["journal", sub]
    if sub in ("show", "rm") or draw(st.booleans()):
        args.append(draw(ids))
    if draw(st.booleans()):
        args += ["--store", draw(stores)]
    if sub == "rm":
        args.append("--yes")
    return args + draw(st.lists(words, max_size=2))


@st.composite
def budget_args(draw: st.DrawFn) -> list[str]:
    sub = draw(st.sampled_from(["show", "set", "nope"]))
    args = ["budget", sub, draw(ids)]
    if sub == "set":
        args.append(draw(st.text(max_size=8) | st.integers().map(str) | st.just("none")))
    if draw(st.booleans()):
        args += ["--redis-url", draw(redis_urls)]
    return args + draw(st.lists(words, max_size=2))


@st.composite
def run_args(draw: st.DrawFn) -> list[str]:
    target = draw(
        st.sampled_from(["", ".foo", ":", "x.py:main", "/no/such/flow.py", "a..b", "pkg.:m"])
        | unimportable
    )
    args = ["run", target]
    for option, values in [
        ("--budget", st.integers(-5, 10).map(str) | st.text(max_size=4)),
        ("--store", stores),
        ("--executor", st.sampled_from(["local", "celery", "mars"])),
        ("--concurrency", st.integers(-1, 3).map(str) | st.text(max_size=3)),
        ("--event-stream", st.sampled_from(["auto", "off", "junk"]) | redis_urls),
    ]:
        if draw(st.booleans()):
            args += [option, draw(values)]
    return args


@st.composite
def status_args(draw: st.DrawFn) -> list[str]:
    args = ["status", draw(ids)]
    if draw(st.booleans()):
        args += ["--store", draw(stores)]
    return args + draw(st.lists(words, max_size=1))


@st.composite
def refused_process_args(draw: st.DrawFn) -> list[str]:
    """demo, worker, flower: always with one value the parser refuses (nothing starts)."""
    command = draw(st.sampled_from(["demo", "worker", "flower"]))
    bad = {
        "demo": ["--concurrency=0", "--workers=-1", "--concurrency=many", "--no-such-option"],
        "worker": ["--concurrency=0", "--pool=forks", "-c", "--no-such-option"],
        "flower": ["--port=0", "--port=70000", "--port=http", "--no-such-option"],
    }[command]
    extra = draw(st.lists(words.filter(lambda w: w != "--help"), max_size=2))
    return [command, *extra, draw(st.sampled_from(bad))]


@FUZZ
@given(
    args=journal_args()
    | budget_args()
    | run_args()
    | status_args()
    | refused_process_args()
    | st.lists(words, max_size=4)
)
@example(args=["journal", "show", "wf", "--store", "redis://127.0.0.1:99999/0"])
@example(args=["journal", "list", "--store", "sqlite:/proc/none/x.db"])
@example(args=["journal", "list", "--store", "sqlite:\x00"])
@example(args=["budget", "show", "wf", "--redis-url", "junk"])
@example(args=["budget", "show", "wf", "--redis-url", "redis://127.0.0.1:99999/0"])
@example(args=["run", ""])
@example(args=["run", ".foo"])
@example(args=["status", "wf", "--store", "redis://127.0.0.1:99999/0"])
def test_cli_never_shows_a_traceback(args: list[str], cli_env: Path) -> None:
    """Random and invalid command lines end in a usage error, a clean message or a FleetError."""
    invoke(args)


def test_fleet_entry_point_turns_a_fleet_error_into_exit_2(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `fleet` prints for a FleetError: one line on stderr, exit code 2, no traceback."""
    from fleet.cli import main

    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    monkeypatch.setattr(sys, "argv", ["fleet", "journal", "show", "wf", "--store", url])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "cannot read a workflow" in err
    assert "Traceback" not in err and SECRET not in err


def test_fleet_watch_survives_foreign_stream_entries(
    cli_env: Path, redis_url: str, key_prefix: str
) -> None:
    """`fleet watch` reads events from the network: a junk entry is reported, not a crash."""
    from fleet.eventbus import event_stream_key

    key = event_stream_key("wf", key_prefix=key_prefix)
    client = redis_sync.Redis.from_url(redis_url)
    client.xadd(key, {"control": "start", "run": "r"})
    client.xadd(key, {"event": "{not json"})
    client.xadd(key, {"event": json.dumps({"type": "step_started", "task_id": 5})})
    client.xadd(key, {"control": "end", "status": "finished"})
    client.close()
    result = invoke(["watch", "wf", "--timeout", "5"])
    assert result.exception is None or isinstance(result.exception, SystemExit | FleetError)


# --- the Celery task payload ----------------------------------------------------------------

VALID_MESSAGE: dict[str, Any] = {
    "v": PROTOCOL_VERSION,
    "spec": {**FULL_SPEC, "agent": "count"},
    "reply": "fz:reply:host",
    "nonce": "n1",
}
MESSAGE_REQUIRED_TYPES: dict[str, list[Any]] = {
    "v": [None, "1", 2, 0, [1], {"v": 1}, 1.5],
    "spec": [None, "spec", 5, [], {"task_id": "a"}],
    "reply": [None, 5, ["r"], "elsewhere:reply:x"],
    "nonce": [None, 5, ["n"]],
}


@st.composite
def poison_payloads(draw: st.DrawFn) -> object:
    """Payloads a worker must refuse: each is broken in a way it cannot repair."""
    how = draw(st.sampled_from(["type", "field", "drop", "truncate", "junk", "bigint", "spec"]))
    data = json.loads(json.dumps(VALID_MESSAGE))
    if how == "type":
        return draw(st.binary(max_size=20) | st.integers() | st.lists(st.text(), max_size=2))
    if how == "field":
        key = draw(st.sampled_from(sorted(MESSAGE_REQUIRED_TYPES)))
        data[key] = draw(st.sampled_from(MESSAGE_REQUIRED_TYPES[key]))
    elif how == "drop":
        del data[draw(st.sampled_from(sorted(MESSAGE_REQUIRED_TYPES)))]
    elif how == "spec":
        key = draw(st.sampled_from(["task_id", "agent", "description", "prompt", "max_steps"]))
        data["spec"][key] = draw(st.sampled_from([[1], {"a": 1}]))
    text = json.dumps(data)
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "junk":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if how == "bigint":
        return text[:-1] + ', "v": ' + "9" * 5000 + "}"
    return text


@pytest.fixture
def worker_runtime(redis_url: str, tmp_path: Path) -> Iterator[tuple[WorkerRuntime, list[str]]]:
    """A worker's runtime (no Celery process) whose one agent records every run."""
    ran: list[str] = []

    async def count(step: AgentStepSpec, ctx: Any) -> str:
        ran.append(step.task_id)
        return "ran"

    config = FleetSettings(redis_url=redis_url, key_prefix="fz", agents_file=tmp_path / "none.toml")
    yield WorkerRuntime(config, AgentRegistry({"count": count}), {}), ran


@FUZZ
@given(payload=poison_payloads())
def test_poison_step_payloads_are_rejected_with_a_reason_and_never_run(
    payload: object, worker_runtime: tuple[WorkerRuntime, list[str]]
) -> None:
    """The decode/validate step of fleet.run_step refuses bad payloads; the agent never runs."""
    runtime, ran = worker_runtime
    with pytest.raises(PoisonMessage) as caught:
        message = _parse(StepMessage, payload)
        runtime.check_reply(message.reply)
    assert str(caught.value) and SECRET not in str(caught.value)
    request = SimpleNamespace(id=f"fz-{uuid.uuid4().hex[:8]}", hostname="fuzz@host")
    with pytest.raises(Reject, match="poison message"):
        run_step(runtime, request, payload)
    assert ran == []


def test_nested_spec_errors_in_a_payload_name_the_field_path() -> None:
    """A bad field inside the message's spec is named by its path, not wrapped twice."""
    data = json.loads(json.dumps(VALID_MESSAGE))
    data["spec"]["task_id"] = 5
    with pytest.raises(PoisonMessage) as caught:
        _parse(StepMessage, json.dumps(data))
    assert "spec.task_id" in str(caught.value)
    assert "Value error" not in str(caught.value)


@pytest.mark.parametrize("kind", ["array", "object"])
def test_deeply_nested_step_payload_is_poison(
    kind: str, worker_runtime: tuple[WorkerRuntime, list[str]]
) -> None:
    """JSON nested past the parser's recursion limit is a poison message, not a crash."""
    runtime, ran = worker_runtime
    payload = json.dumps(VALID_MESSAGE)[:-1] + ', "x": ' + deep(100_000, kind) + "}"
    with pytest.raises(PoisonMessage):
        _parse(StepMessage, payload)
    request = SimpleNamespace(id="fz-deep", hostname="fuzz@host")
    with pytest.raises(Reject, match="poison message"):
        run_step(runtime, request, payload)
    assert ran == []


def test_deep_output_schema_in_a_payload_is_poison(
    worker_runtime: tuple[WorkerRuntime, list[str]],
) -> None:
    """An output_schema nested too deeply to check is refused like any invalid spec."""
    data = json.loads(json.dumps(VALID_MESSAGE))
    data["spec"]["output_schema"] = None
    text = json.dumps(data).replace('"output_schema": null', '"output_schema": ' + deep(600, "not"))
    with pytest.raises(PoisonMessage, match="output_schema"):
        _parse(StepMessage, text)
