"""Agents: what runs inside a step, looked up by name."""

from .base import AgentContext as AgentContext
from .base import AgentDefinition as AgentDefinition
from .base import AgentFunction as AgentFunction
from .base import AgentResult as AgentResult
from .base import estimate_tokens as estimate_tokens
from .echo import echo as echo
from .openai import OpenAIAgent as OpenAIAgent
from .openai import OpenAIAgentConfig as OpenAIAgentConfig
from .registry import AgentRegistry as AgentRegistry
from .registry import load_agents as load_agents
from .registry import resolve_target as resolve_target

__all__ = [
    "AgentContext",
    "AgentDefinition",
    "AgentFunction",
    "AgentRegistry",
    "AgentResult",
    "OpenAIAgent",
    "OpenAIAgentConfig",
    "echo",
    "estimate_tokens",
    "load_agents",
    "resolve_target",
]
