"""pydantic-ai agents as fleet agents (extra ``fleet[pydantic-ai]``).

An agents-file table of kind ``pydantic_ai`` names a ``pydantic_ai.Agent``::

    [agents.extract]
    kind = "pydantic_ai"
    target = "myagents:extractor"
    limit = "gpt-main"          # optional: the provider limit its requests count against

A step runs the agent on its prompt. The agent keeps its model, tools, instructions,
model settings and output type; its model is wrapped (:class:`.model.StepModel`) so that
every request it makes, to any provider pydantic-ai supports, holds its worst case
against the step's budget (``max_tokens`` capped to the tokens and dollars left), is
admitted by the agent's provider limit, is traced as a ``chat`` span, counted in the
metrics and settled with its real usage, and is closed by a cancel. That holds for its
compactions, for each model of a ``FallbackModel`` and for any model a capability moves
a request to (``ModelFallback``), each priced as itself; a token count is admitted by
the limit only, and a batch request (``BatchModelRequests``) is refused. The outcome's
``output`` is the run's output as text (JSON for a structured output, which also fills
``structured``), its ``usage`` the run's total; pydantic-ai's errors become fleet's kinds
(:mod:`.errors`). Tools run where the step runs.

Nothing here is imported by ``import fleet``: the agents file loads it for that kind.
"""

from .agent import PydanticAIAgent as PydanticAIAgent
from .agent import PydanticAIAgentConfig as PydanticAIAgentConfig
from .agent import definition_from_config as definition_from_config
from .model import StepModel as StepModel

__all__ = ["PydanticAIAgent", "PydanticAIAgentConfig", "StepModel", "definition_from_config"]
