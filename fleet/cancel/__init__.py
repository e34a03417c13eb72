"""Cancel: a workflow stopped from anywhere, within seconds, fleet-wide (DESIGN §4b).

Two halves:

* in this process, a :class:`Cancellation` (:mod:`fleet.cancel.signal`): the
  :class:`~fleet.Workflow` verbs make their run's cancellation current, combinators and
  hosts dispatch nothing once it is cancelled, and steps running here are interrupted at
  their current ``await`` and end with ``error="cancelled"``;
* across processes, the run registry (:mod:`fleet.runs`), here under its cancel-board
  names (:class:`CancelBoard` is :class:`fleet.runs.RunRegistry`): a run registers
  under its root id, ``fleet cancel ROOT_ID`` leaves a marker for it, the host polls the
  marker, and Celery workers read it in Redis when they claim a step (a queued message of
  a cancelled run is dropped without running) and while a step runs (it is interrupted
  within about a second, its model request closed).

Boards: :class:`MemoryCancelBoard`, ``RedisCancelBoard`` and ``SQLiteCancelBoard`` are
the registries of :mod:`fleet.runs`; :func:`open_cancel_board` is
:func:`fleet.runs.open_run_registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runs import CANCEL_TTL_S as CANCEL_TTL_S
from ..runs import HEARTBEAT_LAPSE_S as HEARTBEAT_LAPSE_S
from ..runs import HEARTBEAT_S as HEARTBEAT_S
from ..runs import CancelNotice as CancelNotice
from ..runs import MemoryRunRegistry as MemoryCancelBoard
from ..runs import RunRecord as RunRecord
from ..runs import RunRegistry as CancelBoard
from ..runs import RunState as RunState
from ..runs import ShownState as ShownState
from ..runs import cancel_marker_key as cancel_marker_key
from ..runs import new_run_id as new_run_id
from ..runs import open_run_registry as open_cancel_board
from ..runs import run_record_key as run_record_key
from .signal import CANCELLED as CANCELLED
from .signal import Cancellation as Cancellation
from .signal import StepInterrupted as StepInterrupted
from .signal import cancelled_outcome as cancelled_outcome
from .signal import current_cancellation as current_cancellation
from .signal import use_cancellation as use_cancellation

if TYPE_CHECKING:
    from ..runs.redis import RedisRunRegistry as RedisCancelBoard
    from ..runs.sqlite import SQLiteRunRegistry as SQLiteCancelBoard

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
    """The Redis and SQLite registries under their cancel-board names, imported when named."""
    if name == "RedisCancelBoard":
        from ..runs.redis import RedisRunRegistry

        return RedisRunRegistry
    if name == "SQLiteCancelBoard":
        from ..runs.sqlite import SQLiteRunRegistry

        return SQLiteRunRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
