"""``fleet run``, ``fleet watch`` and ``fleet status``: run a workflow program and follow it.

``fleet run path/to/flow.py:main`` (or ``package.module:main``) imports the program,
builds a :class:`~fleet.Workflow` from the options and settings, and awaits
``main(workflow)`` with a live progress display (plain lines when stdout is not a
terminal). A program may define ``AGENTS = {name: agent}``; they are registered with the
local executor beside the agents file.
"""

# Longer than most modules on purpose: run, watch and status print one run's story in one
# vocabulary (summary, abandoned, counts); splitting them would split that vocabulary.

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live

from ..accounts import check_account_name
from ..config import FleetSettings
from ..errors import BudgetError, ConfigError, FleetError, WorkflowCancelledError
from ..events import parse_event
from ..pricing import micros_to_usd, usd_to_micros
from ..runlog import LogEntry, follow
from ..runner import check_reachable, open_run, plan_run
from ..runs import RunRecord, RunRegistry
from ..runstatus import Located, RunStatus, locate_run, open_reader, read_status
from ..workflow import Workflow, WorkflowBuilder
from .app import app, console, debugging, err_console, settings
from .asks import read_asks
from .cancel import board_at, find_run, latest_run
from .output import LiveOutput
from .program import Program, load_program, program_agents
from .progress import RunDisplay, describe_event, say

__all__ = ["run", "status", "watch"]


# --- fleet run ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    display: RunDisplay | None = None
    cancelled: str | None = None
    """Why the workflow was cancelled, if it was."""
    interrupted: bool = False
    """Ctrl-C cancelled it."""


INTERRUPT_REASON = "interrupted with Ctrl-C"


class _Interrupts:
    """SIGINT on ``fleet run``: the first cancels the workflow and waits, the second exits."""

    def __init__(self, workflow: Workflow, outcome: _Outcome) -> None:
        self.workflow = workflow
        self.outcome = outcome
        self.cancelling: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        if self.cancelling is not None:
            say("second Ctrl-C: exiting now; the cancel is recorded, workers still stop its steps")
            console.file.flush()
            os._exit(130)
        self.outcome.interrupted = True
        display = self.outcome.display
        waiting = dict(display.in_flight) if display is not None else {}
        shown = ", ".join(sorted(waiting)[:8]) + (", ..." if len(waiting) > 8 else "")
        say(
            f"cancelling workflow {self.workflow.root_id}: nothing new starts; waiting for "
            f"{len(waiting)} running steps to stop and settle their tokens"
            + (f" ({shown})" if waiting else "")
            + "; Ctrl-C again to exit at once"
        )
        self.cancelling = asyncio.get_running_loop().create_task(
            self.workflow.cancel(INTERRUPT_REASON)
        )


async def _drive(program: Program, builder: WorkflowBuilder, outcome: _Outcome) -> None:
    budget = builder.budget
    workflow: Workflow = builder.build()
    display = outcome.display = RunDisplay(workflow)
    subscription = workflow.subscribe(capacity=10_000)
    live = None
    if console.is_terminal:
        live = Live(display.render(), console=console, auto_refresh=False)
    display.live = live
    if live is not None:
        live.start()
    follower = asyncio.create_task(display.follow(subscription))
    interrupts = _Interrupts(workflow, outcome)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupts)
    try:
        async with workflow:
            outcome.result = await program(workflow)
    except Exception as error:
        outcome.error = error
    finally:
        if interrupts.cancelling is not None:
            await interrupts.cancelling
        loop.remove_signal_handler(signal.SIGINT)
        if workflow.cancelled:
            outcome.cancelled = workflow.cancel_reason
        await follower  # ends once the workflow closed and its events are drained
        if budget is not None:
            await display.refresh_budget()
        if live is not None:
            live.update(display.render(), refresh=True)
            live.stop()


