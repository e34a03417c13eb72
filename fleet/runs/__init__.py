"""The run registry: one record per workflow run, under the one id the run carries.

A run's id (:func:`new_run_id`) is minted once, when its workflow is built, and is the
id of its record here (begin, heartbeat, end, cancel request and marker, latest, list),
of its run log's start and end entries (:mod:`fleet.runlog`), of its local run index
entry (:mod:`fleet.runs.index`) and of what the dashboard shows. ``fleet status``,
``fleet watch``, ``fleet cancel`` and the dashboard read it; the cancel board of
:mod:`fleet.cancel` is this registry.

Registries: :class:`MemoryRunRegistry`, ``RedisRunRegistry`` (:mod:`fleet.runs.redis`,
the fleet's Redis, what workers read) and ``SQLiteRunRegistry`` (:mod:`fleet.runs.sqlite`,
the embedded default's journal file); :func:`open_run_registry` picks one from a journal
``store`` setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..lazy import lazy_exports
from .base import CANCEL_TTL_S as CANCEL_TTL_S
from .base import HEARTBEAT_LAPSE_S as HEARTBEAT_LAPSE_S
from .base import HEARTBEAT_S as HEARTBEAT_S
from .base import CancelNotice as CancelNotice
from .base import MemoryRunRegistry as MemoryRunRegistry
from .base import RunRecord as RunRecord
from .base import RunRegistry as RunRegistry
from .base import RunState as RunState
from .base import ShownState as ShownState
from .base import cancel_marker_key as cancel_marker_key
from .base import new_run_id as new_run_id
from .base import run_record_key as run_record_key

if TYPE_CHECKING:
    from .redis import RedisRunRegistry
    from .sqlite import SQLiteRunRegistry

__all__ = [
    "CANCEL_TTL_S",
    "HEARTBEAT_LAPSE_S",
    "HEARTBEAT_S",
    "CancelNotice",
    "MemoryRunRegistry",
    "RedisRunRegistry",
    "RunRecord",
    "RunRegistry",
    "RunState",
    "SQLiteRunRegistry",
    "ShownState",
    "cancel_marker_key",
    "new_run_id",
    "open_run_registry",
    "run_record_key",
]


__getattr__ = lazy_exports(  # ``import fleet`` stays light
    __name__,
    {
        "RedisRunRegistry": ".redis:RedisRunRegistry",
        "SQLiteRunRegistry": ".sqlite:SQLiteRunRegistry",
    },
)


def open_run_registry(
    store: str, *, redis_url: str | None = None, key_prefix: str = "fleet"
) -> RunRegistry:
    """The registry a run with this journal ``store`` (and fleet Redis) records itself in.

    A run that uses Redis (``redis_url`` given: the Celery executor, a Redis store) uses the
    fleet's Redis, which workers read; a local run with a ``sqlite:`` store uses its
    journal file; a ``memory`` store gets a registry only this process sees.

    Raises:
        ConfigError: the store names no SQLite file.
    """
    from ..stores import sqlite_path

    if redis_url is not None:
        from .redis import RedisRunRegistry

        return RedisRunRegistry(redis_url, key_prefix=key_prefix)
    path = sqlite_path(store)
    if path is not None:
        from .sqlite import SQLiteRunRegistry

        return SQLiteRunRegistry(path)
    if store.strip().startswith("sqlite:"):
        raise ConfigError(f"journal store {store!r} names no file", key="store")
    return MemoryRunRegistry()
