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

__all__ = [
    "ChatCompletion",
    "Choice",
    "Message",
    "StreamedCompletion",
    "ToolCall",
    "error_message",
    "parse_json",
]


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


class StreamedCompletion:
    """Builds a ``chat.completion`` body from the chunks of a streamed answer (SSE).

    Text pieces go to ``on_text(text, first)`` as they arrive (``first``: the answer's
    first piece, which starts the step's shown text over); tool calls are put together
    by their ``index``; the last chunk's ``usage`` (``stream_options.include_usage``) is
    kept. A chunk it cannot read is skipped, like a field :class:`ChatCompletion` cannot.

    Args:
        on_text: told each piece of the answer's text.
    """

    def __init__(self, on_text: Any = None) -> None:
        self.on_text = on_text
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: Any = None
        self.usage: Any = None
        self.error: Any = None
        """An ``error`` object the server sent instead of a chunk, if any."""

    def feed(self, chunk: Any) -> None:
        """Take one decoded ``data:`` event."""
        if not isinstance(chunk, dict):
            return
        if chunk.get("error") is not None:
            self.error = chunk["error"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(first, dict):
            return
        if first.get("finish_reason") is not None:
            self.finish_reason = first["finish_reason"]
        delta = first.get("delta")
        if not isinstance(delta, dict):
            return
        text = _text(delta.get("content"))
        if text:
            if self.on_text is not None:
                self.on_text(text, not self.content)
            self.content.append(text)
        for part in delta.get("tool_calls") or []:
            if isinstance(part, dict):
                self._tool_part(part)

    def _tool_part(self, part: dict[str, Any]) -> None:
        given = part.get("index")
        index = given if isinstance(given, int) else len(self.calls)
        call = self.calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": None, "arguments": ""}}
        )
        if isinstance(part.get("id"), str):
            call["id"] = part["id"]
        function = part.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                call["function"]["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]

    def body(self) -> dict[str, Any]:
        """The answer as a non-streamed ``chat.completion`` body (``usage`` if sent)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            message["tool_calls"] = [self.calls[index] for index in sorted(self.calls)]
        body: dict[str, Any] = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body


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
