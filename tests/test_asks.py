"""Workflow.ask in one process, on every store: journal, wait, answer, deadline, re-run."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel, field_validator

from fleet import AskTimeout, FleetError, LocalExecutor, WorkflowBudget
from fleet.asks import AskBook, AskRecord, ask_book_for, give_answer, open_asks, read, records
from fleet.asks.sqlite import SQLiteAskBook
from fleet.errors import AnswerRefused, AskError, WorkflowCancelledError
from fleet.events import Answered, Asked
from fleet.stores import CheckpointStore, open_store
from fleet.workflow import Workflow
from tests.test_workflow import Recorder, spec


class Approval(BaseModel):
    approved: bool
    note: str = ""


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        target = "memory"
    elif request.param == "sqlite":
        target = f"sqlite:{tmp_path / 'journal.db'}"
    else:
        target = request.getfixturevalue("redis_url")
    opened = open_store(target, key_prefix=key_prefix)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def book(store: CheckpointStore) -> AsyncIterator[AskBook]:
    """The ask book of ``store``, as a separate answerer (another process) would open it."""
    opened = ask_book_for(store)
    try:
        yield opened
    finally:
        await opened.close()


def workflow_on(store: CheckpointStore, recorder: Recorder, root: str = "wf") -> Workflow:
    return Workflow.builder(recorder.executor()).with_store(store).with_root_id(root).build()


async def open_ask(book: AskBook, root: str, name: str, timeout_s: float = 10.0) -> AskRecord:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in await open_asks(book, root) if r.name == name]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{name!r} was never asked"
        await asyncio.sleep(0.02)


async def test_ask_waits_for_the_answer_and_wakes_within_a_second(
    store: CheckpointStore, book: AskBook
) -> None:
    """The question is journaled with its schema; the host wakes within 1 s of the answer."""
    workflow = workflow_on(store, Recorder())
    events = workflow.subscribe()
    waiting = asyncio.create_task(
        workflow.ask("publish", question="Publish it?", schema=Approval, timeout_s=600)
    )
    record = await open_ask(book, "wf", "publish")
    assert record.question == "Publish it?"
    assert record.json_schema == Approval.model_json_schema()
    assert record.deadline is not None and record.asked_at is not None
    assert record.deadline == pytest.approx(record.asked_at + 600)
    await asyncio.sleep(0.6)  # the host is asleep between two polls
    assert not waiting.done()
    taken = await give_answer(book, "wf", "publish", {"approved": True}, by="alice")
    answer = await waiting
    woke = time.time()
    assert answer == Approval(approved=True)
    assert taken.answered_at is not None and woke - taken.answered_at < 1.0
    stored = await read(book, "wf", "publish")
    assert stored is not None and stored.state == "answered" and stored.answered_by == "alice"
    await workflow.finish()
    kinds = [(e.type, getattr(e, "name", None)) async for e in events if e.type != "log"]
    assert kinds == [("asked", "publish"), ("answered", "publish")]


async def test_schemas_dict_and_none(store: CheckpointStore, book: AskBook) -> None:
    """A JSON Schema dict returns the JSON value; no schema takes any JSON value."""
    workflow = workflow_on(store, Recorder())
    await give_answer(book, "wf", "pick", 2, by="bob")
    await give_answer(book, "wf", "anything", {"free": ["form"]}, by="bob")
    schema = {"type": "integer", "enum": [1, 2, 3]}
    assert await workflow.ask("pick", question="Which draft?", schema=schema) == 2
    assert await workflow.ask("anything", question="Say it") == {"free": ["form"]}
    await workflow.close()


async def test_a_second_ask_with_the_same_name_is_refused(store: CheckpointStore) -> None:
    """Ask names are unique within a workflow: a FleetError (and ValueError) says so."""
    workflow = workflow_on(store, Recorder())
    assert await workflow.ask("x", question="q", timeout_s=0, default="d") == "d"
    with pytest.raises(AskError, match="already asked 'x'") as caught:
        await workflow.ask("x", question="q again", timeout_s=0, default="d")
    assert isinstance(caught.value, FleetError) and isinstance(caught.value, ValueError)
    with pytest.raises(AskError, match="ask name"):
        await workflow.ask("has space", question="q")
    with pytest.raises(AskError, match="not a valid JSON Schema"):
        await workflow.ask("bad", question="q", schema={"type": "no-such-type"})
    await workflow.close()


async def test_ask_without_a_store_is_refused() -> None:
    """Without a journal there is nothing durable to wait in."""
    workflow = Workflow.builder(Recorder().executor()).build()
    with pytest.raises(AskError, match="with_store"):
        await workflow.ask("x", question="q")


async def test_invalid_answer_is_refused_with_its_field_and_the_wait_goes_on(
    store: CheckpointStore, book: AskBook
) -> None:
    """A wrong type or a missing field is refused naming the field; a later answer wins."""
    workflow = workflow_on(store, Recorder())
    waiting = asyncio.create_task(workflow.ask("publish", question="?", schema=Approval))
    await open_ask(book, "wf", "publish")
    with pytest.raises(AnswerRefused, match="field approved") as wrong:
        await give_answer(book, "wf", "publish", {"approved": "maybe"}, by="x")
    assert (wrong.value.kind, wrong.value.field) == ("invalid", "approved")
    with pytest.raises(AnswerRefused, match="field approved") as missing:
        await give_answer(book, "wf", "publish", {"note": "no decision"}, by="x")
    assert missing.value.field == "approved"
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await give_answer(book, "wf", "publish", {"approved": False, "note": "no"}, by="carol")
    assert await waiting == Approval(approved=False, note="no")
    await workflow.close()


async def test_the_first_answer_wins(store: CheckpointStore, book: AskBook) -> None:
    """Of 20 racing answers one is taken; a later one is refused as already answered."""
    workflow = workflow_on(store, Recorder())
    waiting = asyncio.create_task(workflow.ask("pick", question="?", schema={"type": "integer"}))
    await open_ask(book, "wf", "pick")

    async def attempt(number: int) -> int | None:
        try:
            await give_answer(book, "wf", "pick", number, by=f"user{number}")
        except AnswerRefused as refusal:
            assert refusal.kind == "answered"
            return None
        return number

    won = [n for n in await asyncio.gather(*(attempt(n) for n in range(20))) if n is not None]
    assert len(won) == 1
    assert await waiting == won[0]
    with pytest.raises(AnswerRefused, match="already answered") as late:
        await give_answer(book, "wf", "pick", 99, by="late")
    assert late.value.kind == "answered"
    await workflow.close()


async def test_an_early_answer_is_kept_until_the_program_asks(
    store: CheckpointStore, book: AskBook
) -> None:
    """Given while earlier phases run, the answer is returned when the ask is reached."""
    recorder = Recorder()
    workflow = workflow_on(store, recorder)
    early = await give_answer(book, "wf", "publish", {"approved": True}, by="dana")
    assert early.state == "early"
    assert await open_asks(book) == []  # an early answer is no open question
    with pytest.raises(AnswerRefused, match="first answer wins"):
        await give_answer(book, "wf", "publish", {"approved": False}, by="erin")
    events = workflow.subscribe()
    await workflow.phase("draft", [spec("d1")])
    started = time.monotonic()
    answer = await workflow.ask("publish", question="Publish?", schema=Approval)
    assert answer == Approval(approved=True) and time.monotonic() - started < 1.0
    await workflow.finish()
    seen = [e async for e in events if isinstance(e, Asked | Answered)]
    assert seen == [Answered(name="publish", by="dana")]


async def test_an_early_answer_that_does_not_fit_leaves_the_ask_open_with_a_note(
    store: CheckpointStore, book: AskBook
) -> None:
    """The early answer is dropped with a note naming the field; a fitting answer then wins."""
    workflow = workflow_on(store, Recorder())
    await give_answer(book, "wf", "publish", {"approved": "soon"}, by="dana")
    waiting = asyncio.create_task(workflow.ask("publish", question="Publish?", schema=Approval))
    record = await open_ask(book, "wf", "publish")
    assert record.note is not None
    assert "given early by dana" in record.note and "field approved" in record.note
    await give_answer(book, "wf", "publish", {"approved": True}, by="erin")
    assert await waiting == Approval(approved=True)
    await workflow.close()


class Strict(BaseModel):
    """A model whose validator refuses what its JSON Schema allows."""

    count: int

    @field_validator("count")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("count must be positive")
        return value


async def test_an_answer_the_model_refuses_reopens_the_ask(
    store: CheckpointStore, book: AskBook
) -> None:
    """The schema let it through, the model's validator did not: the ask stays open."""
    workflow = workflow_on(store, Recorder())
    waiting = asyncio.create_task(workflow.ask("n", question="How many?", schema=Strict))
    await open_ask(book, "wf", "n")
    await give_answer(book, "wf", "n", {"count": -1}, by="x")
    record = await open_ask(book, "wf", "n")
    assert record.note is not None and "count must be positive" in record.note
    assert record.model == "Strict"  # `fleet answer` and the page say the model checks later
    await give_answer(book, "wf", "n", {"count": 3}, by="y")
    assert await waiting == Strict(count=3)
    await workflow.close()


