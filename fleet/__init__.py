"""fleet: programmable, deterministic multi-agent orchestration on a Celery worker fleet.

Write fan-out rounds, per-item pipelines, loops and verification panels as ordinary
async Python against one seam, :class:`AgentExecutor`; run them in-process
(:class:`LocalExecutor`, the embedded default) or on Celery workers
(:class:`fleet.celery.CeleryExecutor`) without changing a line.
"""

import typing as _typing

# Specs
# Agents
from .agents import AgentContext as AgentContext
from .agents import AgentResult as AgentResult
from .agents import load_agents as load_agents

# Budget
from .budget import BudgetSnapshot as BudgetSnapshot
from .budget import WorkflowBudget as WorkflowBudget

# Journal
from .checkpoint import WORKFLOW_CHECKPOINT_SCHEMA_VERSION as WORKFLOW_CHECKPOINT_SCHEMA_VERSION
from .checkpoint import WorkflowCheckpoint as WorkflowCheckpoint
from .checkpoint import WorkflowStepRecord as WorkflowStepRecord

# Combinators
from .combinators import LoopDecision as LoopDecision
from .combinators import PipelineStage as PipelineStage
from .combinators import execute_loop as execute_loop
from .combinators import execute_pipeline as execute_pipeline
from .combinators import execute_steps_parallel as execute_steps_parallel

# Errors
from .errors import AnswerRefused as AnswerRefused
from .errors import AskError as AskError
from .errors import AskTimeout as AskTimeout
from .errors import FleetError as FleetError

# Events
from .events import WorkflowEvent as WorkflowEvent

# Executors
from .executor import AgentExecutor as AgentExecutor
from .local import LocalExecutor as LocalExecutor
from .resumable import execute_steps_parallel_resumable as execute_steps_parallel_resumable
from .spec import AgentStepSpec as AgentStepSpec
from .spec import StepOutcome as StepOutcome
from .spec import TokenUsage as TokenUsage
from .stores import CheckpointStore as CheckpointStore
from .stores import MemoryCheckpointStore as MemoryCheckpointStore
from .stores import SQLiteCheckpointStore as SQLiteCheckpointStore

# Workflow
from .workflow import Workflow as Workflow
from .workflow import WorkflowBuilder as WorkflowBuilder

if _typing.TYPE_CHECKING:
    from .stores.redis import RedisCheckpointStore as RedisCheckpointStore

from .lazy import lazy_exports as _lazy_exports
from .version import __version__ as __version__

_LAZY_EXPORTS = {"RedisCheckpointStore": ".stores:RedisCheckpointStore"}
_LAZY = frozenset(_LAZY_EXPORTS)
"""Exported names imported on first use: ``import fleet`` loads neither Redis nor Celery."""


__getattr__ = _lazy_exports(__name__, _LAZY_EXPORTS)


__all__ = [
    # Specs
    "AgentStepSpec",
    "StepOutcome",
    "TokenUsage",
    # Agents
    "AgentContext",
    "AgentResult",
    "load_agents",
    # Executors
    "AgentExecutor",
    "LocalExecutor",
    # Combinators
    "LoopDecision",
    "PipelineStage",
    "execute_loop",
    "execute_pipeline",
    "execute_steps_parallel",
    # Journal
    "execute_steps_parallel_resumable",
    "WorkflowCheckpoint",
    "WorkflowStepRecord",
    "WORKFLOW_CHECKPOINT_SCHEMA_VERSION",
    "CheckpointStore",
    "MemoryCheckpointStore",
    "SQLiteCheckpointStore",
    "RedisCheckpointStore",
    # Budget
    "BudgetSnapshot",
    "WorkflowBudget",
    # Workflow
    "Workflow",
    "WorkflowBuilder",
    # Events
    "WorkflowEvent",
    # Errors
    "FleetError",
    "AskError",
    "AskTimeout",
    "AnswerRefused",
]
