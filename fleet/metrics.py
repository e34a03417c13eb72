"""Prometheus metrics of this process's steps, with bounded labels (DESIGN.md 5b).

One process-wide registry (:data:`REGISTRY`, built by :func:`enable`) holds what this
process did: steps started and finished by agent and outcome, step duration, tokens and
dollars by agent and model, budget refusals, rate-limit waits, in-flight steps, and the
step queue's depth (read from Redis at scrape time). ``fleet worker --metrics-port P``
(setting ``metrics_port``) serves it at ``http://HOST:P/metrics``; :func:`exposition` gives
the same text to any other endpoint (the dashboard's ``/metrics``).

Labels are bounded: an agent, model, error kind or limit name is kept for the first
:data:`MAX_LABEL_VALUES` distinct values of that label, later ones fold into ``other``;
no label ever carries a workflow id or task id. Until :func:`enable` runs, every hook is a
no-op and ``prometheus_client`` is not imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "MAX_LABEL_VALUES",
    "REGISTRY",
    "CallOutcome",
    "budget_refused",
    "enable",
    "enabled",
    "exposition",
    "model_call",
    "rate_limit_wait",
    "serve",
    "step_ended",
    "step_finished",
    "step_started",
    "watch_queue",
]

MAX_LABEL_VALUES = 50
"""Distinct values one label keeps per process; later values are reported as ``other``."""

DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
"""Step duration histogram buckets (seconds): from no-op agents to long model steps."""

REGISTRY: Any = None
"""The process-wide ``prometheus_client.CollectorRegistry`` (``None`` until enabled)."""

_m: _Metrics | None = None
_lock = threading.Lock()


class _Bounded:
    """Keeps the first ``MAX_LABEL_VALUES`` values of one label; the rest are ``other``."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= MAX_LABEL_VALUES:
            return "other"
        self._seen.add(value)
        return value


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.agent, self.model, self.outcome, self.limit = (_Bounded() for _ in range(4))
        r = registry
        self.started = Counter(
            "fleet_steps_started", "Steps that began running here, by agent.", ["agent"], registry=r
        )
        self.finished = Counter(
            "fleet_steps_finished",
            "Steps that finished here, by agent and outcome (success or the error kind).",
            ["agent", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "fleet_step_duration_seconds",
            "Seconds a step ran here, by agent.",
            ["agent"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("fleet_steps_in_flight", "Steps running here now.", registry=r)
        self.tokens = Counter(
            "fleet_tokens",
            "Tokens steps used, by agent, model (of its last call; '' if none) and kind.",
            ["agent", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "fleet_cost_usd", "Dollars steps cost, by agent.", ["agent"], registry=r
        )
        self.calls = Counter(
            "fleet_model_calls",
            "Model calls made, by agent, model and outcome (ok, failed or cancelled).",
            ["agent", "model", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "fleet_budget_refusals", "Steps or calls a token budget refused.", registry=r
        )
        self.waits = Counter(
            "fleet_rate_limit_waits",
            "Model calls that waited for a provider limit, by limit.",
            ["limit"],
            registry=r,
        )
        self.waited = Counter(
            "fleet_rate_limit_wait_seconds",
            "Seconds model calls waited for a provider limit, by limit.",
            ["limit"],
            registry=r,
        )


def enabled() -> bool:
    """Whether this process records metrics."""
    return _m is not None


def enable() -> Any:
    """Start recording metrics in this process (idempotent); returns :data:`REGISTRY`."""
    global _m, REGISTRY
    with _lock:
        if _m is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=True)
            _m = _Metrics(registry)
            REGISTRY = registry
    return REGISTRY


def step_started(agent: str) -> None:
    """A step began running in this process."""
    m = _m
    if m is None:
        return
    m.started.labels(m.agent(agent)).inc()
    m.in_flight.inc()


def step_ended() -> None:
    """A step that :func:`step_started` counted is no longer running (finished or not)."""
    if _m is not None:
        _m.in_flight.dec()


def step_finished(outcome: Any, duration_s: float, model: str = "") -> None:
    """A step that :func:`step_started` counted finished with ``outcome``.

    Its tokens are counted under ``model``: the model of its last call (``""`` for an
    agent that called none).
    """
    m = _m
    if m is None:
        return
    agent = m.agent(outcome.agent)
    m.finished.labels(agent, m.outcome(outcome.error or "success")).inc()
    m.duration.labels(agent).observe(duration_s)
    usage = outcome.usage
    if usage.total_tokens:
        model = m.model(model)
        m.tokens.labels(agent, model, "input").inc(usage.prompt_tokens)
        m.tokens.labels(agent, model, "output").inc(usage.completion_tokens)
    cost = getattr(outcome, "cost_usd", None)
    if cost is not None:
        m.cost.labels(agent).inc(float(Decimal(str(cost))))


CallOutcome = Literal["ok", "failed", "cancelled"]
"""How a model call ended (the ``outcome`` label of ``fleet_model_calls``)."""


def model_call(agent: str, model: str, outcome: CallOutcome = "ok") -> None:
    """One model call ended, sent and answered or not (its tokens count with its step's)."""
    m = _m
    if m is None:
        return
    m.calls.labels(m.agent(agent), m.model(model), outcome).inc()


def budget_refused() -> None:
    """A token budget refused a step's reservation or a model call."""
    if _m is not None:
        _m.refusals.inc()


def rate_limit_wait(limit: str, seconds: float) -> None:
    """A model call waited ``seconds`` for the provider limit ``limit``."""
    m = _m
    if m is None:
        return
    name = m.limit(limit)
    m.waits.labels(name).inc()
    m.waited.labels(name).inc(seconds)


class _QueueDepth:
    """A collector reading the step queue's length from Redis at scrape time."""

    def __init__(self, queue: str, length: Callable[[], int]) -> None:
        self.queue, self.length = queue, length

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "fleet_queue_depth", "Step messages waiting in the queue.", labels=["queue"]
        )
        try:
            family.add_metric([self.queue], float(self.length()))
        except Exception:  # Redis away: report nothing rather than fail the scrape
            return
        yield family


def watch_queue(queue: str, length: Callable[[], int]) -> None:
    """Report ``fleet_queue_depth{queue=queue}`` as ``length()`` at each scrape."""
    registry = enable()
    registry.register(_QueueDepth(queue, length))


def exposition() -> bytes:
    """This process's metrics in the Prometheus text format (empty when not enabled)."""
    if REGISTRY is None:
        return b""
    from prometheus_client import generate_latest

    return bytes(generate_latest(REGISTRY))


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Enable metrics and serve them at ``http://host:port/metrics`` from a daemon thread.

    Returns the port (the one the OS chose when ``port`` is 0).
    """
    from prometheus_client import start_http_server

    registry = enable()
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
