"""The resumable fan-out: journaled steps never run twice, untrusted journals run nothing."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleet import (
    AgentExecutor,
    AgentStepSpec,
    LocalExecutor,
    StepOutcome,
    TokenUsage,
)
from fleet.checkpoint import WorkflowCheckpoint, WorkflowStepRecord, step_identity
from fleet.events import EventSink, StepFinished, StepStarted
from fleet.executor import OutcomeCallback
from fleet.resumable import execute_steps_parallel_resumable
from fleet.stores import (
    CheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    SQLiteCheckpointStore,
)
from fleet.stores.base import encode_meta


class EchoExecutor(AgentExecutor):
    """The reference test executor: output = "ran:" + prompt after a short sleep.

    Agent ``fail`` fails, ``boom`` raises; every call is counted by task id.
    """

    def __init__(self, *, hint: int = 4, delay_s: float = 0.015, fail_ids: Sequence[str] = ()):
        self.hint = hint
        self.delay_s = delay_s
        self.fail_ids = set(fail_ids)
        self.calls: Counter[str] = Counter()
        self.active = 0
        self.peak = 0

    def concurrency_hint(self) -> int:
        return self.hint

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        self.calls[spec.task_id] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.active -= 1
        if spec.agent == "boom":
            raise RuntimeError("boom")
        if spec.agent == "fail" or spec.task_id in self.fail_ids:
            return StepOutcome.failed(spec.task_id, spec.agent, "killed in flight")
        return StepOutcome(
            task_id=spec.task_id,
            session_id=f"task-run-{spec.task_id}",
            agent=spec.agent,
            output=f"ran:{spec.prompt}",
            success=True,
            usage=TokenUsage(prompt_tokens=1, completion_tokens=2),
            duration_s=self.delay_s,
            worker="echo",
        )


def spec(
    task_id: str, agent: str = "echo", prompt: str | None = None, **extra: Any
) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id,
        agent=agent,
        description=f"step {task_id}",
        prompt=prompt if prompt is not None else task_id,
        **extra,
    )


def cached_record(workflow_id: str, s: AgentStepSpec, output: str) -> WorkflowStepRecord:
    outcome = StepOutcome(
        task_id=s.task_id,
        session_id="original-session",
        agent=s.agent,
        output=output,
        success=True,
        usage=TokenUsage(prompt_tokens=5, completion_tokens=6),
        duration_s=1.5,
        worker="worker9@elsewhere",
    )
    return WorkflowStepRecord.for_outcome(workflow_id, s, outcome)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> AsyncIterator[CheckpointStore]:
    made: CheckpointStore
    if request.param == "memory":
        made = MemoryCheckpointStore()
    elif request.param == "sqlite":
        made = SQLiteCheckpointStore(tmp_path / "journal.db")
    else:
        made = RedisCheckpointStore(request.getfixturevalue("redis_url"), key_prefix=key_prefix)
    try:
        yield made
    finally:
        await made.close()


# --- ported from the reference combinator tests (§4.2) --------------------------------------


async def test_resumable_skips_completed_then_clears_on_success(store: CheckpointStore) -> None:
    """A journaled step is served unchanged without running; full success deletes the journal."""
    a, b = spec("a"), spec("b")
    await store.record_step("wf", cached_record("wf", a, "CACHED-SENTINEL"))
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(executor, [a, b], "wf", store)
    assert executor.calls == Counter({"b": 1})
    assert [o.task_id for o in outcomes] == ["a", "b"]
    assert outcomes[0].output == "CACHED-SENTINEL"
    assert outcomes[0].session_id == "original-session"
    assert outcomes[0].worker == "worker9@elsewhere"
    assert outcomes[0].usage.total_tokens == 11
    assert outcomes[1].output == "ran:b"
    assert await store.load("wf") is None


async def test_resumable_fences_a_cached_result_when_step_identity_changes(
    store: CheckpointStore,
) -> None:
    """Same task id, new prompt: nothing runs, the step fails as stale, the journal stays."""
    await store.record_step("wf", cached_record("wf", spec("a", prompt="old prompt"), "old"))
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [spec("a", prompt="new prompt"), spec("b")], "wf", store
    )
    assert executor.calls == Counter()
    assert [o.success for o in outcomes] == [False, False]
    assert all(o.error == "checkpoint" for o in outcomes)
    assert "stale" in outcomes[0].output
    assert "cannot be resumed" in outcomes[0].output
    assert "old prompt" not in outcomes[0].output and "new prompt" not in outcomes[0].output
    assert await store.load("wf") is not None


async def test_resumable_retains_journal_recording_only_successes_on_partial_failure(
    store: CheckpointStore,
) -> None:
    """[ok, bad]: the journal is kept and holds only "ok", bound to its spec's identity."""
    ok, bad = spec("ok"), spec("bad", agent="fail")
    outcomes = await execute_steps_parallel_resumable(EchoExecutor(), [ok, bad], "wf", store)
    assert [o.success for o in outcomes] == [True, False]
    checkpoint = await store.load("wf")
    assert checkpoint is not None
    assert list(checkpoint.completed()) == ["ok"]
    assert checkpoint.steps[0].identity == step_identity("wf", ok)
    assert checkpoint.steps[0].outcome == outcomes[0]


