"""OpenTelemetry spans, when the ``fleet[otel]`` extra is installed and configured.

fleet emits one trace per workflow: ``workflow`` → ``phase`` → (Celery) ``round`` →
``invoke_agent`` (a step, on whichever worker ran it) → ``chat`` (a model call) →
``execute_tool`` (a tool call). The Celery host puts the round's W3C ``traceparent``
in each :class:`~fleet.celery.protocol.StepMessage`, so a step's span on a worker is
the child of its round. Attributes follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``...)
plus ``fleet.workflow.id``, ``fleet.step.task_id``, ``fleet.step.agent`` and
``fleet.step.error``. No prompt or answer text is ever put on a span.

Configuration is the SDK's own: tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER`` (``otlp`` or
``console``; ``none`` turns it off) is set, and ``OTEL_SDK_DISABLED`` is not ``true``;
the exporter, batch processor, sampler and resource (``OTEL_SERVICE_NAME``...) read
their usual ``OTEL_*`` variables. A program that installed its own SDK tracer provider
before fleet's first span is used as is.

Without the extra (or with no ``OTEL_*`` variable) nothing from ``opentelemetry`` is
imported: the check runs once, and every helper below is then a constant-time no-op
(:func:`span` returns one shared null context manager).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from typing import Any

from .version import __version__

__all__ = [
    "active",
    "current_traceparent",
    "end_step",
    "flush",
    "open_span",
    "reset",
    "span",
    "step_attributes",
]

_UNCHECKED: Any = object()
_tracer: Any = _UNCHECKED
_provider: Any = None
_NULL = contextlib.nullcontext(None)
_ON_EXPORTERS = {"otlp", "otlp_proto_http", "console"}


def _configured() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _program_provider() -> Any:
    """The SDK tracer provider the program installed itself, if it did (imports nothing)."""
    if "opentelemetry.sdk.trace" not in sys.modules:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def _own_provider() -> Any:
    """A tracer provider built from the ``OTEL_*`` variables (the SDK reads them).

    Returns ``None`` (tracing off, logged once) when ``OTEL_TRACES_EXPORTER`` names an
    exporter fleet does not ship: a step must never fail for want of its trace.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    value = os.environ.get("OTEL_TRACES_EXPORTER", "") or "otlp"
    names = [
        n for n in (part.strip().lower() for part in value.split(",")) if n not in ("", "none")
    ]
    unknown = [name for name in names if name not in _ON_EXPORTERS]
    if unknown:
        logging.getLogger("fleet.telemetry").error(
            "tracing off: OTEL_TRACES_EXPORTER=%r names %s, which fleet does not ship; "
            "use otlp, console or none",
            value,
            ", ".join(unknown),
        )
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "fleet")})
    )
    for name in names:
        exporter: Any
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry") is not None and (
            importlib.util.find_spec("opentelemetry.sdk") is not None
        )
    except ImportError:
        return False


def _check() -> Any:
    global _provider
    provider = _program_provider()
    if provider is None:
        if not _configured() or not _installed():
            return None
        provider = _provider = _own_provider()
        if provider is None:
            return None
    return provider.get_tracer("fleet", __version__)


def active() -> Any:
    """Fleet's tracer, or ``None`` when tracing is off (checked once per process)."""
    global _tracer
    if _tracer is _UNCHECKED:
        _tracer = _check()
    return _tracer


def reset() -> None:
    """Forget the check (flushing fleet's own provider): the next span looks again.

    For programs (and tests) that set ``OTEL_*`` variables after fleet's first span.
    """
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer, _provider = _UNCHECKED, None


def flush(timeout_ms: int = 5000) -> bool:
    """Export every finished span now (fleet's own provider); ``True`` if all went."""
    provider = _provider
    if provider is None:
        return True
    return bool(provider.force_flush(timeout_ms))


def _parent(traceparent: str | None, parent: Any = None) -> Any:
    if parent is not None:
        from opentelemetry import trace

        return trace.set_span_in_context(parent)
    if traceparent is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def span(
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    traceparent: str | None = None,
    parent: Any = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name``, current while the block runs (the span, or ``None`` if off).

    Args:
        name: the span's name (bounded: an operation and an agent, model or tool name).
        attributes: its attributes (never prompt or answer text).
        traceparent: a W3C ``traceparent`` to parent it to (a step's round on another
            process); by default the current span is its parent.
        parent: a span (from :func:`open_span`) to parent it to instead.
    """
    tracer = _tracer if _tracer is not _UNCHECKED else active()
    if tracer is None:
        return _NULL
    opened: contextlib.AbstractContextManager[Any] = tracer.start_as_current_span(
        name,
        context=_parent(traceparent, parent),
        attributes=attributes,
        record_exception=False,
    )
    return opened


def open_span(name: str, attributes: dict[str, Any] | None = None) -> Any:
    """Start a span that is not made current (end it with ``.end()``); ``None`` if off."""
    tracer = _tracer if _tracer is not _UNCHECKED else active()
    if tracer is None:
        return None
    return tracer.start_span(name, attributes=attributes)


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (``None`` when off or outside a span)."""
    if (_tracer if _tracer is not _UNCHECKED else active()) is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def step_attributes(task_id: str, agent: str, workflow_id: str | None) -> dict[str, Any]:
    """The attributes a step's ``invoke_agent`` span starts with."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "fleet.step.agent": agent,
        "fleet.step.task_id": task_id,
    }
    if workflow_id is not None:
        attributes["fleet.workflow.id"] = workflow_id
    return attributes


def end_step(opened: Any, outcome: Any) -> None:
    """Put a finished step's usage and error on its span (``opened`` may be ``None``)."""
    if opened is None:
        return
    usage = outcome.usage
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "fleet.step.success": bool(outcome.success),
    }
    if outcome.worker:
        attributes["fleet.step.worker"] = outcome.worker
    cost = getattr(outcome, "cost_usd", None)
    if cost is not None:
        attributes["fleet.step.cost_usd"] = float(cost)
    if outcome.error is not None:
        from opentelemetry.trace import Status, StatusCode

        attributes["fleet.step.error"] = outcome.error
        attributes["error.type"] = outcome.error
        opened.set_status(Status(StatusCode.ERROR, outcome.error))
    opened.set_attributes(attributes)
