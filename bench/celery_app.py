"""The benchmarks' worker app: fleet's worker plus the plain Celery tasks fleet is measured against.

``celery -A bench.celery_app worker`` runs what ``celery -A workers.app worker`` runs and
registers two raw Celery tasks besides, so that the production worker registers none:

- ``bench.noop``: a no-op, the baseline ``bench/celery_host.py`` and
  ``bench/redis_memory.py`` measure fleet against;
- ``bench.sleep``: sleeps in its thread, raw Celery's own ceiling for long steps, which
  ``bench/llm_worker.py --celery`` measures fleet against.

Like :mod:`workers.app`, nothing is built at import time: the module attribute ``app``
is built on first access (the ``celery`` command line asks for it).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from fleet.config import FleetSettings
from workers.app import create_app

__all__ = ["BENCH_APP", "BENCH_NOOP_TASK", "BENCH_SLEEP_TASK", "create_bench_app"]

BENCH_APP = "bench.celery_app"
"""What ``celery -A`` names to run this app."""
BENCH_NOOP_TASK = "bench.noop"
BENCH_SLEEP_TASK = "bench.sleep"


def _noop(*args: Any) -> Any:
    return args[0] if args else None


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def create_bench_app(settings: FleetSettings | None = None) -> Celery:
    """The fleet worker's app (:func:`workers.app.create_app`) plus the two bench tasks."""
    app = create_app(settings)
    # shared=False: as fleet's own tasks, bound to this app only.
    app.task(name=BENCH_NOOP_TASK, shared=False)(_noop)
    app.task(name=BENCH_SLEEP_TASK, shared=False, acks_late=True)(_sleep)
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """Build ``app`` on first access (``celery -A bench.celery_app worker`` asks for it)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_bench_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
