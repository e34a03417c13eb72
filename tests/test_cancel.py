"""Cancel on the local host: the boards, the in-process signal, Workflow.cancel and `fleet cancel`."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fleet import AgentStepSpec, LocalExecutor, StepOutcome, execute_pipeline
from fleet.agents import AgentContext
from fleet.budget import WorkflowBudget
from fleet.cancel import Cancellation, StepInterrupted, use_cancellation
from fleet.cancel.signal import cancelled_outcome
from fleet.errors import WorkflowCancelledError
from fleet.events import WorkflowCancelled
from fleet.pricing import ModelPrice
from fleet.runs import (
    MemoryRunRegistry,
    RedisRunRegistry,
    RunRegistry,
    SQLiteRunRegistry,
    new_run_id,
)
from fleet.stores import SQLiteCheckpointStore
from fleet.workflow import Workflow
from tests.celery_support import sockets_to
from tests.test_workflow import REPO, wait_for


def spec(task_id: str, agent: str = "slow", prompt: str = "x") -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent=agent, description=task_id, prompt=prompt)


class Slow:
    """Agents whose runs, interruptions and blocking the tests can count."""

    def __init__(self, *, hang: bool = True) -> None:
        self.hang = hang
        self.started: list[str] = []
        self.interrupted: list[str] = []
        self.finished: list[str] = []

    async def slow(self, spec: AgentStepSpec, ctx: AgentContext) -> str:
        """Quick for prompt "fast", else sleeps far beyond any test's timeout."""
        self.started.append(spec.task_id)
        try:
            await asyncio.sleep(0.01 if spec.prompt == "fast" or not self.hang else 3600)
        except asyncio.CancelledError:
            self.interrupted.append(spec.task_id)
            raise
        self.finished.append(spec.task_id)
        return spec.prompt

    async def blocking(self, spec: AgentStepSpec, ctx: AgentContext) -> str:
        """Blocks its thread (and so the event loop) for 0.3 s: cannot be interrupted."""
        self.started.append(spec.task_id)
        await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 - the point of the test
        self.finished.append(spec.task_id)
        return "blocked result"

    def executor(self, **options: Any) -> LocalExecutor:
        return LocalExecutor(
            agents={"slow": self.slow, "blocking": self.blocking}, max_concurrency=4, **options
        )


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- boards


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def board(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, key_prefix: str
) -> AsyncIterator[RunRegistry]:
    made: RunRegistry
    if request.param == "memory":
        made = MemoryRunRegistry()
    elif request.param == "sqlite":
        made = SQLiteRunRegistry(tmp_path / "journal.db")
    else:
        made = RedisRunRegistry(redis_url, key_prefix=key_prefix)
    yield made
    await made.close()


async def test_board_cancels_only_the_live_run(board: RunRegistry) -> None:
    """A cancel marks the live run cancelled with its reason; a new run is not touched."""
    assert await board.request("nightly", "nobody runs it") is None
    first = new_run_id()
    await board.begin("nightly", first)
    assert await board.check(first) is None
    notice = await board.request("nightly", "stop it")
    assert notice is not None and notice.run_id == first and notice.reason == "stop it"
    assert await board.check(first) == notice
    record = await board.record("nightly")
    assert record is not None and record.status == "cancelled" and record.reason == "stop it"
    assert "cancelled at" in record.describe() and "stop it" in record.describe()
    # Already cancelled: nothing changes, and the end of the run keeps "cancelled".
    assert await board.request("nightly", "again") is None
    await board.end("nightly", first, "closed")
    assert (await board.record("nightly")).status == "cancelled"  # type: ignore[union-attr]
    # A new run of the same root id: the old marker stays, the new run is not cancelled.
    second = new_run_id()
    await board.begin("nightly", second)
    assert await board.check(second) is None
    assert await board.check(first) == notice
    assert await board.request("nightly", "wrong run", run_id=first) is None
    await board.end("nightly", second, "finished")
    assert (await board.record("nightly")).status == "finished"  # type: ignore[union-attr]
    assert await board.request("nightly", "too late") is None
    assert await board.check(second) is None


