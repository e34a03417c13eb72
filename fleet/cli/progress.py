"""What ``fleet run`` and ``fleet watch`` show: plain event lines and the live progress table."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..budget import BudgetSnapshot
from ..eventbus import Lagged
from ..events import (
    Answered,
    Asked,
    BudgetExhausted,
    LogEvent,
    PhaseEnd,
    PhaseStart,
    StepFinished,
    StepStarted,
    WorkflowCancelled,
)
from ..workflow import Workflow
from .app import console, err_console

__all__ = ["RunDisplay", "describe_event", "say"]


def _fields(fields: Mapping[str, Any]) -> str:
    return "".join(f" {key}={json.dumps(value, default=str)}" for key, value in fields.items())


def describe_event(event: Any) -> str | None:
    """One plain line for an event (``None`` for ``step_started``, too chatty to print)."""
    if isinstance(event, PhaseStart):
        steps = "step" if event.step_count == 1 else "steps"
        return f"phase {event.index} {event.name}: {event.step_count} {steps}"
    if isinstance(event, PhaseEnd):
        return f"phase {event.index} {event.name}: {event.succeeded} ok, {event.failed} failed"
    if isinstance(event, LogEvent):
        return f"[{event.level}] {event.message}{_fields(event.fields)}"
    if isinstance(event, BudgetExhausted):
        return f"budget exhausted: {event.reason}"
    if isinstance(event, WorkflowCancelled):
        return f"workflow cancelled: {event.reason}"
    if isinstance(event, StepFinished):
        state = "ok" if event.success else f"FAILED ({event.error})"
        if not event.success and event.message:
            state += f": {event.message}"
        where = f" on {event.worker}" if event.worker else ""
        cost = "" if event.cost_usd is None else f", ${event.cost_usd}"
        return (
            f"  step {event.task_id} [{event.agent}] {state}, {event.total_tokens} tokens"
            f"{cost}, {event.duration_s:.2f} s{where}"
        )
    if isinstance(event, Lagged):
        return f"... {event.missed} events not shown (the display fell behind)"
    if isinstance(event, Asked):
        return f"waiting for an answer to {event.name!r}: {event.question} (fleet answer)"
    if isinstance(event, Answered):
        return f"{event.name!r} answered by {event.by}"
    return None


def say(line: str) -> None:
    """Print one plain line (no markup, no wrapping)."""
    console.print(line, highlight=False, markup=False, soft_wrap=True)


@dataclass
class _PhaseRow:
    name: str
    index: int
    step_count: int
    ran: int = 0
    failed: int = 0
    journaled: int = 0
    refused: int = 0
    """Steps that failed without running (unknown agent, duplicate or stale, cancelled)."""
    open: bool = True


@dataclass
class RunDisplay:
    """Follows a workflow's events: a live table on a terminal, plain lines otherwise."""

    workflow: Workflow
    live: Live | None = None
    started: float = field(default_factory=time.monotonic)
    phases: list[_PhaseRow] = field(default_factory=list)
    running: int = 0
    in_flight: dict[str, str] = field(default_factory=dict)
    """Steps started and not finished: task id -> agent."""
    done: int = 0
    failed: int = 0
    tokens: int = 0
    snapshot: BudgetSnapshot | None = None
    _next_refresh: float = 0.0
    _next_line: float = 0.0

    async def follow(self, subscription: Any) -> None:
        """Consume events until the workflow closes."""
        async for event in subscription:
            await self.take(event)

    async def take(self, event: Any) -> None:
        """Account for one event and show it."""
        open_phase = next((row for row in reversed(self.phases) if row.open), None)
        if isinstance(event, StepStarted):
            self.running += 1
            self.in_flight[event.task_id] = event.agent
        elif isinstance(event, StepFinished):
            self.running = max(self.running - 1, 0)
            self.in_flight.pop(event.task_id, None)
            self.done += 1
            self.failed += not event.success
            self.tokens += event.total_tokens
            if open_phase is not None:
                open_phase.ran += 1
                open_phase.failed += not event.success
        elif isinstance(event, PhaseStart):
            self.phases.append(_PhaseRow(event.name, event.index, event.step_count))
        elif isinstance(event, PhaseEnd):
            self._close_phase(event)
        if isinstance(event, PhaseEnd | BudgetExhausted):
            await self.refresh_budget()
        self._show(event)

    def _close_phase(self, event: PhaseEnd) -> None:
        for row in self.phases:
            if row.index == event.index:
                row.open = False
                # Only succeeded steps are journaled; a failure that never ran was refused.
                row.journaled = max(event.succeeded - (row.ran - row.failed), 0)
                row.refused = max(event.failed - row.failed, 0)
                row.failed = event.failed

    @property
    def journaled(self) -> int:
        """Steps served from the journal (succeeded earlier, not run again)."""
        return sum(row.journaled for row in self.phases)

    @property
    def refused(self) -> int:
        """Steps that failed without running."""
        return sum(row.refused for row in self.phases)

    @property
    def all_failed(self) -> int:
        """Every failed step: those that ran and failed, and those refused."""
        return self.failed + self.refused

    async def refresh_budget(self) -> None:
        """Read the budget (if any) for the tokens-vs-limit figure."""
        try:
            self.snapshot = await self.workflow.budget_snapshot()
        except Exception as error:  # the display must never stop the run
            err_console.print(f"cannot read the budget: {error}", highlight=False)

    def _show(self, event: Any) -> None:
        now = time.monotonic()
        if self.live is None:
            line = describe_event(event)
            if isinstance(event, StepFinished) and event.success:
                line = None  # plain mode prints failures only, plus a progress line
                if now >= self._next_line:
                    self._next_line = now + 2.0
                    line = self.progress_line()
            if line is not None:
                say(line)
            return
        if isinstance(
            event, LogEvent | BudgetExhausted | WorkflowCancelled | Lagged | Asked | Answered
        ):
            self.live.console.print(describe_event(event), highlight=False, markup=False)
        if now >= self._next_refresh or not isinstance(event, StepStarted | StepFinished):
            self._next_refresh = now + 0.1
            self.live.update(self.render(), refresh=True)

    def tokens_text(self) -> str:
        """Tokens used, against the budget when there is one, in the units it limits."""
        text = f"{self.tokens} tokens this run"
        budget = self.snapshot
        if budget is None:
            return text
        limits = []
        if budget.limit_tokens is not None:
            limits.append(f"{budget.consumed_tokens} / {budget.limit_tokens} tokens")
        if budget.limit_usd is not None:
            limits.append(f"${budget.consumed_usd} / ${budget.limit_usd}")
        if not limits:  # an account above the run binds; the run itself is uncapped
            limits.append(f"{budget.consumed_tokens} tokens, ${budget.consumed_usd}, uncapped")
        return f"{text}; budget " + ", ".join(limits)

    def progress_line(self) -> str:
        """One plain progress line."""
        return (
            f"[{time.monotonic() - self.started:7.2f} s] steps {self.done} done "
            f"({self.failed} failed), {self.running} running; {self.tokens_text()}"
        )

    def render(self) -> Group:
        """The live progress panel: a row per phase, then the totals."""
        table = Table(title=f"workflow {self.workflow.root_id}", title_justify="left")
        for column in ("#", "phase", "steps", "failed", "from journal", ""):
            table.add_column(column)
        for row in self.phases:
            done = row.ran + row.journaled
            table.add_row(
                str(row.index),
                row.name,
                f"{done}/{row.step_count}",
                str(row.failed),
                str(row.journaled) if not row.open else "",
                "running" if row.open else "done",
            )
        totals = Text(
            f"{time.monotonic() - self.started:.1f} s · steps {self.done} done, "
            f"{self.failed} failed, {self.running} running · {self.tokens_text()}",
            style="dim",
        )
        return Group(table, totals)
