"""The Celery app of a fleet worker: ``celery -A workers.app worker``.

:func:`create_app` builds it from settings (broker, queue, agents file); nothing is
created at import time. The module attribute ``app`` is built on first access from
:func:`fleet.config.load_settings` (``config/fleet.toml`` and ``FLEET_*`` variables),
which is what the ``celery`` command line looks up.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import consumer as celery_consumer

from fleet import metrics
from fleet.agents import AgentRegistry, load_agents
from fleet.celery import configure_app, load_stages
from fleet.config import FleetSettings, load_settings

from .events import BatchTaskEvents
from .loop import prestart_threads
from .tasks import WorkerRuntime, register_tasks

__all__ = [
    "GC_THRESHOLDS",
    "PER_STEP_LOGGERS",
    "WithholdMessageBodies",
    "create_app",
    "freeze_startup_objects",
    "quiet_per_step_lines",
]


class WithholdMessageBodies(logging.Filter):
    """Keeps refused messages' bodies (a step's prompt) out of the worker log.

    Celery's consumer quotes the whole body of a message it cannot decode or refuses; a
    step message carries its prompt there. This filter keeps the log line and its reason
    but replaces the quoted body (and headers) with their size.
    """

    _WITHHELD = {
        celery_consumer.MESSAGE_DECODE_ERROR: (3, 4),
        celery_consumer.INVALID_TASK_ERROR: (1,),
        celery_consumer.UNKNOWN_FORMAT: (0,),
        celery_consumer.UNKNOWN_TASK_ERROR: (1, 2),
    }

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments in place; never drops a record."""
        positions = self._WITHHELD.get(record.msg) if isinstance(record.msg, str) else None
        if positions and isinstance(record.args, tuple):
            args = list(record.args)
            for index in positions:
                if index < len(args):
                    args[index] = f"<withheld: {len(str(args[index]))} chars>"
            record.args = tuple(args)
        return True


_BODY_FILTER = WithholdMessageBodies()


def create_app(settings: FleetSettings | None = None) -> Celery:
    """A Celery app that runs fleet steps.

    JSON only, late acks with ``reject_on_worker_lost``, prefetch multiplier 1, task
    events on (published in batches, :mod:`workers.events`). Agents come from
    ``[agents.NAME]`` and named pipeline stages from ``[stages.NAME] target =
    "pkg.mod:func"`` tables of ``settings.agents_file``: a worker runs only what is
    registered there.

    Raises:
        ConfigError: the agents file is missing or invalid.
    """
    settings = settings if settings is not None else load_settings()
    registry = AgentRegistry(load_agents(settings.agents_file))
    _prepare_agents(registry)
    stages = load_stages(settings.agents_file)
    app = configure_app(settings)
    runtime = WorkerRuntime(settings, registry, stages)
    register_tasks(app, runtime)
    app.steps["consumer"].add(BatchTaskEvents)
    if settings.metrics_port is not None:
        _serve_metrics(settings, runtime)
    _survive_a_lost_connection()
    signals.worker_ready.connect(_prestart_threads, weak=False)
    signals.worker_ready.connect(freeze_startup_objects, weak=False)
    signals.after_setup_logger.connect(quiet_per_step_lines, weak=False)
    # httpx logs every request at INFO: one line per model call is noise in a worker log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    consumer_logger = logging.getLogger(celery_consumer.logger.name)
    if _BODY_FILTER not in consumer_logger.filters:
        consumer_logger.addFilter(_BODY_FILTER)
    return app


PER_STEP_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
"""Celery's loggers of a line per task: ``Task ... received`` and ``Task ... succeeded``."""


def quiet_per_step_lines(loglevel: int | str = logging.INFO, **_: Any) -> None:
    """Keep Celery's two lines per step out of a worker log below ``--loglevel debug``.

    Like httpx's line per request, they are noise at hundreds of steps a second, and
    writing them is CPU the worker spends on every step. Their warnings and errors (a
    failed or rejected task) still show; at ``debug`` everything does. Connected to
    Celery's ``after_setup_logger`` signal.
    """
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    quiet = not isinstance(level, int) or level > logging.DEBUG
    for name in PER_STEP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


GC_THRESHOLDS = (10_000, 20, 10)
"""The worker's garbage collector thresholds (Python's defaults: 700, 10, 10)."""


