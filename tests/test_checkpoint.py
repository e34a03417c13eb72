"""The checkpoint model: versions, step identity, staleness, and fuzzed journal input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import (
    WORKFLOW_CHECKPOINT_SCHEMA_VERSION,
    AgentStepSpec,
    StepOutcome,
    TokenUsage,
    WorkflowCheckpoint,
    WorkflowStepRecord,
)
from fleet.checkpoint import STEP_IDENTITY_DOMAIN, step_identity
from fleet.errors import CheckpointError, FleetError, SpecError
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import MemoryCheckpointStore
from fleet.stores.base import decode_checkpoint
from fleet.stores.memory import _Journal
from tests.test_resumable import EchoExecutor


def spec(task_id: str = "a", **extra: Any) -> AgentStepSpec:
    fields: dict[str, Any] = {"agent": "echo", "description": "d", "prompt": "top secret prompt"}
    fields.update(extra)
    return AgentStepSpec(task_id=task_id, **fields)


def outcome(task_id: str = "a", output: str = "out") -> StepOutcome:
    return StepOutcome(
        task_id=task_id, session_id=f"task-run-{task_id}", agent="echo", output=output, success=True
    )


def test_round_trips_and_exposes_completed_map() -> None:
    """JSON round trip is exact; completed() maps task id to outcome."""
    checkpoint = WorkflowCheckpoint.from_records(
        "wf", [WorkflowStepRecord(task_id="a", outcome=outcome("a"), recorded_ms=1234)]
    )
    again = WorkflowCheckpoint.from_json(checkpoint.to_json())
    assert again == checkpoint
    assert again.to_json() == checkpoint.to_json()
    assert again.schema_version == WORKFLOW_CHECKPOINT_SCHEMA_VERSION == 1
    assert again.checkpoint_ms == 1234
    assert again.completed()["a"].output == "out"
    assert again.steps[0].identity is None


def test_ensure_loadable_rejects_only_future_versions() -> None:
    """Versions 0 and 1 load; 2 is refused with a message naming both versions."""
    for version in (0, 1):
        WorkflowCheckpoint(schema_version=version, workflow_id="wf").ensure_loadable()
    with pytest.raises(CheckpointError, match="schema version 2") as caught:
        WorkflowCheckpoint(schema_version=2, workflow_id="wf").ensure_loadable()
    assert "at most 1" in str(caught.value)


def test_pre_v1_payload_without_schema_version_loads() -> None:
    """A checkpoint JSON without schema_version reads as version 0."""
    checkpoint = WorkflowCheckpoint.from_json(
        '{"workflow_id": "wf", "steps": [], "checkpoint_ms": 5}'
    )
    assert checkpoint.schema_version == 0
    checkpoint.ensure_loadable()


def test_legacy_step_record_without_identity_remains_loadable() -> None:
    """An old record (no identity, no usage, no structured) loads and passes the checks."""
    text = json.dumps(
        {
            "schema_version": 1,
            "workflow_id": "wf",
            "checkpoint_ms": 1,
            "steps": [
                {
                    "task_id": "a",
                    "outcome": {
                        "task_id": "a",
                        "session_id": "s",
                        "agent": "echo",
                        "output": "o",
                        "success": True,
                    },
                    "future_field": [1, 2],
                }
            ],
            "another_future_field": {},
        }
    )
    checkpoint = WorkflowCheckpoint.from_json(text)
    checkpoint.validate_for_specs("wf", [spec("a", prompt="anything")])
    assert checkpoint.completed()["a"].usage == TokenUsage()


def test_identity_is_the_documented_digest_and_holds_no_plaintext() -> None:
    """sha256 over domain, 0x00 and the sorted compact JSON of workflow id + identity fields."""
    s = spec("a", output_schema={"type": "object", "properties": {"é": {"type": "string"}}})
    payload = {"workflow_id": "wf", **s.identity()}
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(STEP_IDENTITY_DOMAIN.encode() + b"\x00" + body.encode()).hexdigest()
    assert step_identity("wf", s) == f"sha256:{expected}"
    assert "secret" not in step_identity("wf", s)


def test_identity_ignores_key_order_and_placement_fields() -> None:
    """Schema key order, max_tokens and timeout_s do not change a step's identity."""
    one = spec("a", output_schema={"type": "object", "required": ["x"]})
    two = spec(
        "a", output_schema={"required": ["x"], "type": "object"}, max_tokens=5, timeout_s=2.0
    )
    assert step_identity("wf", one) == step_identity("wf", two)
    assert step_identity("wf", one) != step_identity("wf2", one)


