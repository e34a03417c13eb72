"""``fleet run``, ``fleet watch`` and ``fleet status``: run a workflow program and follow it.

``fleet run path/to/flow.py:main`` (or ``package.module:main``) imports the program,
builds a :class:`~fleet.Workflow` from the options and settings, and awaits
``main(workflow)`` with a live progress display (plain lines when stdout is not a
terminal). A program may define ``AGENTS = {name: agent}``; they are registered with the
local executor beside the agents file.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.live import Live

from ..budget import BudgetSnapshot, WorkflowBudget
from ..config import FleetSettings, mask_url
from ..errors import CheckpointError, ConfigError
from ..eventbus import event_stream_key
from ..executor import AgentExecutor
from ..ledgers import BudgetLedger, MemoryLedger, RedisLedger
from ..local import LocalExecutor
from ..stores import CheckpointStore, open_store
from ..workflow import Workflow
from .app import app, console, err_console, settings
from .program import Program, load_program, program_agents
from .progress import RunDisplay, describe_event, say

__all__ = ["run", "status", "watch"]


# --- fleet run ---------------------------------------------------------------------------


def _ledger(config: FleetSettings, shared: bool) -> BudgetLedger:
    return RedisLedger(config.redis_url, key_prefix=config.key_prefix) if shared else MemoryLedger()


def _executor(
    kind: str,
    agents: dict[str, Any],
    budget: WorkflowBudget | None,
    concurrency: int,
    config: FleetSettings,
) -> AgentExecutor:
    if kind == "local":
        return LocalExecutor(
            agents=agents,
            budget=budget,
            max_concurrency=concurrency,
            default_reserve_tokens=config.default_reserve_tokens,
        )
    if kind == "celery":
        try:
            from ..celery import CeleryExecutor
        except ImportError as error:
            raise ConfigError(f"the Celery host cannot be loaded: {error}") from None
        if agents:
            say(
                "note: Celery workers run the agents of their own agents file; make sure "
                f"it declares {', '.join(sorted(agents))}"
            )
        executor: AgentExecutor = CeleryExecutor(settings=config, budget=budget)
        return executor
    raise ConfigError(f"unknown executor {kind!r}; use 'local' or 'celery'", key="--executor")


def _stream_url(option: str, shared: bool, config: FleetSettings) -> str | None:
    if option == "off":
        return None
    if option == "auto":
        return config.redis_url if shared else None
    if option.startswith(("redis://", "rediss://", "unix://")):
        return option
    raise ConfigError(
        f"--event-stream must be 'auto', 'off' or a redis:// URL, got {option!r}",
        key="--event-stream",
    )


async def _close(resource: Any) -> None:
    for name in ("aclose", "close"):
        method = getattr(resource, name, None)
        if method is not None:
            result = method()
            if inspect.isawaitable(result):
                await result
            return


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    display: RunDisplay | None = None


async def _drive(
    program: Program, builder: Any, budget: WorkflowBudget | None, outcome: _Outcome
) -> None:
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
    try:
        async with workflow:
            outcome.result = await program(workflow)
    except Exception as error:
        outcome.error = error
    finally:
        await follower  # ends once the workflow closed and its events are drained
        if budget is not None:
            await display.refresh_budget()
        if live is not None:
            live.update(display.render(), refresh=True)
            live.stop()


def _summary(root_id: str, outcome: _Outcome, wall_s: float, store: str) -> None:
    display = outcome.display
    phases = len(display.phases) if display else 0
    journaled = sum(row.journaled for row in display.phases) if display else 0
    done, failed = (display.done, display.failed) if display else (0, 0)
    tokens = display.tokens_text() if display else ""
    verb = "finished" if outcome.error is None else "FAILED"
    say(
        f"workflow {root_id} {verb} in {wall_s:.2f} s: {phases} phases, {done} steps run "
        f"({failed} failed), {journaled} served from the journal; {tokens}"
    )
    if outcome.error is not None:
        err_console.print(
            f"{type(outcome.error).__name__}: {outcome.error}", highlight=False, markup=False
        )
        if store != "memory":
            say(f"completed phases stay journaled: re-run with --root-id {root_id} to resume")
    elif outcome.result is not None:
        try:
            text = json.dumps(outcome.result, indent=2, default=str)
        except (TypeError, ValueError):
            text = repr(outcome.result)
        say(f"result: {text}")


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
            help="Redis URL for `fleet watch`; 'auto' uses FLEET_REDIS_URL when the run uses "
            "Redis (celery executor or redis store), 'off' disables it.",
        ),
    ] = "auto",
) -> None:
    """Run a workflow program: `async def main(workflow)`."""
    config = settings(store=store)
    program, module = load_program(target)
    root = root_id or f"wf-{uuid.uuid4().hex[:12]}"
    shared = executor == "celery" or config.store.startswith(("redis://", "rediss://"))
    stream = _stream_url(event_stream, shared, config)
    outcome = _Outcome()

    async def main() -> None:
        ledger = _ledger(config, shared) if budget is not None else None
        plan = None if ledger is None else WorkflowBudget(budget, ledger=ledger, workflow_id=root)
        host = _executor(
            executor, program_agents(module, agents, config), plan, concurrency, config
        )
        journal: CheckpointStore = open_store(config.store, key_prefix=config.key_prefix)
        builder = Workflow.builder(host).with_store(journal).with_root_id(root)
        if plan is not None:
            builder = builder.with_budget(plan)
        if stream is not None:
            builder = builder.with_event_stream(
                stream, key_prefix=config.key_prefix, maxlen=config.event_stream_maxlen
            )
        try:
            await _drive(program, builder, plan, outcome)
        finally:
            for resource in (journal, host, ledger):
                if resource is not None:
                    await _close(resource)

    say(
        f"running {target} as workflow {root} on the {executor} executor "
        f"(journal {mask_url(config.store)}"
        + (f", budget {budget} tokens)" if budget is not None else ")")
    )
    started = time.monotonic()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        say(f"interrupted; re-run with --root-id {root} to resume")
        raise
    _summary(root, outcome, time.monotonic() - started, config.store)
    if outcome.error is not None:
        raise typer.Exit(1)


# --- fleet watch -------------------------------------------------------------------------


def _decode(entry: Mapping[bytes, bytes]) -> dict[str, str]:
    return {
        key.decode(errors="replace"): value.decode(errors="replace") for key, value in entry.items()
    }


def _last_start(client: Any, key: str) -> bytes | None:
    """Id of the newest ``start`` marker in the stream, if any."""
    newest = "+"
    while True:
        page = cast(list[Any], client.xrevrange(key, max=newest, count=500))
        for entry_id, entry in page:
            if entry.get(b"control") == b"start":
                return bytes(entry_id)
        if len(page) < 500:
            return None
        newest = "(" + page[-1][0].decode()


@app.command()
def watch(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="Default FLEET_REDIS_URL.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0, help="Give up after this many seconds (exit 1)."),
    ] = None,
) -> None:
    """Follow a running workflow's events from another terminal (needs its event stream)."""
    from redis import Redis
    from redis.exceptions import RedisError

    from ..events import parse_event

    config = settings(redis_url=redis_url)
    key = event_stream_key(root_id, key_prefix=config.key_prefix)
    try:
        client = Redis.from_url(config.redis_url)
    except ValueError as error:  # e.g. an unknown scheme or a port out of range
        raise ConfigError(
            f"invalid Redis URL {config.masked_redis_url()}: {error}", key="redis_url"
        ) from None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        start = _last_start(client, key)
        cursor: bytes | str = b"0" if start is None else start
        if start is None:
            say(f"waiting for workflow {root_id} to start ({key})")
        else:
            say(f"following workflow {root_id} ({key})")
        while deadline is None or time.monotonic() < deadline:
            reply = cast(list[Any], client.xread({key: cursor}, block=500, count=200))
            for _stream, entries in reply or []:
                for entry_id, raw in entries:
                    cursor = entry_id
                    entry = _decode(raw)
                    if entry.get("control") == "start" and start is None:
                        say(f"workflow {root_id} started")
                    elif entry.get("control") == "end":
                        say(f"workflow {root_id} {entry.get('status', 'ended')}")
                        return
                    elif "event" in entry:
                        try:
                            event = parse_event(entry["event"])
                        except ValueError as error:  # pydantic's ValidationError included
                            name = type(error).__name__
                            say(f"skipping an unreadable event (stream entry {entry_id!r}: {name})")
                            continue
                        line = describe_event(event)
                        if line is not None:
                            say(line)
    except RedisError as error:
        raise ConfigError(
            f"cannot read the event stream at {config.masked_redis_url()}: {error}"
        ) from None
    finally:
        client.close()
    say(f"gave up after {timeout} s; workflow {root_id} has not ended")
    raise typer.Exit(1)