def _count(number: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _summary(root_id: str, outcome: _Outcome, wall_s: float, store: str) -> None:
    display = outcome.display
    phases = len(display.phases) if display else 0
    journaled = display.journaled if display else 0
    done, failed = (display.done, display.failed) if display else (0, 0)
    refused = display.refused if display else 0
    tokens = display.tokens_text() if display else ""
    verb = "finished" if outcome.error is None else "FAILED"
    if outcome.error is None and failed + refused:
        verb = f"finished with {_count(failed + refused, 'failed step')}"
    if outcome.cancelled is not None:
        verb = f"CANCELLED ({outcome.cancelled})"
    say(
        f"workflow {root_id} {verb} in {wall_s:.2f} s: {_count(phases, 'phase')}, "
        f"{_count(done, 'step')} run ({failed} failed), "
        + (f"{refused} refused before running, " if refused else "")
        + f"{journaled} served from the journal; {tokens}"
    )
    if outcome.error is not None and not isinstance(outcome.error, WorkflowCancelledError):
        if debugging():
            traceback.print_exception(outcome.error, file=sys.stderr)
        err_console.print(
            f"{type(outcome.error).__name__}: {outcome.error}", highlight=False, markup=False
        )
    if (outcome.error is not None or outcome.cancelled is not None) and store != "memory":
        say(f"completed steps stay journaled: re-run with --root-id {root_id} to resume")
    elif outcome.error is None and outcome.result is not None:
        try:
            text = json.dumps(outcome.result, indent=2, default=str)
        except (TypeError, ValueError):
            text = repr(outcome.result)
        say(f"result: {text}")


def _dollar_limit(text: str | None) -> Decimal | None:
    """``--budget-usd`` as exact dollars (checked like ``WorkflowBudget(limit_usd=...)``)."""
    if text is None:
        return None
    try:
        return micros_to_usd(usd_to_micros(text.strip().removeprefix("$"), "--budget-usd"))
    except BudgetError as error:
        raise typer.BadParameter(str(error), param_hint="--budget-usd") from None


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="path/to/flow.py:main or package.module:main")],
    root_id: Annotated[
        str | None,
        typer.Option("--root-id", help="Stable workflow id; the same id resumes its journals."),
    ] = None,
    budget: Annotated[
        int | None, typer.Option("--budget", min=0, help="Token limit of the run.")
    ] = None,
    budget_usd: Annotated[
        str | None,
        typer.Option("--budget-usd", help="Dollar limit of the run (e.g. 5 or 2.50)."),
    ] = None,
    account: Annotated[
        str | None,
        typer.Option(
            "--account",
            help="Shared account above the run (e.g. team:research; create it with "
            "`fleet budget set`); its limits bind too.",
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", help="Journal: sqlite:PATH, redis://... or memory (FLEET_STORE)."),
    ] = None,
    executor: Annotated[str, typer.Option("--executor", help="local or celery.")] = "local",
    agents: Annotated[
        Path | None,
        typer.Option("--agents", help="Agents file (TOML); default FLEET_AGENTS_FILE if present."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Local steps at once.")
    ] = 8,
    event_stream: Annotated[
        str,
        typer.Option(
            "--event-stream",
            help="Where `fleet watch` follows the run: 'auto' (the SQLite journal's file, or "
            "FLEET_REDIS_URL when the run uses Redis), a redis:// URL, sqlite:PATH, or 'off'.",
        ),
    ] = "auto",
) -> None:
    """Run a workflow program: `async def main(workflow)`."""
    config = settings(store=store)
    usd = _dollar_limit(budget_usd)
    if account is not None:
        try:
            check_account_name(account)
        except BudgetError as error:
            raise typer.BadParameter(str(error), param_hint="--account") from None
    program, module = load_program(target)
    root = root_id or f"wf-{uuid.uuid4().hex[:12]}"
    places = plan_run(config, executor=executor, event_stream=event_stream)
    outcome = _Outcome()
    program_agents_ = program_agents(module, agents, config)
    check_reachable(config, places, executor=executor)  # one line, before anything runs
    if executor == "celery" and program_agents_:
        say(
            "note: Celery workers run the agents of their own agents file; make sure "
            f"it declares {', '.join(sorted(program_agents_))}"
        )

    async def main() -> None:
        async with open_run(
            config,
            places,
            root_id=root,
            executor=executor,
            agents=program_agents_,
            budget_tokens=budget,
            concurrency=concurrency,
            budget_usd=usd,
            account=account,
        ) as builder:
            await _drive(program, builder, outcome)

    say(
        f"running {target} as workflow {root} on the {executor} executor ({places.describe()}"
        + (f", budget {budget} tokens" if budget is not None else "")
        + (f", budget ${usd}" if usd is not None else "")
        + (f", account {account}" if account is not None else "")
        + ")"
    )
    started = time.monotonic()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        say(f"interrupted; re-run with --root-id {root} to resume")
        raise
    _summary(root, outcome, time.monotonic() - started, config.store)
    if outcome.interrupted:
        raise typer.Exit(130)
    display = outcome.display
    if outcome.error is not None or outcome.cancelled is not None:
        raise typer.Exit(1)
    if display is not None and display.all_failed:
        raise typer.Exit(1)  # the exit status says whether every step succeeded


# --- fleet watch and fleet status --------------------------------------------------------


def _where(
    root_id: str, store: str | None, redis_url: str | None, executor: str
) -> tuple[FleetSettings, Located, bool]:
    config = settings(store=store, redis_url=redis_url)
    explicit = store is not None or redis_url is not None
    located = find_run(
        config, root_id, executor=executor, explicit=explicit, redis_given=redis_url is not None
    )
    return config, located, explicit


def _wait_for_start(
    config: FleetSettings,
    located: Located,
    root_id: str,
    executor: str,
    deadline: float | None,
    timeout: float | None,
) -> Located:
    """Look again in every place until the run starts in one of them (or time is up)."""
    say(f"waiting for workflow {root_id} to start (looking in: {'; '.join(located.looked)})")
    while not located.found:
        if deadline is not None and time.monotonic() >= deadline:
            say(f"gave up after {timeout} s; workflow {root_id} never started")
            raise typer.Exit(1)
        time.sleep(0.3)
        located = locate_run(config, root_id, executor=executor)
    return located


def _print_event(cursor: str, text: str) -> None:
    try:
        event = parse_event(text)
    except ValueError as error:  # pydantic's ValidationError included
        say(f"skipping an unreadable event (entry {cursor}: {type(error).__name__})")
        return
    line = describe_event(event)
    if line is not None:
        say(line)


_STORE_HELP = "Journal the run used (default FLEET_STORE, as for `fleet run`)."
_REDIS_HELP = "The fleet's Redis (default FLEET_REDIS_URL)."
_EXECUTOR_HELP = "The executor the run used (local or celery), as for `fleet run`."


@app.command()
def watch(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    store: Annotated[str | None, typer.Option("--store", help=_STORE_HELP)] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help=_REDIS_HELP)] = None,
    executor: Annotated[str, typer.Option("--executor", help=_EXECUTOR_HELP)] = "local",
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0, help="Give up after this many seconds (exit 1)."),
    ] = None,
    output: Annotated[
        bool,
        typer.Option("--output", help="Also show the live text of running steps (a fleet run)."),
    ] = False,
    step: Annotated[
        str | None,
        typer.Option("--step", help="Show this step's live text whole (implies --output)."),
    ] = None,
) -> None:
    """Follow a workflow's events live, from any terminal that reaches its journal or Redis."""
    config, located, explicit = _where(root_id, store, redis_url, executor)
    live = LiveOutput(config.key_prefix, root_id, step, enabled=output or step is not None)
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = not located.found and not explicit
    if waited:
        located = _wait_for_start(config, located, root_id, executor, deadline, timeout)
    reader = open_reader(config, located.places)
    try:
        started = not waited and reader.last_start(root_id) is not None
        if started:
            say(f"following workflow {root_id} ({reader.where})")
        elif not waited:
            say(f"waiting for workflow {root_id} to start ({reader.where})")
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        abandoned = _abandonment(board_at(config, located.places), root_id)
        entries = follow(reader, root_id, timeout_s=remaining, abandoned=abandoned)
        if _show(entries, root_id, started=started, live=live, events=located.places.events):
            return
    except Exception as error:
        if isinstance(error, ConfigError | typer.Exit):
            raise
        raise ConfigError(
            f"cannot read the event log at {reader.where}: {type(error).__name__}: {error}"
        ) from None
    finally:
        live.end()
        reader.close()
    say(f"gave up after {timeout} s; workflow {root_id} has not ended (looked in {reader.where})")
    raise typer.Exit(1)


