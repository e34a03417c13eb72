"""Cancel: a workflow stopped from anywhere, within seconds, fleet-wide (DESIGN §4b).

Two halves:

* in this process, a :class:`Cancellation` (:mod:`fleet.cancel.signal`): the
  :class:`~fleet.Workflow` verbs make their run's cancellation current, combinators and
  hosts dispatch nothing once it is cancelled, and steps running here are interrupted at
  their current ``await`` and end with ``error="cancelled"``;
* across processes, a :class:`CancelBoard` (:mod:`fleet.cancel.board`): a run registers
  under its root id, ``fleet cancel ROOT_ID`` leaves a marker for it, the host polls the
  marker, and Celery workers read it in Redis when they claim a step (a queued message of
  a cancelled run is dropped without running) and while a step runs (it is interrupted
  within about a second, its model request closed).

Boards: :class:`MemoryCancelBoard`, ``RedisCancelBoard`` (:mod:`fleet.cancel.redis`) and
``SQLiteCancelBoard`` (:mod:`fleet.cancel.sqlite`); :func:`open_cancel_board` picks one
from a journal ``store`` setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .board import CANCEL_TTL_S as CANCEL_TTL_S
from .board import HEARTBEAT_LAPSE_S as HEARTBEAT_LAPSE_S
from .board import HEARTBEAT_S as HEARTBEAT_S
from .board import CancelBoard as CancelBoard
from .board import CancelNotice as CancelNotice
from .board import MemoryCancelBoard as MemoryCancelBoard
from .board import RunRecord as RunRecord
from .board import RunState as RunState
from .board import ShownState as ShownState
from .board import cancel_marker_key as cancel_marker_key
from .board import new_run_id as new_run_id
from .board import run_record_key as run_record_key
from .signal import CANCELLED as CANCELLED
from .signal import Cancellation as Cancellation
from .signal import StepInterrupted as StepInterrupted
from .signal import cancelled_outcome as cancelled_outcome
from .signal import current_cancellation as current_cancellation
from .signal import use_cancellation as use_cancellation

if TYPE_CHECKING:
    from .redis import RedisCancelBoard
    from .sqlite import SQLiteCancelBoard

__all__ = [
    "CANCELLED",
    "CANCEL_TTL_S",
    "HEARTBEAT_LAPSE_S",
    "HEARTBEAT_S",
    "CancelBoard",
    "CancelNotice",
    "Cancellation",
    "MemoryCancelBoard",
    "RedisCancelBoard",
    "RunRecord",
    "RunState",
    "SQLiteCancelBoard",
    "ShownState",
    "StepInterrupted",
    "cancel_marker_key",
    "cancelled_outcome",
    "current_cancellation",
    "new_run_id",
    "open_cancel_board",
    "run_record_key",
    "use_cancellation",
]


def __getattr__(name: str) -> object:
    """Import the Redis and SQLite boards when first named (``import fleet`` stays light)."""
    if name == "RedisCancelBoard":
        from .redis import RedisCancelBoard

        return RedisCancelBoard
    if name == "SQLiteCancelBoard":
        from .sqlite import SQLiteCancelBoard

        return SQLiteCancelBoard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_cancel_board(
    store: str, *, redis_url: str | None = None, key_prefix: str = "fleet"
) -> CancelBoard:
    """The board a run with this journal ``store`` (and fleet Redis) registers on.

    A run that uses Redis (``redis_url`` given: the Celery executor, a Redis store) uses the
    fleet's Redis, which workers read; a local run with a ``sqlite:`` store uses its
    journal file; a ``memory`` store gets a board only this process sees.

    Raises:
        ConfigError: the store names no SQLite file.
    """
    from ..stores import sqlite_path

    if redis_url is not None:
        from .redis import RedisCancelBoard

        return RedisCancelBoard(redis_url, key_prefix=key_prefix)
    path = sqlite_path(store)
    if path is not None:
        from .sqlite import SQLiteCancelBoard

        return SQLiteCancelBoard(path)
    if store.strip().startswith("sqlite:"):
        raise ConfigError(f"journal store {store!r} names no file", key="store")
    return MemoryCancelBoard()