def test_a_redis_board_left_open_closes_its_connections_with_its_event_loop(
    redis_url: str, key_prefix: str
) -> None:
    """A board used in one asyncio.run() and never closed holds no connection after it."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    board = RedisRunRegistry(redis_url, key_prefix=key_prefix)
    gc.collect()  # earlier tests' dropped clients close when collected: not counted here
    before = sockets_to(port)
    for run in range(2):
        asyncio.run(board.begin("left-open", f"run{run}"))
        gc.collect()
        # Other clients of the session may close meanwhile; none of the board's may stay.
        assert sockets_to(port) <= before, f"connections left open after run {run}"


# --------------------------------------------------------------------------- the signal


async def test_interrupts_turns_our_cancel_into_step_interrupted() -> None:
    """Inside interrupts(), our cancel raises StepInterrupted; the caller's cancel stays CancelledError."""
    ours = Cancellation()

    async def body(c: Cancellation) -> str:
        try:
            with c.interrupts():
                await asyncio.sleep(3600)
        except StepInterrupted as stop:
            return f"interrupted: {stop.reason}"
        return "finished"

    task = asyncio.create_task(body(ours))
    await asyncio.sleep(0.01)
    ours.cancel("enough")
    assert await task == "interrupted: enough"
    assert task.cancelling() == 0

    theirs = asyncio.create_task(body(Cancellation()))
    await asyncio.sleep(0.01)
    theirs.cancel()
    with pytest.raises(asyncio.CancelledError):
        await theirs


async def test_a_cancel_swallowed_inside_the_block_still_interrupts_it() -> None:
    """A library that swallows our CancelledError (redis-py can, mid-command) cannot undo a cancel."""
    ours = Cancellation()
    went_on = asyncio.Event()

    async def body() -> str:
        with ours.interrupts():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # swallowed, as a client library may do mid-command
            went_on.set()
        return "finished as if never cancelled"

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    ours.cancel("enough")
    with pytest.raises(StepInterrupted, match="enough"):
        await task
    assert went_on.is_set() and task.cancelling() == 0


async def test_an_agent_past_a_swallowed_cancel_makes_no_model_call() -> None:
    """After a cancel, the context refuses the agent's next model call even if the cancel was lost."""
    budget = WorkflowBudget(10_000)
    calls: list[str] = []
    reached = asyncio.Event()

    async def agent(spec: AgentStepSpec, ctx: AgentContext) -> str:
        try:
            reached.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # swallowed by a library
        price = ModelPrice("m", "test", input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))
        await ctx.hold_call(price, model="m", agent="a", prompt_tokens=10, max_tokens=10)
        calls.append(spec.task_id)  # the model request would go here
        return "answered"

    executor = LocalExecutor(agents={"swallow": agent}, budget=budget)
    cancellation = Cancellation()
    with use_cancellation(cancellation):
        step = asyncio.create_task(executor.execute_step(spec("s", agent="swallow")))
    await reached.wait()
    cancellation.cancel("stop now")
    outcome = await step
    assert (outcome.error, calls) == ("cancelled", [])
    snapshot = await budget.snapshot()
    assert (snapshot.reserved_tokens, snapshot.reserved_usd) == (0, 0)


# --------------------------------------------------------------------------- the local host


async def test_cancel_stops_a_local_round_and_releases_every_reservation() -> None:
    """Running steps are interrupted, queued ones never start, the ledger holds nothing."""
    agents = Slow()
    budget = WorkflowBudget(100_000)
    executor = agents.executor(budget=budget)
    workflow = Workflow.builder(executor).with_budget(budget).build()
    specs = [spec(f"s{i}", prompt="fast" if i < 2 else "slow") for i in range(12)]
    subscription = workflow.subscribe()

    async def cancel_when_busy() -> None:
        await until(lambda: len(agents.started) == 6)
        await workflow.cancel("test says stop")

    async with asyncio.TaskGroup() as group:
        round_ = group.create_task(workflow.parallel(specs))
        group.create_task(cancel_when_busy())
    outcomes = round_.result()

    assert [o.task_id for o in outcomes] == [s.task_id for s in specs]
    assert [o.success for o in outcomes[:2]] == [True, True]
    assert all(o.error == "cancelled" for o in outcomes[2:])
    assert "test says stop" in outcomes[5].output
    assert len(agents.started) == 6  # nothing new started after the cancel
    assert sorted(agents.interrupted) == ["s2", "s3", "s4", "s5"]
    snapshot = await budget.snapshot()
    assert snapshot.reserved_tokens == 0
    assert workflow.cancelled
    with pytest.raises(WorkflowCancelledError, match="was cancelled"):
        await workflow.parallel([spec("later")])
    await workflow.finish()
    events = [event async for event in subscription]
    assert [e.reason for e in events if isinstance(e, WorkflowCancelled)] == ["test says stop"]