async def test_a_deadline_returns_the_default_and_holds_on_a_rerun(
    store: CheckpointStore, book: AskBook
) -> None:
    """Past its deadline: the default (or AskTimeout), answers refused, a re-run at once."""
    recorder = Recorder()
    first = workflow_on(store, recorder)
    await first.phase("draft", [spec("d1"), spec("d2")])
    fallback = Approval(approved=False, note="nobody answered")
    started = time.monotonic()
    answer = await first.ask(
        "publish", question="?", schema=Approval, timeout_s=0.5, default=fallback
    )
    assert answer == fallback and time.monotonic() - started >= 0.5
    with pytest.raises(AskTimeout) as raised:
        await first.ask("review", question="?", timeout_s=0.2)
    assert isinstance(raised.value, FleetError) and raised.value.name == "review"
    with pytest.raises(AnswerRefused, match="deadline") as late:
        await give_answer(book, "wf", "publish", {"approved": True}, by="late")
    assert late.value.kind == "expired"
    await first.close()  # as a crash would: the journal is kept

    rerun = workflow_on(store, recorder)
    await rerun.phase("draft", [spec("d1"), spec("d2")])
    started = time.monotonic()
    again = await rerun.ask(
        "publish", question="?", schema=Approval, timeout_s=600, default=fallback
    )
    assert again == fallback and time.monotonic() - started < 1.0
    assert recorder.ran == ["d1", "d2"]  # the phase before the ask never ran again
    await rerun.finish()