def test_validate_for_specs_detects_a_reused_task_id() -> None:
    """A record whose identity no longer matches its spec is stale; others pass."""
    record = WorkflowStepRecord.for_outcome("wf", spec("a"), outcome("a"))
    checkpoint = WorkflowCheckpoint.from_records("wf", [record])
    checkpoint.validate_for_specs("wf", [spec("a"), spec("b")])
    checkpoint.validate_for_specs("wf", [spec("b")])  # ids not in specs are not checked
    with pytest.raises(CheckpointError, match="stale result identity for step 'a'") as caught:
        checkpoint.validate_for_specs("wf", [spec("a", prompt="another prompt")])
    assert "secret" not in str(caught.value) and "another prompt" not in str(caught.value)
    with pytest.raises(CheckpointError, match="keyed to 'wf', not 'other'"):
        checkpoint.validate_for_specs("other", [spec("a")])


def test_task_id_mismatch_and_malformed_identity_fail_to_load() -> None:
    """A record whose outcome names another task, or a garbled digest, is refused."""
    mismatched = WorkflowCheckpoint.from_records(
        "wf", [WorkflowStepRecord(task_id="a", outcome=outcome("b"))]
    )
    with pytest.raises(CheckpointError, match="task id mismatch for step 'a'"):
        mismatched.ensure_loadable()
    garbled = WorkflowCheckpoint.from_records(
        "wf", [WorkflowStepRecord(task_id="a", outcome=outcome("a"), identity="md5:abc")]
    )
    with pytest.raises(CheckpointError, match="malformed identity"):
        garbled.ensure_loadable()


def test_for_outcome_refuses_an_outcome_of_another_task() -> None:
    """Journaling b's outcome as step a is refused before it reaches a store."""
    with pytest.raises(CheckpointError, match="names task id 'b'"):
        WorkflowStepRecord.for_outcome("wf", spec("a"), outcome("b"))


# --- fuzz -----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.text(min_size=1, max_size=12)

outcomes_st = st.builds(
    StepOutcome,
    task_id=ids,
    session_id=st.text(max_size=10),
    agent=ids,
    output=st.text(max_size=50),
    success=st.booleans(),
    structured=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    usage=st.builds(
        TokenUsage, prompt_tokens=st.integers(0, 10**9), completion_tokens=st.integers(0, 10**9)
    ),
    duration_s=st.floats(0, 1e6, allow_nan=False),
)


@st.composite
def checkpoints(draw: st.DrawFn) -> WorkflowCheckpoint:
    records = [
        WorkflowStepRecord(
            task_id=item.task_id,
            outcome=item,
            identity=draw(st.none() | st.just("sha256:" + "ab" * 32)),
            recorded_ms=draw(st.integers(0, 2**53)),
        )
        for item in draw(st.lists(outcomes_st, max_size=4))
    ]
    return WorkflowCheckpoint.from_records(
        draw(ids), records, schema_version=draw(st.integers(0, WORKFLOW_CHECKPOINT_SCHEMA_VERSION))
    )


