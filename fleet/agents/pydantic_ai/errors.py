"""pydantic-ai's errors as fleet's error kinds.

pydantic-ai raises its own exception tree from a run; a step fails with one of fleet's
short kinds instead (``StepOutcome.error``). The message keeps pydantic-ai's first line,
never the provider's response body (it can echo a key or the prompt back). A
``FallbackModel`` whose every model failed raises a ``FallbackExceptionGroup``:
:func:`fallback_error` picks the kind its failures tell most about.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic_ai.exceptions import (
    AgentRunError,
    FallbackExceptionGroup,
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
from pydantic_ai.models.fallback import ResponseRejected

from ...cancel import StepInterrupted
from ...errors import AgentError, BudgetExhaustedError

__all__ = ["as_agent_error", "fallback_error"]

_UNAVAILABLE = (ModelRateLimitError, ModelUnavailableError, ModelServerError, ModelConnectionError)

_OUT_OF_OUTPUT_RETRIES = re.compile(r"Exceeded maximum output retries \(\d+\)")
"""pydantic-ai's message when output validation ran out of retries (its agent graph and
tool execution raise ``UnexpectedModelBehavior`` with exactly this)."""

_FIRST = ("cancelled", "crashed", "budget_exhausted", "no_price", "auth")
_LAST = ("timeout", "unavailable")


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
    if isinstance(error, UnexpectedModelBehavior) and _OUT_OF_OUTPUT_RETRIES.fullmatch(
        error.message
    ):
        return "schema"
    return "provider"


def _text(error: BaseException, kind: str, secrets: Sequence[str]) -> str:
    """What failed, in one line: never the provider's answer to a refused key."""
    if kind == "auth":
        return "the provider refused the API key; check the agent's key"
    text = f"{type(error).__name__}: {_first_line(error)}"
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _as_kind(text: str, kind: str) -> AgentError:
    if kind == "budget_exhausted":
        return BudgetExhaustedError(
            f"{text}; raise the step's max_tokens or the workflow budget", consumed=0
        )
    return AgentError(text, kind=kind)


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
    return _as_kind(f"model {model!r}: {_text(error, kind, secrets)}", kind)


def fallback_error(
    group: FallbackExceptionGroup, *, model: str, capped: bool, secrets: Sequence[str] = ()
) -> BaseException:
    """What a step fails with when every model of a ``FallbackModel`` failed.

    Each failure gets its kind (a pydantic-ai error as :func:`as_agent_error` maps it,
    responses the agent's ``fallback_on`` rejected ``provider``, a fleet error its own,
    a cancel ``cancelled``, anything else ``crashed``) and the most telling kind wins,
    the earlier model's on a tie. A failure that running the
    step again cannot cure tells more than one it might: ``cancelled``, ``crashed``,
    ``budget_exhausted``, ``no_price``, ``auth``, then any other kind (``provider``...),
    and last the passing ones, ``timeout`` then ``unavailable``. A pydantic-ai error
    becomes an :class:`~fleet.errors.AgentError` of that kind whose message names every
    model's failure; any other failure is returned as it was raised (the step then ends
    as that exception says: a fleet error's kind, a cancel, a crash).

    Args:
        group: what the run raised.
        model: the chain's name, for the message.
        capped: whether fleet lowered the last request's ``max_tokens`` to the step's hold.
        secrets: texts masked in the message wherever a provider echoed them.
    """
    failures = list(_leaves(group))
    kinds = [_failure_kind(failure, capped=capped) for failure in failures]
    chosen = min(range(len(failures)), key=lambda i: _rank(kinds[i]))
    winner = failures[chosen]
    if not isinstance(winner, AgentRunError | ResponseRejected):
        return winner
    each = []
    for failure, kind in zip(failures, kinds, strict=True):
        name = getattr(failure, "model_name", None)
        said = _text(failure, kind, secrets)
        each.append(f"{name}: {said}" if isinstance(name, str) else said)
    text = f"model {model!r}: every model failed ({'; '.join(each)})"
    return _as_kind(text, kinds[chosen])


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """A group's exceptions, nested groups flattened, in the order they were raised."""
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found


def _failure_kind(error: BaseException, *, capped: bool) -> str:
    if isinstance(error, AgentRunError):
        return _kind(error, capped=capped)
    if isinstance(error, ResponseRejected):
        return "provider"
    if isinstance(error, AgentError):
        return error.kind
    if isinstance(error, StepInterrupted):
        return "cancelled"
    return "crashed"


def _rank(kind: str) -> int:
    if kind in _FIRST:
        return _FIRST.index(kind)
    if kind in _LAST:
        return len(_FIRST) + 1 + _LAST.index(kind)
    return len(_FIRST)