async def test_resumable_fails_closed_when_checkpoint_load_errors(store: CheckpointStore) -> None:
    """A future-version journal: nothing runs, every outcome says it cannot be resumed."""
    await store.save(
        WorkflowCheckpoint.from_records(
            "wf", [cached_record("wf", spec("a"), "x")], schema_version=2
        )
    )
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [spec("a"), spec("b"), spec("c")], "wf", store
    )
    assert executor.calls == Counter()
    assert all(not o.success and o.error == "checkpoint" for o in outcomes)
    assert all("cannot be resumed" in o.output and "schema version 2" in o.output for o in outcomes)
    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    assert await store.list_workflows() == ["wf"]


async def test_resumable_ignores_checkpointed_steps_absent_from_new_specs(
    store: CheckpointStore,
) -> None:
    """Journal {a, b}, new round [b, c]: only c runs; output follows the new list."""
    for s in (spec("a"), spec("b")):
        await store.record_step("wf", cached_record("wf", s, f"cached-{s.task_id}"))
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(executor, [spec("b"), spec("c")], "wf", store)
    assert executor.calls == Counter({"c": 1})
    assert [o.output for o in outcomes] == ["cached-b", "ran:c"]


async def test_duplicate_task_id_does_not_report_one_step_as_the_other(
    store: CheckpointStore,
) -> None:
    """[dup, dup, keep]: only keep runs; both dups fail as duplicated, with no foreign output."""
    executor = EchoExecutor(hint=1)
    specs = [spec("dup", prompt="first"), spec("dup", prompt="second"), spec("keep")]
    outcomes = await execute_steps_parallel_resumable(executor, specs, "wf", store)
    assert executor.calls == Counter({"keep": 1})
    for outcome in outcomes[:2]:
        assert not outcome.success
        assert outcome.error == "duplicate_task_id"
        assert "duplicated" in outcome.output
        assert "first" not in outcome.output and "second" not in outcome.output
    assert outcomes[2].success
    checkpoint = await store.load("wf")  # never all-success, so the journal is kept
    assert checkpoint is not None and list(checkpoint.completed()) == ["keep"]


async def test_zero_concurrency_hint_still_makes_progress(store: CheckpointStore) -> None:
    """A hint of 0 (or less) runs the steps one at a time, in order."""
    for hint in (0, -3):
        executor = EchoExecutor(hint=hint, delay_s=0.001)
        outcomes = await execute_steps_parallel_resumable(
            executor, [spec("a"), spec("b"), spec("c")], f"wf{hint}", store
        )
        assert [o.output for o in outcomes] == ["ran:a", "ran:b", "ran:c"]
        assert executor.peak == 1