async def test_cancelling_the_task_awaiting_a_verb_cancels_the_workflow() -> None:
    """A cancelled caller: the CancelledError reaches it, steps stop, the workflow is cancelled."""
    agents = Slow()
    budget = WorkflowBudget(100_000)
    workflow = Workflow.builder(agents.executor(budget=budget)).with_budget(budget).build()
    subscription = workflow.subscribe()
    task = asyncio.create_task(workflow.phase("p", [spec(f"s{i}") for i in range(8)]))
    await until(lambda: len(agents.started) == 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(agents.interrupted) == ["s0", "s1", "s2", "s3"]
    assert len(agents.started) == 4
    assert (await budget.snapshot()).reserved_tokens == 0
    assert workflow.cancelled
    await workflow.close()
    reasons = [e.reason async for e in subscription if isinstance(e, WorkflowCancelled)]
    assert reasons == ["the task awaiting Workflow.phase was cancelled"]


async def test_cancel_stops_a_local_pipeline() -> None:
    """A pipeline under a cancelled workflow: no further stage is sent; chains end cancelled."""
    agents = Slow()
    executor = agents.executor()
    cancellation = Cancellation()

    def first(_prev: StepOutcome | None, item: int) -> AgentStepSpec:
        return spec(f"a{item}", prompt="fast")

    def second(_prev: StepOutcome | None, item: int) -> AgentStepSpec:
        return spec(f"b{item}")

    async def cancel_when_busy() -> None:
        await until(lambda: sum(t.startswith("b") for t in agents.started) == 4)
        cancellation.cancel("pipeline stopped")

    with use_cancellation(cancellation):
        async with asyncio.TaskGroup() as group:
            chains = group.create_task(execute_pipeline(executor, range(10), [first, second]))
            group.create_task(cancel_when_busy())
    results = chains.result()
    assert all(r is not None and r.error == "cancelled" for r in results)
    assert sum(t.startswith("b") for t in agents.started) == 4
    assert len(agents.interrupted) == 4


async def test_a_blocking_agent_finishes_but_its_result_is_discarded() -> None:
    """An agent that blocks its thread cannot be interrupted: it ends cancelled, result dropped.

    The cancel comes from another thread while the agent blocks, as a worker's lease
    thread delivers it.
    """
    agents = Slow()
    budget = WorkflowBudget(100_000)
    executor = agents.executor(budget=budget)
    cancellation = Cancellation()
    loop = asyncio.get_running_loop()
    timer = threading.Timer(0.1, loop.call_soon_threadsafe, (cancellation.cancel, "stop it"))
    timer.start()
    try:
        with use_cancellation(cancellation):
            outcome = await executor.execute_step(spec("b", agent="blocking"))
    finally:
        timer.join()
    assert agents.finished == ["b"]  # it ran to its end ...
    assert outcome.error == "cancelled"  # ... and was reported cancelled, result discarded
    assert "could not be interrupted" in outcome.output and "stop it" in outcome.output
    assert "blocked result" not in outcome.output
    assert (await budget.snapshot()).reserved_tokens == 0


async def test_steps_a_worker_stopped_before_the_watcher_looked_end_the_run_cancelled() -> None:
    """Steps a worker cancelled before the host's watcher looked still end the run cancelled.

    A worker reads the board too; the phase's end looks at it, so the run ends 'cancelled'
    (not 'finished') and no verb follows.
    """
    board = MemoryRunRegistry()

    class WorkerSawItFirst(LocalExecutor):
        """What a Celery worker does when it finds the run's cancel marker first."""

        async def execute_step(self, spec: AgentStepSpec, *args: Any, **kw: Any) -> StepOutcome:
            await board.request("seen-first", "cancelled from the dashboard")
            return cancelled_outcome(spec, "cancelled from the dashboard")

    executor = WorkerSawItFirst(agents={})
    workflow = (
        Workflow.builder(executor).with_cancel_board(board).with_root_id("seen-first").build()
    )
    async with workflow:
        outcomes = await workflow.phase("work", [spec("w1")])
        assert [o.error for o in outcomes] == ["cancelled"]
        assert workflow.cancelled, "the phase ended without looking at the board"
        assert workflow.cancel_reason == "cancelled from the dashboard"
        with pytest.raises(WorkflowCancelledError):
            await workflow.phase("next", [spec("w2")])
    record = await board.record("seen-first")
    assert record is not None and record.status == "cancelled"


async def test_a_cancelled_run_keeps_its_journal_and_the_next_run_resumes(tmp_path: Path) -> None:
    """Completed steps stay journaled; running the root id again runs only the rest."""
    agents = Slow()
    store = SQLiteCheckpointStore(tmp_path / "journal.db")
    board = SQLiteRunRegistry(tmp_path / "journal.db")
    specs = [spec(f"s{i}", prompt="fast" if i % 2 == 0 else "slow") for i in range(8)]

    def build(executor: LocalExecutor) -> Workflow:
        builder = Workflow.builder(executor).with_store(store).with_cancel_board(board)
        return builder.with_root_id("resume-me").build()

    workflow = build(agents.executor())

    async def cancel_from_elsewhere() -> None:
        await until(lambda: len(agents.finished) == 4 and len(agents.started) == 8)
        # What `fleet cancel` does from another terminal: only the board is touched.
        other = SQLiteRunRegistry(tmp_path / "journal.db")
        assert await other.request("resume-me", "from another terminal") is not None
        await other.close()

    async with workflow:
        async with asyncio.TaskGroup() as group:
            phase = group.create_task(workflow.phase("work", specs))
            group.create_task(cancel_from_elsewhere())
    outcomes = phase.result()
    assert [o.success for o in outcomes] == [i % 2 == 0 for i in range(8)]
    assert {o.error for o in outcomes if not o.success} == {"cancelled"}
    record = await board.record("resume-me")
    assert record is not None and record.status == "cancelled"
    assert record.reason == "from another terminal"

    # The second run: the fast steps come from the journal; only the cancelled ones run.
    again = Slow(hang=False)
    second = build(again.executor())
    assert second.run_id != workflow.run_id
    async with second:
        resumed = await second.phase("work", specs)
    assert all(o.success for o in resumed)
    assert sorted(again.started) == ["s1", "s3", "s5", "s7"]
    assert (await board.record("resume-me")).status == "finished"  # type: ignore[union-attr]
    await board.close()
    await store.close()


# --------------------------------------------------------------------------- fleet cancel

CANCEL_FLOW = '''
"""Ten steps: even ones finish at once, odd ones hang while FLOW_HANG=1."""

import asyncio
import os
from pathlib import Path

from fleet import AgentStepSpec


async def work(spec, ctx):
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    with open(directory / spec.task_id, "a") as counter:
        counter.write("x")
    if spec.prompt == "odd" and os.environ.get("FLOW_HANG") == "1":
        await asyncio.sleep(3600)
    if spec.prompt == "odd" and os.environ.get("FLOW_HANG") == "stubborn":
        while True:  # swallows every cancel: only a second Ctrl-C ends the run
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                with open(directory / f"{spec.task_id}.swallowed", "a") as swallowed:
                    swallowed.write("x")
    return spec.task_id


AGENTS = {"work": work}


async def main(workflow):
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="work", description="d", prompt=["even", "odd"][i % 2])
        for i in range(10)
    ]
    outcomes = await workflow.phase("work", specs)
    await workflow.phase("after", specs)
    return sum(o.success for o in outcomes)
'''


def _counts(counters: Path, suffix: str = "") -> dict[str, int]:
    """Step id -> how many times it ran (``suffix=".swallowed"``: cancels it swallowed)."""
    return {
        path.name.removesuffix(suffix): len(path.read_text())
        for path in counters.iterdir()
        if path.suffix == suffix
    }


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_fleet_cancel_of_an_unknown_or_finished_root_id_says_so_and_changes_nothing(
    tmp_path: Path, redis_url: str, key_prefix: str, where: str
) -> None:
    """Unknown or finished root id: one line, exit status 1, the record is untouched."""
    from tests.test_cli_run import run_fleet

    extra = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": key_prefix}
    if where == "redis":
        extra["FLEET_STORE"] = redis_url
    unknown = run_fleet(tmp_path, "cancel", "nobody", **extra)
    assert unknown.returncode == 1, unknown.stderr
    lines = unknown.stdout.strip().splitlines()
    assert len(lines) == 1 and "no running workflow nobody found" in lines[0]
    assert "looked in" in lines[0]
    assert not (tmp_path / "journal.db").exists()  # nothing created either

    async def on_board(action: Any) -> Any:
        board: RunRegistry = (
            SQLiteRunRegistry(tmp_path / "journal.db")
            if where == "sqlite"
            else RedisRunRegistry(redis_url, key_prefix=key_prefix)
        )
        try:
            return await action(board)
        finally:
            await board.close()

    async def finished_run(board: RunRegistry) -> Any:
        run = new_run_id()
        await board.begin("done-wf", run)
        await board.end("done-wf", run, "finished")
        return await board.record("done-wf")

    before = asyncio.run(on_board(finished_run))
    done = run_fleet(tmp_path, "cancel", "done-wf", "--reason", "late", **extra)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "is not running: finished at" in lines[0]
    after = asyncio.run(on_board(lambda board: board.record("done-wf")))
    assert after.model_copy(update={"read_at": None}) == before.model_copy(update={"read_at": None})
    assert asyncio.run(on_board(lambda board: board.check(before.run_id))) is None


@pytest.mark.parametrize("how", ["fleet cancel", "Ctrl-C"])
def test_a_local_run_stopped_by_fleet_cancel_or_ctrl_c_resumes(
    tmp_path: Path, redis_url: str, how: str
) -> None:
    """`fleet cancel` from another terminal, or SIGINT, stops a local run; the re-run resumes."""
    from tests.test_cli_run import run_fleet

    counters, extra, process = _start_hanging_run(tmp_path, redis_url, "1")
    try:
        wait_for(lambda: len(_counts(counters)) == 10, 60, process)
        if how == "Ctrl-C":
            process.send_signal(signal.SIGINT)
        else:
            cancelled = run_fleet(tmp_path, "cancel", "local-cancel", "--reason", "enough", **extra)
            assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
            assert "cancelled workflow local-cancel" in cancelled.stdout
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    reason = "interrupted with Ctrl-C" if how == "Ctrl-C" else "enough"
    assert process.returncode == (130 if how == "Ctrl-C" else 1), out + err
    assert f"workflow cancelled: {reason}" in out, out + err
    assert f"workflow local-cancel CANCELLED ({reason})" in out
    if how == "Ctrl-C":
        assert "waiting for 5 running steps to stop" in out and "s1, s3, s5, s7, s9" in out
    assert "phase 1" not in out  # the second phase never started
    assert _counts(counters) == {f"s{i}": 1 for i in range(10)}
    status = run_fleet(tmp_path, "status", "local-cancel", **extra)
    assert "cancelled at" in status.stdout and reason in status.stdout, status.stdout

    rerun = run_fleet(
        tmp_path, "run", f"{tmp_path / 'cancel_flow.py'}:main", "--root-id", "local-cancel", **extra
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    counts = _counts(counters)
    # Even steps were journaled: they ran once. Odd ones ran again (and "after" ran all ten).
    assert {k: v for k, v in counts.items() if int(k[1:]) % 2 == 0} == {
        f"s{i}": 2 for i in range(0, 10, 2)
    }
    assert {k: v for k, v in counts.items() if int(k[1:]) % 2 == 1} == {
        f"s{i}": 3 for i in range(1, 10, 2)
    }


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path, redis_url: str) -> None:
    """Steps that ignore the cancel keep the first Ctrl-C waiting; the second exits with 130."""
    counters, _extra, process = _start_hanging_run(tmp_path, redis_url, "stubborn")
    try:
        wait_for(lambda: len(_counts(counters)) == 10, 60, process)
        process.send_signal(signal.SIGINT)
        # Each odd step got the cancel and swallowed it: the run is past the cancel, and
        # waits for steps that never end.
        stubborn = {f"s{i}" for i in range(1, 10, 2)}
        wait_for(
            lambda: set(_counts(counters, ".swallowed")) == stubborn,
            30,
            process,
            "the cancel in every stubborn step",
        )
        assert process.poll() is None  # still waiting for the stubborn steps
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, out + err
    assert "second Ctrl-C: exiting now" in out


def _start_hanging_run(
    tmp_path: Path, redis_url: str, hang: str
) -> tuple[Path, dict[str, str], subprocess.Popen[str]]:
    from tests.test_cli_run import env, fleet

    flow = tmp_path / "cancel_flow.py"
    flow.write_text(CANCEL_FLOW)
    counters = tmp_path / "counters"
    counters.mkdir()
    extra = {"FLEET_TEST_COUNTER_DIR": str(counters), "FLEET_REDIS_URL": redis_url}
    process = subprocess.Popen(
        fleet("run", f"{flow}:main", "--root-id", "local-cancel"),
        cwd=REPO,
        env=env(tmp_path, FLOW_HANG=hang, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return counters, extra, process