def freeze_startup_objects(**_: Any) -> None:
    """Keep what the worker built before its first step out of the collector's passes.

    Its modules, agents, clients and threads are over a hundred thousand objects that live
    as long as the process, and each full garbage collection walks all of them while it
    holds the GIL, so every step of the process waits. Once the worker is ready they are
    collected once and moved to the permanent generation (``gc.freeze()``); what the steps
    make afterwards is collected as before, but less often (:data:`GC_THRESHOLDS`): a step
    allocates thousands of objects that reference counting frees, and at Python's default
    of 700 the young generation was collected a few times per step. Connected to Celery's
    ``worker_ready`` signal.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _prepare_agents(registry: AgentRegistry) -> None:
    """Let each agent load now what its first step would (``prepare()``, when it has one).

    The first steps of a worker arrive together and share one event loop: an agent that
    loads data on its first call (a model's price table) would hold all of them. A
    failure is logged; the step meets it again and reports it.
    """
    for name in registry:
        prepare = getattr(registry.resolve(name).run, "prepare", None)
        if callable(prepare):
            try:
                prepare()
            except Exception as error:
                logging.getLogger("fleet.worker").warning(
                    "agent %r could not prepare: %s", name, error
                )


def _survive_a_lost_connection() -> None:
    """Keep a worker alive when its broker connection is gone under kombu's Redis QoS.

    When the broker connection is lost, Celery's consumer closes its channel, and kombu's
    Redis QoS then works through a connection that is already released:
    ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (or ``'client'``,
    kombu/transport/redis.py ``_connparams``), which Celery treats as unrecoverable and the
    worker shuts down. Two places meet it: restoring the unacknowledged messages while
    the channel closes (1 of 3 Redis-restart trials, tests/faults), and acknowledging a
    step that finished after the connection dropped (its message belongs to the closed
    channel; 1 of 3 trials of the SIGKILL restart). Neither needs this worker: the
    messages stay in kombu's unacked hash (restored after the visibility timeout, and
    then answered from the step's recorded result, not run again), and the host re-sends
    any step no worker finished after its claim timeout. So these are skipped with a
    warning and the consumer reconnects as it does after any outage.
    """
    from kombu.transport import redis as kombu_redis

    def guarded(name: str, what: str) -> None:
        original = getattr(kombu_redis.QoS, name)
        if getattr(original, "fleet_guarded", False):
            return

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            except AttributeError as error:
                if "'NoneType'" not in str(error):
                    raise
                logging.getLogger("fleet.worker").warning(
                    "could not %s while the broker connection was closed (%s); the host "
                    "re-sends unfinished steps after its claim timeout",
                    what,
                    error,
                )
                return None

        method.fleet_guarded = True  # type: ignore[attr-defined]
        setattr(kombu_redis.QoS, name, method)

    guarded("restore_unacked", "restore unacknowledged messages")
    guarded("ack", "acknowledge a finished step's message")
    guarded("reject", "reject a message")


def _serve_metrics(settings: FleetSettings, runtime: WorkerRuntime) -> None:
    """Serve this process's Prometheus metrics (a port already taken is logged, not fatal)."""
    try:
        port = metrics.serve(settings.metrics_port or 0, settings.metrics_host)
    except OSError as error:
        logging.getLogger("fleet.worker").error(
            "metrics: cannot listen on %s:%s (%s); set another metrics_port",
            settings.metrics_host,
            settings.metrics_port,
            error,
        )
        return
    metrics.watch_queue(settings.queue, lambda: int(runtime.redis().llen(settings.queue)))
    logging.getLogger("fleet.worker").info(
        "metrics at http://%s:%d/metrics", settings.metrics_host, port
    )


def _prestart_threads(sender: Any, **_: Any) -> None:
    """Start a threads pool's threads when the worker is ready (see :func:`prestart_threads`)."""
    pool, app = getattr(sender, "pool", None), getattr(sender, "app", None)
    prestart_threads(
        getattr(pool, "executor", None),
        getattr(pool, "limit", 0) or 0,
        warm=None if app is None else lambda: app.backend,
    )


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """Build ``app`` on first access (``celery -A workers.app worker`` asks for it)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
