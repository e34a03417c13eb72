"""What the server sends back, parsed into types that tolerate what real servers do.

Servers differ: extra fields, ``content: null`` beside tool calls, content as a list of
parts, no ``usage``, ``arguments`` as an object instead of a JSON string. Every model
here ignores unknown keys and replaces a field it cannot read with its default, so
one odd field never loses the rest of an answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidatorFunctionWrapHandler
from pydantic.functional_validators import WrapValidator

from ...spec import TokenUsage

__all__ = ["ChatCompletion", "Choice", "Message", "ToolCall", "error_message", "parse_json"]


def _or(default: Any) -> WrapValidator:
    """Validate as declared, or fall back to ``default`` when the value does not fit."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            return default

    return WrapValidator(validate)


class _Lenient(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class FunctionCall(_Lenient):
    """The function half of a tool call."""

    name: Annotated[str | None, _or(None)] = None
    arguments: Any = None
    """A JSON string per the API; some servers send the object itself."""


class ToolCall(_Lenient):
    """One tool call the model asked for."""

    id: Annotated[str, _or("")] = ""
    type: Annotated[str, _or("function")] = "function"
    function: Annotated[FunctionCall, _or(FunctionCall())] = FunctionCall()

    def to_message(self) -> dict[str, Any]:
        """This call as it goes back in the assistant message (arguments as JSON text)."""
        arguments = self.function.arguments
        if arguments is not None and not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": arguments},
        }


def _text(value: Any) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            part["text"]
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


class Message(_Lenient):
    """The assistant's message of one choice."""

    content: Any = None
    tool_calls: Annotated[list[Annotated[ToolCall, _or(ToolCall())]], _or([])] = []

    @property
    def text(self) -> str:
        """The content as text (``""`` for ``null``)."""
        return _text(self.content)


class Choice(_Lenient):
    """One choice of a completion."""

    message: Annotated[Message | None, _or(None)] = None
    finish_reason: Any = None


class ChatCompletion(_Lenient):
    """A ``chat.completion`` response body."""

    choices: Annotated[list[Annotated[Choice | None, _or(None)]], _or([])] = []
    usage: Annotated[TokenUsage | None, _or(None)] = None

    @classmethod
    def parse(cls, data: Any) -> ChatCompletion:
        """Read a decoded response body; anything unreadable becomes empty fields."""
        return cls.model_validate(data if isinstance(data, dict) else {})

    @property
    def first(self) -> Choice | None:
        """The first choice, if any."""
        return self.choices[0] if self.choices else None


def error_message(text: str, *, limit: int | None = 500) -> str:
    """The ``error.message`` of an error body, else the body itself (cut at ``limit``)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:limit]
        if isinstance(inner, str):
            return inner[:limit]
    return text.strip()[:limit] or "(empty body)"


def parse_json(text: str) -> tuple[Any, str]:
    """Parse the model's JSON answer, tolerating a surrounding Markdown code fence.

    Returns:
        ``(value, the JSON text without the fence)``.

    Raises:
        ValueError: the text is not JSON.
    """
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.partition("\n")[2].rstrip()
        stripped = stripped.removesuffix("```").strip()
    return json.loads(stripped), stripped