# --- fleet status ------------------------------------------------------------------------


async def _journal_rows(journal: CheckpointStore, root_id: str) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    prefix = f"{root_id}/"
    for workflow_id in await journal.list_workflows():
        if not workflow_id.startswith(prefix):
            continue
        name = workflow_id[len(prefix) :]
        try:
            checkpoint = await journal.load(workflow_id)
        except CheckpointError as error:
            rows.append((0, name, f"unreadable: {error}"))
            continue
        steps = checkpoint.steps if checkpoint is not None else ()
        first = min((record.recorded_ms for record in steps), default=0)
        last = max((record.recorded_ms for record in steps), default=0)
        when = time.strftime("%H:%M:%S", time.localtime(last / 1000)) if last else "-"
        rows.append((first, name, f"{len(steps)} steps journaled (last at {when})"))
    return sorted(rows)


async def _budget_line(config: FleetSettings, root_id: str) -> str:
    ledger = RedisLedger(config.redis_url, key_prefix=config.key_prefix)
    try:
        state = await asyncio.wait_for(ledger.state(root_id), 5.0)
    except Exception as error:
        return f"budget: no shared ledger readable ({error})"
    finally:
        await ledger.close()
    if not state.limit_set and state.consumed == 0 and state.reserved == 0:
        return "budget: none recorded"
    snapshot = BudgetSnapshot(
        consumed_tokens=state.consumed, reserved_tokens=state.reserved, limit_tokens=state.limit
    )
    return f"budget: {snapshot}"


@app.command()
def status(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    store: Annotated[
        str | None, typer.Option("--store", help="Journal (default FLEET_STORE).")
    ] = None,
) -> None:
    """Print a workflow's journal progress (phases journaled, steps) and its budget."""
    config = settings(store=store)

    async def read() -> tuple[list[tuple[int, str, str]], str]:
        async with open_store(config.store, key_prefix=config.key_prefix) as journal:
            rows = await _journal_rows(journal, root_id)
        return rows, await _budget_line(config, root_id)

    rows, budget_line = asyncio.run(read())
    say(f"workflow {root_id} (journal {mask_url(config.store)})")
    if not rows:
        say("no phases journaled (never run here, or finished and cleared)")
    for _first, name, text in rows:
        say(f"  phase {name}: {text}")
    say(budget_line)
