"""The ``[agents.NAME]`` table of kind ``openai``: which server, which model, how to drive it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import ConfigError
from ...spec import describe_validation_error

__all__ = ["OpenAIAgentConfig", "OpenAIToolConfig"]


class _ConfigModel(BaseModel):
    """Frozen, strict about unknown keys, and raising ``ConfigError`` on bad input."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(error, type(self).__name__)) from None

    # Validation (``model_validate``) reports fields itself; see ``FleetModel.__init__``.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class OpenAIToolConfig(_ConfigModel):
    """A python function the model may call. In TOML a bare ``"pkg.mod:func"`` string works too."""

    target: str
    """Dotted path ``"package.module:function"`` of a sync or async function."""
    name: str | None = None
    """Name the model sees (default: the function's name)."""
    description: str | None = None
    """What the tool does, for the model (default: the docstring's first paragraph)."""
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object; derived from the function's signature (or
    its single pydantic-model parameter) when not given."""


class OpenAIAgentConfig(_ConfigModel):
    """How to reach and drive one model; the ``[agents.NAME]`` table of kind ``openai``."""

    base_url: str
    """The server's API root, e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.openai.com/v1``."""
    model: str
    """The model name the server knows."""
    system: str | None = None
    """System prompt, sent first in every conversation."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature (``None``: the server's default)."""
    max_tokens: int = Field(default=1024, ge=1)
    """Completion tokens one call may generate (capped further by the step's hold)."""
    api_key_env: str | None = None
    """Environment variable holding the API key; unset (or empty) means no key is sent."""
    reserve_tokens: int | None = Field(default=None, ge=0)
    """Default reservation of a step without ``max_tokens`` (default: ``max_tokens`` plus
    an estimate of the first prompt)."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Limit for one HTTP request; the step's own ``timeout_s`` bounds the whole step."""
    max_retries: int = Field(default=4, ge=0)
    """Retries after a 429, 5xx, timeout or dropped connection (so ``max_retries + 1``
    attempts per call at most)."""
    backoff_s: float = Field(default=0.5, ge=0)
    """First retry's delay without ``Retry-After``; doubles per retry (jittered, ≤ 30 s)."""
    max_concurrent: int | None = Field(default=None, ge=1)
    """Model calls this agent keeps in flight to its server at most, per process
    (``None``: up to 256). The agent starts there and backs off when calls time out,
    are turned away or slow down (see ``fleet.agents.openai.concurrency``). In an agents
    file it comes from the agent's ``[limits.NAME] max_concurrent``, the one concurrency
    cap; the key on the agent's own table is deprecated (still read, with a warning)."""
    max_tool_rounds: int = Field(default=8, ge=0)
    """Tool rounds allowed when the spec sets no ``max_steps``."""
    json_schema_format: bool = True
    """Send a ``response_format`` with an ``output_schema`` (``json_schema``; a server that
    rejects it gets ``json_object``, then none, remembered for the process)."""
    stream: bool = False
    """Ask for the answer as server-sent events and publish its text as the step's output
    deltas while it arrives (``step_delta``; ``fleet watch ROOT --output``). Usage is asked
    for in the stream (``stream_options.include_usage``), so the budget settles exactly; a
    server that refuses streaming, or streams without usage, is called without streaming
    from then on (remembered per agent, for the process)."""
    tools: tuple[OpenAIToolConfig, ...] = ()
    """Python functions the model may call."""
    provider: str | None = None
    """genai-prices' provider id for pricing (e.g. ``"openai"``); by default the provider
    whose API ``base_url`` is, else the one whose models match ``model``."""
    unknown_price: Literal["refuse", "allow"] | None = None
    """A model with no price under a budget: ``"refuse"`` fails the step ``no_price``
    before any request; ``"allow"`` runs it uncounted. Default: the agents file's
    top-level ``unknown_price``, else ``"refuse"``."""

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_paths(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple({"target": item} if isinstance(item, str) else item for item in value)
        return value
