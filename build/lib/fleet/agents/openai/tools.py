"""Python functions the model may call: their JSON Schemas, and running one call safely."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ValidationError, create_model

from ... import telemetry
from ...errors import ConfigError
from ..targets import resolve_target
from .config import OpenAIToolConfig
from .wire import ToolCall

__all__ = ["Tool", "build_tool", "run_tool_call"]

logger = logging.getLogger("fleet.agents.openai")


@dataclass(frozen=True)
class Tool:
    """One callable tool: what the model sees, and how to call it with checked arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    invoke: Callable[[dict[str, Any]], Awaitable[Any]]

    def schema(self) -> dict[str, Any]:
        """The entry of the request's ``tools`` array."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def _arguments_model(func: Callable[..., Any], target: str) -> tuple[type[BaseModel], bool]:
    """The pydantic model of ``func``'s arguments, and whether it *is* its one parameter."""
    try:
        hints = typing.get_type_hints(func)
        parameters = list(inspect.signature(func).parameters.values())
    except (NameError, TypeError, ValueError) as problem:
        raise ConfigError(
            f"tool {target!r}: cannot read its signature ({problem}); give `parameters` "
            "(a JSON Schema) in the tool's config",
            key=target,
        ) from None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise ConfigError(
            f"tool {target!r} takes *args/**kwargs; give `parameters` (a JSON Schema) in the "
            "tool's config",
            key=target,
        )
    if len(parameters) == 1:
        hint = hints.get(parameters[0].name)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return hint, True
    fields: dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
        for p in parameters
    }
    return create_model(f"{getattr(func, '__name__', 'tool')}_arguments", **fields), False


def build_tool(config: OpenAIToolConfig) -> Tool:
    """Import the tool's function and derive (or check) its arguments' JSON Schema.

    Raises:
        ConfigError: the target does not import, its signature cannot be read, or the
            given ``parameters`` is not a JSON Schema.
    """
    func = resolve_target(config.target, what="tool")
    name = config.name or getattr(func, "__name__", "") or config.target.rpartition(":")[2]
    description = config.description or (inspect.getdoc(func) or "").split("\n\n")[0]
    is_async = inspect.iscoroutinefunction(func)

    async def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if is_async:
            return await func(*args, **kwargs)
        result = await asyncio.to_thread(func, *args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    if config.parameters is not None:
        try:
            Draft202012Validator.check_schema(config.parameters)
        except SchemaError as problem:
            raise ConfigError(
                f"tool {config.target!r}: parameters is not a valid JSON Schema "
                f"({problem.message})",
                key=config.target,
            ) from None
        validator = Draft202012Validator(config.parameters)

        async def invoke_checked(arguments: dict[str, Any]) -> Any:
            problem = next(iter(validator.iter_errors(arguments)), None)
            if problem is not None:
                raise ValueError(problem.message)
            return await call((), arguments)

        return Tool(name, description, config.parameters, invoke_checked)

    model, whole = _arguments_model(func, config.target)

    async def invoke_model(arguments: dict[str, Any]) -> Any:
        value = model.model_validate(arguments)
        if whole:
            return await call((value,), {})
        return await call((), {field: getattr(value, field) for field in type(value).model_fields})

    return Tool(name, description, model.model_json_schema(), invoke_model)


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str)


async def run_tool_call(tools: Mapping[str, Tool], call: ToolCall, *, label: str) -> dict[str, Any]:
    """Run one requested tool call and return the ``tool`` message with its result.

    Problems (unknown tool, bad arguments, the tool raising) are not step failures: their
    text is the result, so the model can correct itself.
    """
    name = call.function.name
    if telemetry.active() is None:
        return await _run_tool_call(tools, call, name, label)
    attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": str(name)}
    if call.id:
        attributes["gen_ai.tool.call.id"] = call.id
    with telemetry.span(f"execute_tool {name}", attributes):
        return await _run_tool_call(tools, call, name, label)


async def _run_tool_call(
    tools: Mapping[str, Tool], call: ToolCall, name: str | None, label: str
) -> dict[str, Any]:
    tool = tools.get(name) if name is not None else None
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        content = f"error: there is no tool named {name!r}; available tools: {known}"
    else:
        try:
            raw = call.function.arguments or "{}"
            arguments = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as problem:
            content = f"error: arguments for {name!r} are not a JSON object ({problem})"
        else:
            try:
                content = _result_text(await tool.invoke(arguments))
            except (ValidationError, ValueError, TypeError) as problem:
                content = f"error: invalid arguments for {name!r}: {problem}"
            except Exception as problem:
                content = f"error: tool {name!r} raised {type(problem).__name__}: {problem}"
                logger.info("%s: tool %r raised %s", label, name, type(problem).__name__)
    return {"role": "tool", "tool_call_id": call.id, "content": content}
