"""The Celery fleet host: each step is a Celery task on a Redis broker.

Read in the order a step travels:

* :mod:`.protocol` — what host and workers exchange: messages, notices,
  ids, TTLs, task names and the protocol version (keys and Lua scripts: :mod:`fleet.redis`);
* :mod:`.app` — the Celery app factory (no tasks; ``workers`` registers them);
* :mod:`.executor` — :class:`CeleryExecutor`, the :class:`~fleet.AgentExecutor`;
* :mod:`.round` and :mod:`.pipeline` — a barrier round of steps, and per-item chains
  of registered stages, as the host sends, watches and recovers them.

Importing :mod:`fleet` does not import this package (nor Celery or Redis).
"""

from .app import configure_app as configure_app
from .app import load_stages as load_stages
from .executor import CeleryExecutor as CeleryExecutor
from .protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from .protocol import STAGE_TASK as STAGE_TASK
from .protocol import STEP_TASK as STEP_TASK
from .protocol import BudgetHold as BudgetHold
from .protocol import StageMessage as StageMessage
from .protocol import StepMessage as StepMessage
from .protocol import stage_link_id as stage_link_id
from .protocol import step_summary as step_summary
from .protocol import step_task_id as step_task_id

__all__ = [
    "PROTOCOL_VERSION",
    "STAGE_TASK",
    "STEP_TASK",
    "BudgetHold",
    "CeleryExecutor",
    "StageMessage",
    "StepMessage",
    "configure_app",
    "load_stages",
    "stage_link_id",
    "step_summary",
    "step_task_id",
]
