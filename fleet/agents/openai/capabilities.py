"""What a server accepts, learned from its refusals instead of assumed.

Servers implement different parts of the chat-completions API. llama-cpp-python answers
``response_format: {"type": "json_schema"}`` with HTTP 500 and a validation error; some
models refuse ``max_tokens`` and want ``max_completion_tokens``; some servers refuse
``content: null`` beside tool calls. When a refusal names a request field that has a
fallback, the agent switches to the fallback and remembers it (per agent, that is per
server, for the life of the process), so later steps do not pay the failed call again.

Fallbacks, field by field:

- ``response_format``: ``json_schema`` → ``json_object`` carrying the schema (when the
  server says it takes ``json_object``) → none (the schema stays in the prompt);
- ``max_tokens`` ↔ ``max_completion_tokens``;
- ``content``: ``""`` instead of ``null`` in assistant messages with tool calls;
- ``tool_choice``, ``parallel_tool_calls``, ``stream_options``, ``temperature``: dropped;
- ``stream``: a server that refuses it, or streams without ``usage`` (so the budget could
  only be charged an estimate), is called without streaming.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .concurrency import Gate

__all__ = ["Capabilities", "Learned", "rejected_field", "validation_error"]

ResponseFormat = Literal["json_schema", "json_object", "none"]

OPTIONAL_FIELDS = ("tool_choice", "parallel_tool_calls", "stream_options", "temperature")
"""Fields the agent can simply stop sending."""

KNOWN_FIELDS = (
    "response_format",
    "stream",
    "max_completion_tokens",
    "max_tokens",
    "content",
    *OPTIONAL_FIELDS,
)
"""Request fields a refusal may name that the agent knows a fallback for."""

_VALIDATION = re.compile(
    r"validation error|input should be|extra inputs are not permitted|field required"
    r"|unsupported (parameter|value)|is not supported|not supported with|unrecognized request"
    r"|unknown (field|parameter)|invalid (type|value) for",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Learned:
    """The request features a server is known to accept (what to send from now on)."""

    response_format: ResponseFormat = "json_schema"
    """How to ask for structured output."""
    token_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    """Which field carries the completion-token cap."""
    null_content: bool = True
    """Whether an assistant message with tool calls may have ``content: null``."""
    dropped: frozenset[str] = field(default_factory=frozenset)
    """Optional fields not to send."""
    stream: bool = True
    """Whether an agent configured with ``stream = true`` may stream from this server."""


def _mentions(text: str, name: str) -> int:
    match = re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", text)
    return match.start() if match else -1


def validation_error(text: str) -> bool:
    """Whether an error body reads as a validation error (not a crash or an overload)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        return True  # FastAPI / pydantic request validation
    return _VALIDATION.search(text) is not None


_PYDANTIC_LOC = re.compile(r"validation errors? for \w+\s*\n\s*(?:body\.)?([A-Za-z_]\w*)")


def rejected_field(text: str, body: dict[str, Any]) -> str | None:
    """The request field a validation error names.

    A field the agent knows a fallback for wins, if ``body`` sent it; of those, the
    earliest mention ("'max_tokens' is not supported, use 'max_completion_tokens'"
    names ``max_tokens``). Otherwise the field a pydantic or FastAPI error locates.
    """
    sent = set(body) | ({"content"} if _has_null_content(body) else set())
    found = [(at, name) for name in KNOWN_FIELDS if name in sent for at in [_mentions(text, name)]]
    found = [(at, name) for at, name in found if at >= 0]
    if found:
        return min(found)[1]
    match = _PYDANTIC_LOC.search(text)
    if match:
        return match.group(1)
    try:
        detail = json.loads(text).get("detail")
        loc = detail[0]["loc"]
        return str(loc[1] if loc[0] == "body" else loc[0])
    except (ValueError, AttributeError, LookupError, TypeError):
        return None


def _has_null_content(body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and "content" in m and m["content"] is None for m in messages
    )


class Capabilities:
    """What one agent has learned about its server; shared by every step and thread.

    Args:
        json_schema_format: whether structured output may use ``response_format`` at all
            (the agent's ``json_schema_format`` setting).
    """

    def __init__(self, *, json_schema_format: bool = True) -> None:
        self._lock = threading.Lock()
        self.learned = Learned(response_format="json_schema" if json_schema_format else "none")
        self.confirmed: frozenset[str] = frozenset()
        """Optional features (``response_format``, ``stream``) the server has answered
        a call asking for (in the form then learned)."""
        self.probe = Gate(1)
        """One call at a time while it asks for a feature not yet confirmed."""

    def unconfirmed(self, features: frozenset[str]) -> bool:
        """Whether a call asking for ``features`` would try one the server never answered."""
        return not features <= self.confirmed

    def confirm(self, features: frozenset[str]) -> None:
        """The server answered a call asking for ``features`` (as now learned)."""
        with self._lock:
            self.confirmed = self.confirmed | features

    def fall_back(self, name: str, text: str, sent: Learned) -> str | None:
        """Learn that the server refused field ``name`` of a request built with ``sent``.

        Args:
            name: the refused field.
            text: the server's error text (only read for which format it offers).
            sent: what the refused request was built from.

        Returns:
            A short description of the change when this call changed what is known,
            ``""`` when another step already learned it (just send again), ``None``
            when there is no fallback for that field.
        """
        step = _fallback(name, text, sent)
        if step is None:
            return None
        changed, description = step
        with self._lock:
            if self.learned != sent:
                return ""  # someone else learned something meanwhile: rebuild and retry
            self.learned = changed
        return description


def _fallback(name: str, text: str, sent: Learned) -> tuple[Learned, str] | None:
    if name == "response_format":
        if sent.response_format == "json_schema" and _mentions(text, "json_object") >= 0:
            return replace(sent, response_format="json_object"), "json_object response format"
        if sent.response_format != "none":
            return replace(sent, response_format="none"), "the output schema in the prompt only"
        return None
    if name == "max_tokens" and sent.token_field == "max_tokens":
        return replace(sent, token_field="max_completion_tokens"), "max_completion_tokens"
    if name == "max_completion_tokens" and sent.token_field == "max_completion_tokens":
        return replace(sent, token_field="max_tokens"), "max_tokens"
    if name == "stream" and sent.stream:
        return replace(sent, stream=False), "answers without streaming"
    if name == "content" and sent.null_content:
        return replace(sent, null_content=False), 'content "" instead of null'
    if name in OPTIONAL_FIELDS and name not in sent.dropped:
        return replace(sent, dropped=sent.dropped | {name}), f"no {name}"
    return None
