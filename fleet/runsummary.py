"""What a run's log says of its newest run: :class:`RunSummary` (``fleet status``).

:func:`summarize` folds the entries of a run log (:mod:`fleet.runlog`, which documents their
forms) into a :class:`RunSummary`: status, phases, step counts, tokens and the last budget
snapshot plus what finished after it; :func:`summary_at` reads it from a log's URL.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .runlog import LogReader, open_log_reader

__all__ = ["RunSummary", "summarize", "summary_at"]


@dataclass
class RunSummary:
    """The newest run of a root id, folded from its log."""

    root_id: str
    where: str
    """The place the log was read from (masked)."""
    status: str = "running"
    """``running`` until its ``end`` entry; then ``finished``, ``closed``, ``failed``..."""
    started_at: float | None = None
    ended_at: float | None = None
    phases: list[str] = field(default_factory=list)
    steps_done: int = 0
    steps_failed: int = 0
    steps_started: int = 0
    tokens: int = 0
    budget: dict[str, Any] | None = None
    """The last budget snapshot (``BudgetSnapshot`` fields), if the run had a budget."""
    tokens_after_budget: int = 0
    """Tokens of the steps that finished after the last budget snapshot."""
    cost_after_budget: Decimal = Decimal(0)
    """Dollars of the steps that finished after the last budget snapshot."""

    @property
    def consumed_tokens(self) -> int | None:
        """Tokens the run's budget had consumed at its last entry (``None``: no budget).

        The last snapshot plus the steps that finished after it, so a run killed in the
        middle of a phase still counts what its finished steps spent.
        """
        if self.budget is None:
            return None
        return int(self.budget.get("consumed_tokens") or 0) + self.tokens_after_budget

    @property
    def consumed_usd(self) -> Decimal | None:
        """Dollars the run's budget had consumed at its last entry (``None``: no budget)."""
        if self.budget is None:
            return None
        try:
            last = Decimal(str(self.budget.get("consumed_usd") or 0))
        except ArithmeticError:
            last = Decimal(0)
        return last + self.cost_after_budget

    @property
    def steps_in_flight(self) -> int:
        """Steps started and not yet finished (0 once the run ended)."""
        if self.status != "running":
            return 0
        return max(self.steps_started - self.steps_done - self.steps_failed, 0)


def summarize(reader: LogReader, root_id: str) -> RunSummary | None:
    """Fold the newest run of ``root_id`` into a summary; ``None`` if no run is logged."""
    start = reader.last_start(root_id)
    if start is None:
        return None
    summary = RunSummary(root_id=root_id, where=reader.where)
    cursor = start
    while True:
        page = reader.after(root_id, cursor, wait_s=0.0)
        if not page:
            return summary
        for entry in page:
            cursor = entry.cursor
            _fold(summary, entry.fields)


def _fold(summary: RunSummary, fields: Mapping[str, str]) -> None:
    control = fields.get("control")
    if control == "start":
        summary.started_at = _float(fields.get("at"))
    elif control == "end":
        summary.status = fields.get("status", "ended")
        summary.ended_at = _float(fields.get("at"))
    elif control == "budget" and not fields.get("live"):
        with contextlib.suppress(ValueError):
            summary.budget = json.loads(fields.get("snapshot", ""))
            summary.tokens_after_budget = 0
            summary.cost_after_budget = Decimal(0)
    elif "event" in fields:
        try:
            event = json.loads(fields["event"])
        except ValueError:
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "phase_start":
            summary.phases.append(str(event.get("name", "")))
        elif kind == "step_started":
            summary.steps_started += 1
        elif kind == "step_finished":
            if event.get("success"):
                summary.steps_done += 1
            else:
                summary.steps_failed += 1
            tokens = int(event.get("total_tokens") or 0)
            summary.tokens += tokens
            summary.tokens_after_budget += tokens
            with contextlib.suppress(ArithmeticError, TypeError, ValueError):
                summary.cost_after_budget += Decimal(str(event.get("cost_usd") or 0))


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def summary_at(url: str, key_prefix: str, root_id: str) -> RunSummary | None:
    """The newest run of ``root_id`` in the run log at ``url``, folded (see :func:`summarize`)."""
    reader = open_log_reader(url, key_prefix=key_prefix)
    try:
        return summarize(reader, root_id)
    finally:
        reader.close()