@st.composite
def damaged_cases(draw: st.DrawFn) -> tuple[str, str, str | None]:
    """Valid checkpoint JSON, then truncated, retyped, enlarged, or replaced by junk.

    Returns the text, how it was damaged, and for a retyped field the field's name.
    """
    text = draw(checkpoints()).to_json()
    how = draw(st.sampled_from(["valid", "truncate", "retype", "huge", "deep", "junk"]))
    if how == "truncate":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))], how, None
    if how == "retype":
        data = json.loads(text)
        target = data["steps"][0] if data["steps"] and draw(st.booleans()) else data
        key = draw(st.sampled_from(sorted(target) + ["outcome", "schema_version"]))
        target[key] = draw(json_values)
        return json.dumps(data), how, key
    if how == "huge":
        padding = "x" * draw(st.integers(10_000, 2_000_000))
        return text[:-1] + ',"padding":"' + padding + '"}', how, None
    if how == "deep":
        depth = draw(st.integers(100, 5000))
        return "[" * depth + "]" * depth, how, None
    if how == "junk":
        return json.dumps(draw(json_values)), how, None
    return text, how, None


def damaged() -> st.SearchStrategy[str]:
    return damaged_cases().map(lambda case: case[0])


@given(checkpoints())
def test_valid_checkpoints_round_trip_byte_identically(checkpoint: WorkflowCheckpoint) -> None:
    """serialize -> parse -> serialize is byte-identical for any current checkpoint."""
    text = checkpoint.to_json()
    assert WorkflowCheckpoint.from_json(text).to_json() == text


def expected_problem(text: str) -> str | None:
    """What loading ``text`` must fail with, decided without fleet; None if it may load."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(data, dict):
        return "expected a JSON object"
    if data.get("workflow_id") is None:
        return "workflow_id: "
    return None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_cases())
def test_any_checkpoint_json_loads_or_names_the_problem(case: tuple[str, str, str | None]) -> None:
    """Intact, enlarged or harmlessly retyped journals load; damage fails naming what is wrong."""
    text, how, field = case
    problem = expected_problem(text)
    try:
        loaded = WorkflowCheckpoint.from_json(text)
        loaded.ensure_loadable()
    except (SpecError, CheckpointError) as error:
        message = str(error)
        assert how not in ("valid", "huge"), message
        if problem is not None:
            assert problem in message, (problem, message)
        else:
            assert how == "retype" and field is not None, message
            # Pydantic names the field (``steps.0.outcome.usage``), ensure_loadable its rule.
            assert field in message or (
                field in ("schema_version", "task_id", "identity", "outcome")
                and re.search("schema version|task id mismatch|malformed identity", message)
            ), (field, message)
        return
    assert problem is None, (problem, how)
    assert how in ("valid", "huge", "retype"), how
    if how in ("valid", "huge"):  # the padding is an unknown key: ignored
        assert json.loads(loaded.to_json()) == {
            k: v for k, v in json.loads(text).items() if k != "padding"
        }


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    meta=st.none()
    | st.sampled_from(['{"schema_version":1,"workflow_id":"wf"}'])
    | st.text(max_size=60),
    records=st.dictionaries(st.sampled_from(["a", "b"]), damaged(), max_size=2),
)
def test_damaged_journal_never_runs_a_step(meta: str | None, records: dict[str, str]) -> None:
    """A journal that fails to load runs nothing; one that loads runs only what is missing."""
    store = MemoryCheckpointStore()
    journal = _Journal(meta)  # type: ignore[arg-type]
    journal.steps.update(records)
    store._journals["wf"] = journal
    try:
        completed = decode_checkpoint("wf", meta, list(records.items())).completed()
    except FleetError:
        completed = None
    executor = EchoExecutor(delay_s=0.0)
    specs = [spec("a"), spec("b")]
    results = asyncio.run(execute_steps_parallel_resumable(executor, specs, "wf", store))
    if completed is None:
        assert executor.calls == Counter()
        assert all("cannot be resumed" in r.output for r in results)
        assert "wf" in store._journals  # left in place
    else:
        # Identity digests in fuzzed records never match these specs, so any identity-bearing
        # record fails closed as stale; legacy ones are served. Either way no cached id runs.
        assert not set(executor.calls) & set(completed)
