"""The Celery app fleet sends with (and workers extend), and the stages a worker may run.

:func:`configure_app` builds an app with fleet's settings and no tasks: JSON only, late
acks, task events on. ``workers.app.create_app`` registers the tasks on it.
:func:`load_stages` reads the pipeline stages registered by name in an agents file.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from ..agents.registry import read_agents_file, resolve_target
from ..config import FleetSettings
from ..errors import ConfigError
from ..redis.clients import OUTAGE_TOLERANCE_S
from ..redis.sentinel import celery_options

__all__ = ["configure_app", "load_stages"]


def configure_app(settings: FleetSettings) -> Celery:
    """A Celery app configured for fleet (JSON only, late acks, events on), no tasks.

    The host sends by task name with it; ``workers.app.create_app`` adds the tasks.
    """
    urls = celery_options(settings.redis_url)
    app = Celery(
        "fleet", broker=urls["broker_url"], backend=urls["result_backend"], set_as_current=False
    )
    # Recovery from a lost worker is the host's job (claim timeout); the broker's own
    # restore is a slower backstop, so it only has to outlast a long step. On Sentinel,
    # kombu and the result backend are also told the master's name.
    transport = {"visibility_timeout": 900, **urls.get("broker_transport_options", {})}
    if "result_backend_transport_options" in urls:
        app.conf.result_backend_transport_options = urls["result_backend_transport_options"]
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=settings.result_expires_s,
        task_default_queue=settings.queue,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Publishing rides out a Redis restart as long as the host's own client does
        # (Celery's default gives up after about 0.6 s).
        task_publish_retry_policy={
            "max_retries": int(OUTAGE_TOLERANCE_S),
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 1.0,
        },
    )
    if settings.redis_url.startswith("rediss://"):
        # A plain rediss:// URL must verify the server, as redis-py does: kombu would
        # otherwise fall back to no verification, and the result backend refuses the URL.
        app.conf.update(
            broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
            redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
        )
    return app


def load_stages(path: str | Path) -> dict[str, Callable[..., Any]]:
    """Read the ``[stages.NAME] target = "pkg.mod:func"`` tables of an agents file.

    Raises:
        ConfigError: the file is unreadable or a stage table is invalid.
    """
    source, tables = read_agents_file(path, "stages")
    stages: dict[str, Callable[..., Any]] = {}
    for name, table in tables.items():
        target = table.get("target") if isinstance(table, dict) else None
        if not isinstance(target, str):
            raise ConfigError(
                f"{source}: [stages.{name}] needs target = 'package.module:function'",
                key=f"stages.{name}.target",
            )
        stages[name] = resolve_target(target, what="stage")
    return stages
