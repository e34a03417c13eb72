"""Cancel: a workflow stopped from anywhere, within seconds, fleet-wide (DESIGN §4b).

Two halves:

* in this process, a :class:`Cancellation` (:mod:`fleet.cancel.signal`): the
  :class:`~fleet.Workflow` verbs make their run's cancellation current, combinators and
  hosts dispatch nothing once it is cancelled, and steps running here are interrupted at
  their current ``await`` and end with ``error="cancelled"``;
* across processes, the run registry (:mod:`fleet.runs`): a run registers under its root
  id, ``fleet cancel ROOT_ID`` leaves a marker for it, the host polls the marker, and
  Celery workers read it in Redis when they claim a step (a queued message of a cancelled
  run is dropped without running) and while a step runs (it is interrupted within about a
  second, its model request closed; :mod:`fleet.cancel.markers`).
"""

from .signal import CANCELLED as CANCELLED
from .signal import Cancellation as Cancellation
from .signal import StepInterrupted as StepInterrupted
from .signal import cancelled_outcome as cancelled_outcome
from .signal import current_cancellation as current_cancellation
from .signal import use_cancellation as use_cancellation

__all__ = [
    "CANCELLED",
    "Cancellation",
    "StepInterrupted",
    "cancelled_outcome",
    "current_cancellation",
    "use_cancellation",
]