async def test_resume_soak_does_not_repeat_completed_steps(store: CheckpointStore) -> None:
    """15 workflows x 2 steps; step 2 dies once; the second pass re-runs only step 2."""
    first = EchoExecutor(hint=1, delay_s=0.0, fail_ids=["step-2"])
    second = EchoExecutor(hint=1, delay_s=0.0)
    rounds = {f"soak-{n}": [spec("step-1"), spec("step-2")] for n in range(15)}
    for workflow_id, specs in rounds.items():
        outcomes = await execute_steps_parallel_resumable(first, specs, workflow_id, store)
        assert [o.success for o in outcomes] == [True, False]
    succeeded = Counter[str]()
    for workflow_id, specs in rounds.items():
        outcomes = await execute_steps_parallel_resumable(second, specs, workflow_id, store)
        assert all(o.success for o in outcomes)
        succeeded.update(o.task_id for o in outcomes if o.success)
    assert first.calls["step-1"] + second.calls["step-1"] == 15
    assert second.calls == Counter({"step-2": 15})
    assert succeeded["step-2"] == 15
    assert await store.list_workflows() == []

    await store.save(WorkflowCheckpoint(schema_version=2, workflow_id="future"))
    third = EchoExecutor(hint=1, delay_s=0.0)
    outcomes = await execute_steps_parallel_resumable(
        third, [spec("step-1"), spec("step-2")], "future", store
    )
    assert third.calls == Counter()
    assert all("cannot be resumed" in o.output for o in outcomes)


# --- further semantics (DESIGN §2, reference §3.5 and §4.9) ----------------------------------


@pytest.mark.parametrize(
    "changed",
    [
        {"agent": "other"},
        {"prompt": "different"},
        {"description": "renamed"},
        {"max_steps": 3},
        {"parent_session_id": "parent-7"},
        {"output_schema": {"type": "object"}},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_every_identity_field_change_is_stale(changed: dict[str, Any]) -> None:
    """Changing any identity field of a journaled step fences its cached result."""
    store = MemoryCheckpointStore()
    original = spec("a")
    await store.record_step("wf", cached_record("wf", original, "cached"))
    fields = {**original.to_dict(), **changed}
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [AgentStepSpec(**fields)], "wf", store
    )
    assert executor.calls == Counter()
    assert "stale" in outcomes[0].output


async def test_non_identity_fields_may_change_between_runs() -> None:
    """max_tokens and timeout_s are placement knobs: changing them keeps the cached result."""
    store = MemoryCheckpointStore()
    await store.record_step("wf", cached_record("wf", spec("a"), "cached"))
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [spec("a", max_tokens=99, timeout_s=5.0)], "wf", store
    )
    assert executor.calls == Counter()
    assert outcomes[0].output == "cached"


async def test_journal_of_another_workflow_id_is_not_a_match() -> None:
    """The identity includes the workflow id: a record copied from another workflow is stale."""
    store = MemoryCheckpointStore()
    await store.record_step("wf", cached_record("other-wf", spec("a"), "foreign"))
    outcomes = await execute_steps_parallel_resumable(EchoExecutor(), [spec("a")], "wf", store)
    assert "stale" in outcomes[0].output


async def test_legacy_record_without_identity_is_served() -> None:
    """A record with no identity digest (older journal) is trusted as is."""
    store = MemoryCheckpointStore()
    legacy = cached_record("wf", spec("a"), "legacy").model_copy(update={"identity": None})
    await store.record_step("wf", legacy)
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [spec("a", prompt="x")], "wf", store
    )
    assert executor.calls == Counter()
    assert outcomes[0].output == "legacy"


@pytest.mark.parametrize(
    ("meta", "record", "expected"),
    [
        (encode_meta("someone-else"), None, "key mismatch"),
        (encode_meta("wf"), '{"task_id": "a", "outcome": ', "corrupt"),
        ("][", None, "unreadable"),
    ],
)
async def test_untrusted_sqlite_journal_fails_closed_and_stays(
    tmp_path: Path, meta: str, record: str | None, expected: str
) -> None:
    """Key mismatch or corruption on disk: nothing runs and the rows are left for inspection."""
    path = tmp_path / "journal.db"
    store = SQLiteCheckpointStore(path)
    await store.record_step("wf", cached_record("wf", spec("a"), "ok"))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE fleet_journal_meta SET meta = ? WHERE workflow_id = 'wf'", (meta,))
        if record is not None:
            conn.execute(
                "UPDATE fleet_journal_steps SET record = ? WHERE workflow_id = 'wf'", (record,)
            )
    conn.close()
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(executor, [spec("a"), spec("b")], "wf", store)
    assert executor.calls == Counter()
    assert all(o.error == "checkpoint" and "cannot be resumed" in o.output for o in outcomes)
    assert expected in outcomes[0].output
    assert await store.list_workflows() == ["wf"]
    await store.close()


