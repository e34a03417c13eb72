"""The built-in ``echo`` agent: deterministic, offline, returns the prompt.

It behaves like a tiny language model for tests and demos: it reports token usage
(an estimate of the prompt, and the same again for the echoed completion) and
respects the step's token hold, so budgets can be exercised without a server.
"""

from __future__ import annotations

from ..errors import BudgetExhaustedError
from ..spec import AgentStepSpec, TokenUsage
from .base import AgentContext, AgentDefinition, AgentResult, estimate_tokens

__all__ = ["ECHO", "echo", "echo_usage"]


def echo_usage(spec: AgentStepSpec) -> TokenUsage:
    """The usage ``echo`` reports for ``spec``."""
    tokens = estimate_tokens(spec.prompt)
    return TokenUsage(prompt_tokens=tokens, completion_tokens=tokens)


async def echo(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Return the prompt as the output."""
    usage = echo_usage(spec)
    left = ctx.tokens_left()
    if left is not None and usage.total_tokens > left:
        raise BudgetExhaustedError(
            f"echo needs {usage.total_tokens} tokens but step {spec.task_id!r} holds {left}; "
            "raise the step's max_tokens",
            consumed=ctx.used.total_tokens,
            limit=ctx.held_tokens,
            requested=usage.total_tokens,
        )
    ctx.charge(usage)
    return AgentResult(output=spec.prompt, usage=usage)


ECHO = AgentDefinition(
    name="echo", run=echo, reserve_tokens=lambda spec: echo_usage(spec).total_tokens, kind="builtin"
)