def _abandonment(board: RunRegistry, root_id: str) -> Callable[[], str | None]:
    """What :func:`~fleet.runlog.follow` asks: why the run's host is gone, if it is."""

    def abandoned() -> str | None:
        try:
            record = asyncio.run(latest_run(board, root_id))
        except FleetError:
            return None  # an unreadable board proves nothing
        return record.describe() if record is not None and record.abandoned else None

    return abandoned


def _show(
    entries: Iterable[LogEntry],
    root_id: str,
    *,
    started: bool,
    live: LiveOutput,
    events: str | None,
) -> bool:
    """Print a run's entries; ``True`` once it ended, exit 1 when it was abandoned."""
    for entry in entries:
        fields = entry.fields
        control = fields.get("control")
        live.on_entry(fields, events, entry.cursor)
        if control == "start" and not started:
            say(f"workflow {root_id} started")
        elif control == "end":
            say(f"workflow {root_id} {fields.get('status', 'ended')}")
            return True
        elif control == "abandoned":
            say(f"workflow {root_id} {fields['why']}; it will not end on its own")
            raise typer.Exit(1)
        elif "event" in fields:
            _print_event(entry.cursor, fields["event"])
    return False


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _no_phases(status: str, dead: bool) -> str:
    """Why a run's journal holds no phase: only a finished run clears its journal."""
    if status == "finished":
        return "no phases kept (a finished run clears them)"
    if dead:
        return "no phase completed before its host stopped"
    return "no phase completed yet" if status == "running" else "no phase completed"


