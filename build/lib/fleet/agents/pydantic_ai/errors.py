"""pydantic-ai's errors as fleet's error kinds.

pydantic-ai raises its own exception tree from a run; a step fails with one of fleet's
short kinds instead (``StepOutcome.error``). The message keeps pydantic-ai's first line,
never the provider's response body (it can echo a key or the prompt back).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic_ai.exceptions import (
    AgentRunError,
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelServerError,
    ModelTimeoutError,
    ModelUnavailableError,
    OutputTokenLimitExceeded,
    RunCancelled,
    RunTimedOut,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
)

from ...errors import AgentError, BudgetExhaustedError

__all__ = ["as_agent_error"]

_UNAVAILABLE = (ModelRateLimitError, ModelUnavailableError, ModelServerError, ModelConnectionError)


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = getattr(error, "message", None)
    text = text if isinstance(text, str) else str(error)
    line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _kind(error: AgentRunError, *, capped: bool) -> str:
    """The fleet error kind of one pydantic-ai run error."""
    if isinstance(error, RunTimedOut | ModelTimeoutError | ModelRequestTimeout):
        return "timeout"
    if isinstance(error, RunCancelled):
        return "cancelled"
    if isinstance(error, UsageLimitExceeded):
        return "max_steps" if "request_limit" in error.message else "budget_exhausted"
    if isinstance(error, OutputTokenLimitExceeded):
        # Cut off at fleet's cap: the step's hold ran out, not the agent's own limit.
        return "budget_exhausted" if capped else "provider"
    if isinstance(error, ModelAuthenticationError):
        return "auth"
    if isinstance(error, _UNAVAILABLE):
        return "unavailable"
    if isinstance(error, ModelAPIError):
        return "provider"
    if isinstance(error, UnexpectedModelBehavior) and "output" in error.message.lower():
        return "schema"  # output validation that ran out of retries
    return "provider"


def as_agent_error(
    error: AgentRunError, *, model: str, capped: bool, secrets: Sequence[str] = ()
) -> AgentError:
    """The :class:`~fleet.errors.AgentError` a step fails with for a pydantic-ai run error.

    Args:
        error: what the run raised.
        model: the model's name, for the message.
        capped: whether fleet lowered the last request's ``max_tokens`` to the step's hold.
        secrets: texts masked in the message wherever the provider echoed them (the key).
    """
    kind = _kind(error, capped=capped)
    if kind == "auth":
        text = f"model {model!r}: the provider refused the API key; check the agent's key"
    else:
        text = f"model {model!r}: {type(error).__name__}: {_first_line(error)}"
        for secret in secrets:
            text = text.replace(secret, "***")
    if kind == "budget_exhausted":
        return BudgetExhaustedError(
            f"{text}; raise the step's max_tokens or the workflow budget", consumed=0
        )
    return AgentError(text, kind=kind)