class BrokenStore(MemoryCheckpointStore):
    """A store whose writes (or loads) fail, to check the run survives it."""

    def __init__(self, *, fail_load: bool = False) -> None:
        super().__init__()
        self.fail_load = fail_load
        self.deleted: list[str] = []

    async def load(self, workflow_id: str) -> WorkflowCheckpoint | None:
        if self.fail_load:
            raise RuntimeError("disk on fire")
        return await super().load(workflow_id)

    async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
        raise OSError("no space left on device")

    async def delete(self, workflow_id: str) -> bool:
        self.deleted.append(workflow_id)
        raise OSError("read-only file system")


async def test_failed_record_save_is_logged_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Losing a journal record (or the final delete) never fails the live run."""
    store = BrokenStore()
    with caplog.at_level(logging.WARNING, logger="fleet.resumable"):
        outcomes = await execute_steps_parallel_resumable(
            EchoExecutor(), [spec("a", prompt="secret-prompt"), spec("b")], "wf", store
        )
    assert [o.output for o in outcomes] == ["ran:secret-prompt", "ran:b"]
    assert store.deleted == ["wf"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not journal step" in m for m in messages) == 2
    assert any("could not be deleted" in m for m in messages)
    assert not any("secret-prompt" in m for m in messages)


async def test_store_that_raises_an_unexpected_error_on_load_fails_closed() -> None:
    """Any load failure, not only CheckpointError, runs nothing."""
    executor = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        executor, [spec("a")], "wf", BrokenStore(fail_load=True)
    )
    assert executor.calls == Counter()
    assert "cannot be resumed" in outcomes[0].output and "disk on fire" in outcomes[0].output


async def test_unsaved_step_runs_again_on_resume() -> None:
    """A step whose record was lost is simply re-run next time (it was never journaled)."""

    class DropB(MemoryCheckpointStore):
        async def record_step(self, workflow_id: str, record: WorkflowStepRecord) -> None:
            if record.task_id == "b":
                raise OSError("lost")
            await super().record_step(workflow_id, record)

    store = DropB()
    first = EchoExecutor(fail_ids=["c"])
    await execute_steps_parallel_resumable(first, [spec("a"), spec("b"), spec("c")], "wf", store)
    second = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(
        second, [spec("a"), spec("b"), spec("c")], "wf", store
    )
    assert all(o.success for o in outcomes)
    assert second.calls == Counter({"b": 1, "c": 1})


async def test_crashing_step_is_isolated_and_not_journaled(store: CheckpointStore) -> None:
    """A branch that raises becomes a failed outcome; the journal keeps only its siblings."""
    outcomes = await execute_steps_parallel_resumable(
        EchoExecutor(), [spec("a"), spec("x", agent="boom"), spec("c")], "wf", store
    )
    assert [o.success for o in outcomes] == [True, False, True]
    assert outcomes[1].error == "crashed" and outcomes[1].agent == "boom"
    checkpoint = await store.load("wf")
    assert checkpoint is not None and sorted(checkpoint.completed()) == ["a", "c"]


async def test_keep_journal_keeps_it_after_full_success(store: CheckpointStore) -> None:
    """keep_journal=True (Workflow phases) keeps the journal; re-running then runs nothing."""
    specs = [spec("a"), spec("b")]
    first = EchoExecutor()
    await execute_steps_parallel_resumable(first, specs, "wf", store, keep_journal=True)
    checkpoint = await store.load("wf")
    assert checkpoint is not None and sorted(checkpoint.completed()) == ["a", "b"]
    again = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(again, specs, "wf", store, keep_journal=True)
    assert again.calls == Counter()
    assert [o.output for o in outcomes] == ["ran:a", "ran:b"]
    assert await store.load("wf") is not None


async def test_empty_round_deletes_any_journal_under_that_id(store: CheckpointStore) -> None:
    """No specs is vacuously all-success: the journal under that id is removed."""
    await store.record_step("wf", cached_record("wf", spec("a"), "x"))
    assert await execute_steps_parallel_resumable(EchoExecutor(), [], "wf", store) == []
    assert await store.load("wf") is None


async def test_outcome_for_another_task_id_is_returned_but_not_journaled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An executor answering with the wrong task id must not poison the journal."""

    class Confused(EchoExecutor):
        async def execute_step(
            self, spec: AgentStepSpec, events: EventSink | None = None
        ) -> StepOutcome:
            outcome = await super().execute_step(spec, events)
            return outcome.model_copy(update={"task_id": "someone-else"})

    store = MemoryCheckpointStore()
    with caplog.at_level(logging.WARNING, logger="fleet.resumable"):
        outcomes = await execute_steps_parallel_resumable(
            Confused(), [spec("a"), spec("f", agent="fail")], "wf", store
        )
    assert outcomes[0].task_id == "someone-else"
    checkpoint = await store.load("wf")
    assert checkpoint is None  # nothing journaled, and what is there still loads
    assert any("could not journal step 'a'" in r.getMessage() for r in caplog.records)


