"""Prometheus metrics of the workflows the dashboard tracks, with bounded labels.

Flower's metrics are per task and worker; these are per workflow status, agent, error
kind and provider limit. Every label's values are bounded: workflow statuses are five, and agents,
error kinds and limits beyond the :data:`MAX_LABEL_VALUES` most frequent fold into
``other``, so a program that names agents or errors freely cannot blow up a time-series
database. Values are gauges over the workflows the dashboard tracks (the newest run of
each root id in the run logs), served in the text exposition format at ``/metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from decimal import Decimal

from .views import WorkflowView

__all__ = ["MAX_LABEL_VALUES", "render_metrics"]

MAX_LABEL_VALUES = 20
"""Distinct values a free-form label (agent, error, limit) keeps; the rest are ``other``."""

_STATUSES = ("running", "finished", "cancelled", "failed", "abandoned")


def _bounded(counts: Counter[str]) -> dict[str, str]:
    """Map each value to itself if among the most frequent, else to ``other``."""
    kept = {value for value, _ in counts.most_common(MAX_LABEL_VALUES)}
    return {value: value if value in kept else "other" for value in counts}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items())
    return "{" + inner + "}" if inner else ""


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.values: dict[str, float] = {}

    def add(self, value: float, **labels: str) -> None:
        key = _labels(**labels)
        self.values[key] = self.values.get(key, 0.0) + value

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{key} {value:g}"


def render_metrics(views: list[WorkflowView]) -> str:
    """The text exposition of ``views``' workflow, step, token, dollar and wait figures."""
    shown = [(step, view.step_status(step)) for view in views for step in view.steps()]
    steps = [step for step, _status in shown]
    agents = _bounded(Counter(step.agent for step in steps))
    errors = _bounded(Counter(step.error or "" for step in steps if step.status == "failed"))
    limits = _bounded(Counter(wait["limit"] for view in views for wait in view.rate_waits))

    workflows = _Family("fleet_workflows", "gauge", "Workflows by status.")
    for status in _STATUSES:
        workflows.add(0, status=status)
    for view in views:
        workflows.add(1, status=view.status)

    by_status = _Family("fleet_steps", "gauge", "Steps by agent and status.")
    failed = _Family("fleet_steps_failed", "gauge", "Failed steps by agent and error kind.")
    tokens = _Family("fleet_step_tokens", "gauge", "Tokens used by steps, by agent.")
    seconds = _Family("fleet_step_seconds", "gauge", "Seconds steps ran, by agent.")
    dollars = _Family("fleet_step_cost_usd", "gauge", "Dollars steps cost, by agent.")
    cost_by_agent: dict[str, Decimal] = {}
    for step, status in shown:
        agent = agents[step.agent]
        by_status.add(1, agent=agent, status=status)
        if step.status == "failed":
            failed.add(1, agent=agent, error=errors[step.error or ""] or "unknown")
        tokens.add(step.tokens, agent=agent)
        seconds.add(step.duration_s or 0.0, agent=agent)
        if step.cost_usd is not None:
            cost_by_agent[agent] = cost_by_agent.get(agent, Decimal(0)) + Decimal(step.cost_usd)
    for agent, cost in cost_by_agent.items():
        dollars.add(float(cost), agent=agent)

    waits = _Family("fleet_rate_limit_waits", "gauge", "Model calls that waited, by limit.")
    waited = _Family("fleet_rate_limit_wait_seconds", "gauge", "Seconds waited, by limit.")
    for view in views:
        for wait in view.rate_waits:
            waits.add(1, limit=limits[wait["limit"]])
            waited.add(float(wait["wait_s"]), limit=limits[wait["limit"]])

    families = [workflows, by_status, failed, tokens, seconds, dollars, waits, waited]
    return "\n".join(line for family in families for line in family.lines()) + "\n"
