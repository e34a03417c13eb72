"""What :mod:`bench.provider` answers: text, an object fitting a JSON schema, tool calls.

:func:`example` builds one instance of a simple JSON schema (objects, arrays, strings,
numbers, booleans, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf``, local ``$ref``,
length and range bounds) — enough for benchmark and test schemas, not a full generator.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["completion", "example", "schema_in_prompt", "tool_call_answer"]

_MAX_DEPTH = 12


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part, {}) if isinstance(target, dict) else {}
    return target if isinstance(target, dict) else {}


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 1 if low is None else low + (1 if "exclusiveMinimum" in schema else 0)
    if high is not None and value > high:
        value = high - (1 if "exclusiveMaximum" in schema else 0)
    return int(value) if integer else float(value)


def _string(schema: dict[str, Any]) -> str:
    formats = {"date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "email": "a@b.example"}
    text = formats.get(schema.get("format", ""), "text")
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    text = text.ljust(low, "x")
    return text if high is None else text[:high]


_NO_VALUE = object()


def _combined(schema: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    """The value ``const``, ``enum`` or a combinator picks; ``_NO_VALUE`` without one."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return example(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part, root)
            properties = {**merged.get("properties", {}), **part.get("properties", {})}
            merged = {**merged, **part, "properties": properties}
        return example(merged, root, depth + 1)
    return _NO_VALUE


def example(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """One value that satisfies ``schema`` (for the simple schemas described above)."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    root = schema if root is None else root
    schema = _resolve(schema, root)
    value = _combined(schema, root, depth)
    if value is not _NO_VALUE:
        return value
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: example(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = max(schema.get("minItems", 1), 0)
        if schema.get("maxItems") is not None:
            count = min(count, schema["maxItems"])
        return [example(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    return {"boolean": True, "null": None}.get(kind, _string(schema) if kind == "string" else None)


def schema_in_prompt(messages: list[Any]) -> dict[str, Any] | None:
    """The first JSON schema quoted in the last user message, if any."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else None
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict) and ("type" in value or "properties" in value):
            return value
        start = text.find("{", start + 1)
    return None


def completion(number: int, schema: dict[str, Any] | None, response_format: dict[str, Any]) -> str:
    """The text of answer ``number``: JSON when a schema or JSON object was asked for."""
    if schema is not None:
        return json.dumps(example(schema))
    if response_format.get("type") == "json_object":
        return json.dumps({"answer": number})
    return f"answer {number}"


def tool_call_answer(body: dict[str, Any], number: int, rounds: int) -> dict[str, Any] | None:
    """An assistant message calling a tool, when the request offers tools and wants one.

    The tool is the one ``tool_choice`` names, else the first offered; its arguments fit
    its parameters schema. ``None`` once the conversation holds ``rounds`` tool results
    (or with ``tool_choice: "none"``): then the answer is text.
    """
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    choice = body.get("tool_choice")
    done = sum(1 for m in body["messages"] if isinstance(m, dict) and m.get("role") == "tool")
    if not tools or choice == "none" or done >= rounds:
        return None
    function = tools[0]["function"]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        function = next(
            (t["function"] for t in tools if t["function"].get("name") == wanted), function
        )
    arguments = example(function.get("parameters") or {"type": "object"})
    call = {
        "id": f"call_{number}_{done}",
        "type": "function",
        "function": {"name": function.get("name"), "arguments": json.dumps(arguments)},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}
