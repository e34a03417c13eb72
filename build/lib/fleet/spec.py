"""The data contracts: what to run (``AgentStepSpec``) and what came of it (``StepOutcome``).

Both are frozen pydantic models that travel as JSON (to Celery workers, into journals).
Unknown keys are ignored on load, ``null`` and an absent key mean the same, and
``to_json()`` omits unset optionals, so ``from_json(x.to_json()).to_json()`` is
byte-identical. Invalid input raises :class:`fleet.errors.SpecError` naming the
field and never quoting its value (prompts stay out of error messages).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, ClassVar, Self

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SpecError

__all__ = [
    "NO_USAGE",
    "AgentStepSpec",
    "FleetModel",
    "StepOutcome",
    "TokenUsage",
    "describe_validation_error",
]


MAX_SCHEMA_DEPTH = 128
"""Deepest ``output_schema`` accepted: pydantic cannot serialise a model nested past 255
levels, so a deeper schema would load but never reach a worker or a journal."""


def _depth(value: Any) -> int:
    """How deeply ``value``'s lists and dicts nest (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                deepest = max(deepest, level)
                stack.append((child, level + 1))
    return deepest + 1


def describe_validation_error(error: ValidationError, what: str) -> str:
    """Render a pydantic error as one line per field, without the offending values."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        cause = item.get("ctx", {}).get("error")
        # A ValueError raised by our own validators: its text, without pydantic's prefix.
        text = str(cause) if item["type"] == "value_error" and cause else item["msg"]
        parts.append(f"{where}: {text}")
    return f"invalid {what}: " + "; ".join(parts)


class FleetModel(BaseModel):
    """Base of fleet's value types: frozen, lenient about unknown keys, strict about errors."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)
    _what: ClassVar[str] = "value"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise SpecError(describe_validation_error(error, type(self).__name__)) from None

    # Only direct construction translates errors; validation (``from_dict``, nested models)
    # must not run this ``__init__``, or pydantic would wrap each nested SpecError again,
    # and decoding journals and results stays in pydantic's compiled validator instead of
    # calling back into Python for every model.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Load from a decoded JSON object; raises ``SpecError`` on bad input."""
        if not isinstance(data, dict):
            raise SpecError(
                f"invalid {cls.__name__}: expected a JSON object, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise SpecError(describe_validation_error(error, cls.__name__)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Load from JSON text; raises ``SpecError`` on malformed JSON or bad fields."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise SpecError(f"invalid {cls.__name__}: not valid JSON ({error})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, unset optionals omitted."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        """Compact JSON, unset optionals omitted (stable under a round trip)."""
        return self.model_dump_json(exclude_none=True)


class TokenUsage(FleetModel):
    """Tokens one step (or one LLM call) used, as the model server reported them."""

    prompt_tokens: int = Field(default=0, ge=0)
    """Tokens in the prompt(s) sent."""
    completion_tokens: int = Field(default=0, ge=0)
    """Tokens generated."""
    total_tokens: int = Field(default=0, ge=0)
    """Tokens charged; prompt + completion when the server did not say."""

    @model_validator(mode="after")
    def _fill_total(self) -> Self:
        if self.total_tokens == 0 and (self.prompt_tokens or self.completion_tokens):
            object.__setattr__(self, "total_tokens", self.prompt_tokens + self.completion_tokens)
        return self

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


NO_USAGE = TokenUsage()
"""Zero usage (a shared immutable value)."""


class AgentStepSpec(FleetModel):
    """One unit of orchestrated agent work: what to run, independent of where it runs."""

    task_id: str = Field(min_length=1)
    """Stable caller-assigned id: correlates events, journal records and results."""
    agent: str = Field(min_length=1)
    """Registry name of the agent to run (``echo``, or a name from the agents file)."""
    description: str
    """Short human label."""
    prompt: str
    """The instruction handed to the agent."""
    max_steps: int | None = Field(default=None, ge=0)
    """Cap on the agent's tool rounds for this step."""
    parent_session_id: str | None = None
    """Parent session id, for event correlation only."""
    output_schema: dict[str, Any] | None = None
    """JSON Schema the step's result must satisfy; the validated value lands in ``structured``."""
    max_tokens: int | None = Field(default=None, ge=0)
    """This step's token reservation and cap (prompt and completion together)."""
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Wall-clock limit for the step in seconds; past it the step fails with ``timeout``."""

    @model_validator(mode="after")
    def _check_schema(self) -> Self:
        if self.output_schema is not None:
            if _depth(self.output_schema) > MAX_SCHEMA_DEPTH:
                raise ValueError(
                    f"output_schema nests deeper than {MAX_SCHEMA_DEPTH} levels; "
                    "flatten it (use $defs)"
                )
            try:
                Draft202012Validator.check_schema(self.output_schema)
            except SchemaError as error:
                raise ValueError(
                    f"output_schema is not a valid JSON Schema ({error.message}); "
                    "fix the schema or leave output_schema unset"
                ) from None
            except RecursionError:
                raise ValueError(
                    "output_schema is nested too deeply to check; flatten it (use $defs)"
                ) from None
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that define *which* invocation this is (used by journal identity)."""
        return {
            "task_id": self.task_id,
            "agent": self.agent,
            "description": self.description,
            "prompt": self.prompt,
            "max_steps": self.max_steps,
            "parent_session_id": self.parent_session_id,
            "output_schema": self.output_schema,
        }


class StepOutcome(FleetModel):
    """The result of running one :class:`AgentStepSpec` to completion."""

    task_id: str
    """The originating spec's ``task_id``."""
    session_id: str
    """The run's session id (``task-run-<task_id>`` unless the host says otherwise)."""
    agent: str
    """The agent that ran."""
    output: str
    """Final text output, or the failure message when ``success`` is false."""
    success: bool
    """False for failed, refused, crashed, timed-out or cancelled steps."""
    structured: Any = None
    """The validated value when the spec had an ``output_schema``."""
    usage: TokenUsage = Field(default_factory=TokenUsage)
    """Tokens the step used (charged to the budget)."""
    error: str | None = None
    """Machine-readable failure kind (``budget_exhausted``, ``timeout``, ...); ``None`` if ok."""
    duration_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Wall-clock seconds the step ran."""
    worker: str | None = None
    """Where it ran, for humans: ``local`` in-process, a Celery node name on the fleet."""
    cost_usd: Decimal | None = Field(default=None, ge=0)
    """What the step's model calls cost in dollars (exact, six decimals; a string in
    JSON), charged to the budget; ``None`` when no priced model call was made."""

    @classmethod
    def failed(
        cls,
        task_id: str,
        agent: str,
        message: str,
        *,
        error: str = "failed",
        usage: TokenUsage | None = None,
        duration_s: float = 0.0,
        worker: str | None = None,
        cost_usd: Decimal | None = None,
    ) -> StepOutcome:
        """Build the outcome of a step that failed, was refused or could not start."""
        return cls(
            task_id=task_id,
            session_id=f"task-run-{task_id}",
            agent=agent,
            output=message,
            success=False,
            error=error,
            usage=usage or TokenUsage(),
            duration_s=duration_s,
            worker=worker,
            cost_usd=cost_usd,
        )
