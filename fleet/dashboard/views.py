"""What the dashboard shows of one workflow, folded from its run log (:mod:`fleet.runlog`).

A :class:`WorkflowView` takes the log entries of the newest run of a root id one by one
and keeps its phases in order, their steps, the budget, rate-limit waits and how the run
ended. It holds counts, ids, names, token and dollar amounts, error kinds and worker
names: never a prompt or an output (those are never in the log); log lines are kept but
only served when the operator turns ``dashboard_show_text`` on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .values import float_or_none, int_or_zero, money_or_none, str_or_none

__all__ = [
    "INTERRUPTED",
    "NO_PHASE",
    "PhaseView",
    "StepView",
    "WorkflowView",
    "public_status",
]

NO_PHASE = "(outside phases)"
"""The name under which steps run by ``agent``/``parallel``/``pipeline``/``loop`` are shown."""

INTERRUPTED = "interrupted"
"""A step that was in flight when its run stopped running (abandoned, cancelled, ended)."""

_MAX_RATE_WAITS = 200
"""Rate-limit waits a view keeps (the newest), beside their count and total."""
_MAX_LOGS = 200
"""Log lines a view keeps (the newest); shown only with ``dashboard_show_text``."""


def public_status(
    ended_as: str | None, cancelled: bool, steps_failed: int, *, abandoned: bool = False
) -> str:
    """``running``, ``finished``, ``cancelled``, ``failed`` or ``abandoned``.

    From how a run's log ended. A run logs ``closed`` when its program stopped without
    finishing (journals kept for a resume): that reads as ``failed`` when a step failed,
    else ``finished``. A log that never ended reads ``abandoned`` once its host's
    heartbeat lapsed (``abandoned``), else ``running``.
    """
    if cancelled or ended_as == "cancelled":
        return "cancelled"
    if ended_as is None:
        return "abandoned" if abandoned else "running"
    if ended_as == "failed" or (ended_as == "closed" and steps_failed):
        return "failed"
    return "finished"


@dataclass
class StepView:
    """One step of a workflow as the dashboard shows it."""

    task_id: str
    agent: str
    phase: int
    """Index into :attr:`WorkflowView.phases`."""
    status: str = "running"
    """``running``, ``done`` or ``failed`` as logged; see :meth:`WorkflowView.step_status`."""
    worker: str | None = None
    duration_s: float | None = None
    tokens: int = 0
    cost_usd: str | None = None
    error: str | None = None
    host_task_id: str | None = None
    """The host's id of the step (the Celery task id on the fleet), for a Flower link."""
    rate_wait_s: float = 0.0
    """Seconds its model calls waited for a provider limit."""

    def to_dict(self, flower_url: str | None, status: str | None = None) -> dict[str, Any]:
        """The step's JSON form; ``flower`` links its task when Flower is configured.

        Args:
            flower_url: Flower's address, or ``None``.
            status: the status to show (:meth:`WorkflowView.step_status`); default the logged one.
        """
        link = None
        if flower_url and self.host_task_id:
            link = f"{flower_url.rstrip('/')}/task/{self.host_task_id}"
        return {
            "task_id": self.task_id,
            "agent": self.agent,
            "status": status or self.status,
            "worker": self.worker,
            "duration_s": self.duration_s,
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
            "error": self.error,
            "rate_wait_s": round(self.rate_wait_s, 3),
            "flower": link,
        }


@dataclass
class PhaseView:
    """One phase (or the steps outside phases) of a workflow."""

    name: str
    index: int | None
    """The phase's index in the workflow; ``None`` for :data:`NO_PHASE`."""
    step_count: int = 0
    ended: bool = False
    steps: list[StepView] = field(default_factory=list)


