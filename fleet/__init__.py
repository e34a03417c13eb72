"""fleet: programmable, deterministic multi-agent orchestration on a Celery worker fleet.

Write fan-out rounds, per-item pipelines, loops and verification panels as ordinary
async Python against one seam, :class:`AgentExecutor`; run them in-process
(:class:`LocalExecutor`, the embedded default) or on Celery workers
(:class:`fleet.celery.CeleryExecutor`) without changing a line.
"""

# Specs
# Agents
from .agents import AgentContext as AgentContext
from .agents import AgentResult as AgentResult
from .agents import load_agents as load_agents

# Budget
from .budget import BudgetSnapshot as BudgetSnapshot
from .budget import WorkflowBudget as WorkflowBudget

# Combinators
from .combinators import LoopDecision as LoopDecision
from .combinators import PipelineStage as PipelineStage
from .combinators import execute_loop as execute_loop
from .combinators import execute_pipeline as execute_pipeline
from .combinators import execute_steps_parallel as execute_steps_parallel

# Errors
from .errors import FleetError as FleetError

# Events
from .events import WorkflowEvent as WorkflowEvent

# Executors
from .executor import AgentExecutor as AgentExecutor
from .local import LocalExecutor as LocalExecutor
from .spec import AgentStepSpec as AgentStepSpec
from .spec import StepOutcome as StepOutcome
from .spec import TokenUsage as TokenUsage

__version__ = "0.1.0"

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
    # Budget
    "BudgetSnapshot",
    "WorkflowBudget",
    # Events
    "WorkflowEvent",
    # Errors
    "FleetError",
]