def _print_status(report: RunStatus, run: RunRecord | None) -> None:
    summary = report.summary
    say(f"workflow {report.root_id} ({report.places.describe()})")
    dead = run is not None and run.abandoned and (summary is None or summary.status == "running")
    if summary is not None:
        state = "abandoned" if dead else summary.status
        line = f"  {state}: started {_when(summary.started_at)}"
        if summary.ended_at is not None and summary.started_at is not None:
            took = summary.ended_at - summary.started_at
            line += f", ended {_when(summary.ended_at)} ({took:.1f} s)"
        say(line)
        flight = f"{summary.steps_in_flight} in flight"
        if dead:
            flight = f"{summary.steps_in_flight} were in flight when its host stopped"
        say(
            f"  steps: {summary.steps_done} done, {summary.steps_failed} failed, "
            f"{flight}; {summary.tokens} tokens"
            + (f"; phases: {', '.join(summary.phases)}" if summary.phases else "")
        )
    if report.phases:
        say("  journal:")
    for row in report.phases:
        text = row.error or (
            f"{_count(row.steps, 'step')} journaled (last at {_when(row.last_recorded)})"
        )
        say(f"    phase {row.name}: {text}")
    if not report.phases and summary is not None:
        say(f"  journal: {_no_phases(summary.status, dead)}")
    if report.budget is not None:
        say(f"  budget: {report.budget}")
    else:
        say(f"  budget: {report.budget_note or 'none recorded'}")
    if run is not None:
        say(f"  run: {run.describe()}")
    if dead:
        say(f"  re-run with --root-id {report.root_id} to resume from its journal")
    for line in report.limits:
        say(f"  provider limit {line}")


@app.command()
def status(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    store: Annotated[str | None, typer.Option("--store", help=_STORE_HELP)] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help=_REDIS_HELP)] = None,
    executor: Annotated[str, typer.Option("--executor", help=_EXECUTOR_HELP)] = "local",
) -> None:
    """Show a workflow: running or ended, steps, journaled phases and budget."""
    config, located, _explicit = _where(root_id, store, redis_url, executor)
    report = asyncio.run(read_status(config, located.places, root_id))
    try:
        run = asyncio.run(latest_run(board_at(config, located.places), root_id))
    except FleetError:
        run = None  # the journal and log above still tell what is known
    host = run is None or run.shown_status == "running"  # cancelled or abandoned: none
    ask_lines = asyncio.run(read_asks(config, located.places, root_id, host=host))
    if not report.known and run is None and not ask_lines:
        say(f"no workflow {root_id!r} found (looked in: {'; '.join(located.looked)})")
        raise typer.Exit(1)
    _print_status(report, run)
    for line in ask_lines:
        say(line)