async def test_cached_steps_emit_no_events_and_fresh_ones_do() -> None:
    """Through a real LocalExecutor: events flow for the step that runs, none for the cached."""
    store = MemoryCheckpointStore()
    a, b = spec("a"), spec("b")
    await store.record_step("wf", cached_record("wf", a, "cached"))
    seen: list[Any] = []
    outcomes = await execute_steps_parallel_resumable(
        LocalExecutor(), [a, b], "wf", store, events=seen.append
    )
    assert [o.output for o in outcomes] == ["cached", "b"]
    assert [(type(e), e.task_id) for e in seen] == [(StepStarted, "b"), (StepFinished, "b")]


class NativeHost(EchoExecutor):
    """A host with its own round shape (as the Celery host has)."""

    def __init__(self) -> None:
        super().__init__(hint=2, delay_s=0.0)
        self.rounds: list[tuple[list[str], str | None]] = []

    async def native_round(
        self,
        specs: Sequence[AgentStepSpec],
        *,
        events: EventSink | None = None,
        on_outcome: OutcomeCallback | None = None,
        workflow_id: str | None = None,
    ) -> list[StepOutcome] | None:
        self.rounds.append(([s.task_id for s in specs], workflow_id))
        outcomes = []
        for index, s in enumerate(specs):
            outcome = await self.execute_step(s, events)
            outcome = outcome.model_copy(update={"worker": "native"})
            if on_outcome is not None:
                await on_outcome(index, outcome)
            outcomes.append(outcome)
        return outcomes


async def test_native_round_of_a_host_is_used_and_journaled(store: CheckpointStore) -> None:
    """The host's native round gets only pending specs plus the workflow id, and is journaled."""
    await store.record_step("wf", cached_record("wf", spec("a"), "cached"))
    host = NativeHost()
    outcomes = await execute_steps_parallel_resumable(
        host, [spec("a"), spec("b"), spec("c", agent="fail")], "wf", store
    )
    assert host.rounds == [(["b", "c"], "wf")]
    assert [o.worker for o in outcomes] == ["worker9@elsewhere", "native", "native"]
    assert [o.success for o in outcomes] == [True, True, False]
    checkpoint = await store.load("wf")
    assert checkpoint is not None
    assert checkpoint.completed()["b"].worker == "native"
    assert "c" not in checkpoint.completed()


async def test_another_node_resumes_from_a_shared_redis_journal(
    redis_url: str, key_prefix: str
) -> None:
    """Two stores (two machines) over one Redis: the second node runs only what is left."""
    node1 = RedisCheckpointStore(redis_url, key_prefix=key_prefix)
    node2 = RedisCheckpointStore(redis_url, key_prefix=key_prefix)
    specs = [spec(f"s{n}") for n in range(6)]
    first = EchoExecutor(fail_ids=["s2", "s4"])
    await execute_steps_parallel_resumable(first, specs, "shared", node1)
    second = EchoExecutor()
    outcomes = await execute_steps_parallel_resumable(second, specs, "shared", node2)
    assert all(o.success for o in outcomes)
    assert second.calls == Counter({"s2": 1, "s4": 1})
    assert await node1.load("shared") is None
    await node1.close()
    await node2.close()