@dataclass
class WorkflowView:
    """The newest run of one root id, folded from its log."""

    root_id: str
    source: str
    """Where its log was read (masked)."""
    run_id: str | None = None
    started_at: float | None = None
    start_entry: str | None = None
    """Where its log's ``start`` entry is (a Redis stream id, or a SQLite row number)."""
    ended_at: float | None = None
    ended_as: str | None = None
    """How the log ended: ``finished``, ``closed``, ``failed``, ``cancelled``; ``None``: running."""
    last_seen: float | None = None
    """When the dashboard last read a new entry of this run (epoch seconds)."""
    phases: list[PhaseView] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    """The last budget reading the run logged."""
    ledger_budget: dict[str, Any] | None = None
    """The run's ledger now, when the dashboard could read it (:mod:`.ledger`)."""
    budget_exhausted: str | None = None
    cancelled: str | None = None
    """The cancel reason once a ``workflow_cancelled`` event arrived."""
    abandoned: str | None = None
    """Why the run reads as abandoned (its host stopped heartbeating); ``None``: it does not."""
    rate_waits: list[dict[str, Any]] = field(default_factory=list)
    rate_wait_count: int = 0
    rate_wait_s: float = 0.0
    logs: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    """Grows with every entry folded in (what the live page waits on)."""
    _open: dict[str, list[StepView]] = field(default_factory=dict, repr=False)
    _by_id: dict[str, StepView] = field(default_factory=dict, repr=False)
    _current: list[int] = field(default_factory=list, repr=False)

    # -- folding ---------------------------------------------------------------------

    def fold(self, fields: Mapping[str, str], *, now: float) -> None:
        """Apply one log entry (see :mod:`fleet.runlog` for their forms)."""
        self.version += 1
        self.last_seen = now
        control = fields.get("control")
        if control == "end":
            self.ended_as = fields.get("status") or "closed"
            self.ended_at = float_or_none(fields.get("at"))
            for steps in self._open.values():
                for step in steps:  # never finished: the run stopped under them
                    step.status = "failed"
                    step.error = "cancelled" if self.ended_as == "cancelled" else "unfinished"
            self._open.clear()
        elif control == "budget":
            with contextlib.suppress(ValueError):
                snapshot = json.loads(fields.get("snapshot", ""))
                if isinstance(snapshot, dict):
                    self.budget = snapshot
        elif "event" in fields:
            try:
                event = json.loads(fields["event"])
            except ValueError:
                return
            if isinstance(event, dict):
                self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "phase_start":
            self.phases.append(
                PhaseView(
                    name=str(event.get("name", "")),
                    index=int_or_zero(event.get("index")),
                    step_count=int_or_zero(event.get("step_count")),
                )
            )
            self._current.append(len(self.phases) - 1)
        elif kind == "phase_end":
            for position in reversed(self._current):
                if self.phases[position].name == str(event.get("name", "")):
                    self.phases[position].ended = True
                    self._current.remove(position)
                    break
        elif kind == "step_started":
            self._started(event)
        elif kind == "step_finished":
            self._finished(event)
        elif kind == "rate_limited":
            self._rate_limited(event)
        elif kind == "budget_exhausted":
            self.budget_exhausted = str(event.get("reason", "budget exhausted"))
        elif kind == "workflow_cancelled":
            self.cancelled = str(event.get("reason", "cancelled"))
        elif kind == "log":
            self.logs.append(
                {
                    "level": str(event.get("level", "")),
                    "message": str(event.get("message", "")),
                    "fields": event.get("fields") or {},
                }
            )
            del self.logs[:-_MAX_LOGS]

    def _phase_for_new_step(self) -> int:
        if self._current:
            return self._current[-1]
        if not self.phases or self.phases[-1].index is not None:
            self.phases.append(PhaseView(name=NO_PHASE, index=None))
        return len(self.phases) - 1

    def _started(self, event: dict[str, Any], *, running: bool = True) -> StepView:
        phase = self._phase_for_new_step()
        step = StepView(
            task_id=str(event.get("task_id", "")),
            agent=str(event.get("agent", "")),
            phase=phase,
            host_task_id=str_or_none(event.get("host_task_id")),
            worker=str_or_none(event.get("worker")),
        )
        self.phases[phase].steps.append(step)
        if self.phases[phase].index is None:
            self.phases[phase].step_count += 1
        if running:
            self._open.setdefault(step.task_id, []).append(step)
        self._by_id[step.task_id] = step
        return step

    def _finished(self, event: dict[str, Any]) -> None:
        task_id = str(event.get("task_id", ""))
        waiting = self._open.get(task_id)
        if waiting:
            step = waiting.pop(0)
            if not waiting:
                del self._open[task_id]
        else:  # served from the journal, or its start fell out of the capped log
            step = self._started(event, running=False)
        step.status = "done" if event.get("success") else "failed"
        step.worker = str_or_none(event.get("worker")) or step.worker
        step.duration_s = float_or_none(event.get("duration_s"))
        step.tokens = int_or_zero(event.get("total_tokens"))
        step.cost_usd = money_or_none(event.get("cost_usd"))
        step.error = str_or_none(event.get("error"))
        step.host_task_id = str_or_none(event.get("host_task_id")) or step.host_task_id

    def _rate_limited(self, event: dict[str, Any]) -> None:
        wait = float_or_none(event.get("wait_s")) or 0.0
        task_id = str_or_none(event.get("task_id"))
        self.rate_wait_count += 1
        self.rate_wait_s += wait
        self.rate_waits.append(
            {
                "limit": str(event.get("limit", "")),
                "wait_s": round(wait, 3),
                "task_id": task_id,
                "agent": str_or_none(event.get("agent")),
            }
        )
        del self.rate_waits[:-_MAX_RATE_WAITS]
        step = self._by_id.get(task_id or "")
        if step is not None:
            step.rate_wait_s += wait

    # -- reading ---------------------------------------------------------------------

    def find(self, task_id: str) -> StepView | None:
        """The newest step with this task id."""
        return self._by_id.get(task_id)

    def journal_id(self, step: StepView) -> str | None:
        """Where the step's phase is journaled (``{root}/{name}``, ``#2``... for repeats).

        ``None`` for steps outside phases, which are never journaled.
        """
        phase = self.phases[step.phase]
        if phase.index is None:
            return None
        repeat = sum(1 for other in self.phases[: step.phase + 1] if other.name == phase.name)
        return f"{self.root_id}/{phase.name}" + (f"#{repeat}" if repeat > 1 else "")

    def steps(self) -> list[StepView]:
        """Every step, phase by phase."""
        return [step for phase in self.phases for step in phase.steps]

    def step_status(self, step: StepView) -> str:
        """The step's shown status: :data:`INTERRUPTED` for one still open in a run not running.

        A run that is abandoned (its host died) or cancelled never logs an outcome for the
        steps it had in flight; they no longer run, so they must not read ``running``.
        """
        if step.status == "running" and self.status != "running":
            return INTERRUPTED
        return step.status

    @property
    def status(self) -> str:
        """The public status (see :func:`public_status`)."""
        failed = sum(1 for step in self.steps() if step.status == "failed")
        return public_status(
            self.ended_as, self.cancelled is not None, failed, abandoned=bool(self.abandoned)
        )

    def summary(self, *, now: float) -> dict[str, Any]:
        """The list row: status, times, step counts, tokens, dollars and budget."""
        steps = self.steps()
        done = sum(1 for step in steps if step.status == "done")
        failed = sum(1 for step in steps if step.status == "failed")
        shown = [self.step_status(step) for step in steps]
        running = shown.count("running")
        costs = [Decimal(step.cost_usd) for step in steps if step.cost_usd is not None]
        end = self.ended_at if self.ended_at is not None else now
        return {
            "root_id": self.root_id,
            "run_id": self.run_id,
            "status": self.status,
            "ended_as": self.ended_as,
            "source": self.source,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": None if self.started_at is None else round(end - self.started_at, 3),
            "phases": len([p for p in self.phases if p.index is not None]),
            "steps_done": done,
            "steps_failed": failed,
            "steps_in_flight": running,
            "steps_interrupted": shown.count(INTERRUPTED),
            "tokens": sum(step.tokens for step in steps),
            "cost_usd": str(sum(costs, Decimal(0))) if costs else None,
            **self._budget(),
            "budget_exhausted": self.budget_exhausted,
            "cancel_reason": self.cancelled,
            "abandoned": self.abandoned,
            "rate_limited": {"count": self.rate_wait_count, "wait_s": round(self.rate_wait_s, 3)},
            "version": self.version,
        }

    def _budget(self) -> dict[str, Any]:
        """The budget: the ledger's figures, else the logged reading and whether it is live.

        A reading logged by a run that no longer runs is its last: its reservations are
        not held any more (``budget_live`` false), whatever it says.
        """
        if self.ledger_budget is not None:
            return {"budget": self.ledger_budget, "budget_source": "ledger", "budget_live": True}
        return {
            "budget": self.budget,
            "budget_source": None if self.budget is None else "log",
            "budget_live": self.budget is not None and self.status == "running",
        }

    def detail(self, *, now: float, flower_url: str | None, show_text: bool) -> dict[str, Any]:
        """The summary plus phases with their steps, rate-limit waits (and logs if allowed)."""
        body = self.summary(now=now)
        body["phases"] = [
            {
                "name": phase.name,
                "index": phase.index,
                "step_count": max(phase.step_count, len(phase.steps)),
                "ended": phase.ended or self.ended_as is not None,
                "steps": [step.to_dict(flower_url, self.step_status(step)) for step in phase.steps],
            }
            for phase in self.phases
        ]
        body["rate_waits"] = list(self.rate_waits)
        body["logs"] = list(self.logs) if show_text else None
        return body