async def test_a_rerun_returns_the_journaled_answer_and_skips_what_completed(
    store: CheckpointStore, book: AskBook
) -> None:
    """The host stops while waiting; answered meanwhile, the re-run goes straight on."""
    recorder = Recorder()
    first = workflow_on(store, recorder)
    await first.phase("draft", [spec("d1"), spec("d2")])
    waiting = asyncio.create_task(first.ask("publish", question="?", schema=Approval))
    await open_ask(book, "wf", "publish")
    waiting.cancel()  # the host goes away while it waits
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await first.close()
    await give_answer(book, "wf", "publish", {"approved": True, "note": "ship"}, by="fay")

    rerun = workflow_on(store, recorder)
    await rerun.phase("draft", [spec("d1"), spec("d2")])
    assert await rerun.ask("publish", question="?", schema=Approval) == Approval(
        approved=True, note="ship"
    )
    await rerun.phase("publish", [spec("p1")])
    assert sorted(recorder.ran) == ["d1", "d2", "p1"]
    await rerun.finish()
    assert await records(book, "wf") == []  # finished: a new run starts from scratch


async def test_waiting_holds_no_step_slot_and_no_reservation(
    store: CheckpointStore, book: AskBook
) -> None:
    """With one slot and a budget, steps run while an ask waits, and nothing is reserved."""
    recorder = Recorder()
    budget = WorkflowBudget(1_000)
    executor = LocalExecutor(agents={"rec": recorder.rec}, max_concurrency=1, budget=budget)
    workflow = Workflow.builder(executor).with_store(store).with_root_id("wf").build()
    waiting = asyncio.create_task(workflow.ask("go", question="?"))
    await open_ask(book, "wf", "go")
    assert (await budget.snapshot()).reserved_tokens == 0
    outcomes = await asyncio.wait_for(
        workflow.parallel([spec("a", max_tokens=10), spec("b", max_tokens=10)]), 10
    )
    assert [o.success for o in outcomes] == [True, True]
    await give_answer(book, "wf", "go", "yes", by="gil")
    assert await waiting == "yes"
    await workflow.close()


async def test_a_cancel_ends_the_wait(store: CheckpointStore, book: AskBook) -> None:
    """A cancelled workflow stops waiting with WorkflowCancelledError; the ask stays open."""
    workflow = workflow_on(store, Recorder())
    waiting = asyncio.create_task(workflow.ask("go", question="?"))
    await open_ask(book, "wf", "go")
    await workflow.cancel("no more waiting")
    with pytest.raises(WorkflowCancelledError, match="no more waiting"):
        await asyncio.wait_for(waiting, 5)
    assert [r.name for r in await open_asks(book, "wf")] == ["go"]
    await workflow.close()


async def test_a_locked_sqlite_journal_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """A write waiting for another connection's lock waits in a thread: the loop runs on."""
    path = tmp_path / "journal.db"
    book = SQLiteAskBook(path, busy_timeout_s=10.0)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        assert await book.swap("wf", "first", None, "{}")  # creates the file and its table
        holder.execute("BEGIN IMMEDIATE")  # as another process writing the journal would
        writing = asyncio.create_task(book.swap("wf", "n", None, '{"n": 1}'))
        for _ in range(5):
            await asyncio.sleep(0.05)  # on the loop, while the write waits for the lock
        assert not writing.done()
        holder.execute("COMMIT")
        assert await writing
        assert await book.get("wf", "n") == '{"n": 1}'
    finally:
        holder.close()
        await book.close()
