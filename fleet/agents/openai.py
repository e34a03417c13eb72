"""The OpenAI-compatible chat agent: any server that speaks ``POST {base_url}/chat/completions``.

Hosted APIs, vLLM, Ollama and llama.cpp's server all do. One step is one conversation:

1. before every call the step's token hold is checked and the call's ``max_tokens`` is
   capped to what the hold still covers after an estimate of the prompt (refused →
   ``budget_exhausted``); after every call the server's ``usage`` is charged, also when
   the step then fails;
2. tool calls the model asks for are run (importable python functions, sync or async)
   and their results fed back, for at most ``spec.max_steps`` rounds;
3. with an ``output_schema`` the model is asked for JSON (in the prompt, and through the
   server's ``json_schema`` response format when it accepts one), the answer is
   validated, and one repair call is made if it does not fit (still wrong → ``schema``);
4. 429, 5xx, timeouts and dropped connections are retried with backoff (honouring
   ``Retry-After``) within the step's deadline, then fail as ``unavailable``; 401/403
   fail at once as ``auth``; anything else the server refuses is ``provider``.

The API key is read from the environment variable named by ``api_key_env`` when a step
runs, is sent only in the ``Authorization`` header, and is scrubbed from everything the
server sends back, so it never reaches an outcome, an event or a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import logging
import math
import os
import re
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from ..config import mask_url
from ..errors import AgentError, ConfigError
from ..spec import AgentStepSpec, TokenUsage, describe_validation_error
from .base import AgentContext, AgentDefinition, AgentResult, estimate_tokens
from .registry import resolve_target

__all__ = ["OpenAIAgent", "OpenAIAgentConfig", "OpenAIToolConfig", "definition_from_config"]

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 120.0
_LEASE_MARGIN_S = 5.0
"""An in-flight slot outlives the request timeout by this much before it lapses."""
"""The longest ``Retry-After`` honoured; a server asking for more gets this."""

_CONTRACT = (
    "FINAL OUTPUT CONTRACT: your final answer must be exactly one JSON value that matches "
    "the JSON Schema below, with no other text before or after it.\n{schema}"
)
_REPAIR = (
    "Your previous answer does not satisfy the output contract: {problem}. Reply with only "
    "the corrected JSON value matching the JSON Schema, and nothing else."
)


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
    max_tool_rounds: int = Field(default=8, ge=0)
    """Tool rounds allowed when the spec sets no ``max_steps``."""
    json_schema_format: bool = True
    """Send ``response_format: json_schema`` with an ``output_schema`` (dropped for the rest
    of the step if the server rejects it)."""
    tools: tuple[OpenAIToolConfig, ...] = ()
    """Python functions the model may call."""

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_paths(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple({"target": item} if isinstance(item, str) else item for item in value)
        return value


# -- tools --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    invoke: Callable[[dict[str, Any]], Awaitable[Any]]

    def schema(self) -> dict[str, Any]:
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


def _build_tool(config: OpenAIToolConfig) -> _Tool:
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

        return _Tool(name, description, config.parameters, invoke_checked)

    model, whole = _arguments_model(func, config.target)

    async def invoke_model(arguments: dict[str, Any]) -> Any:
        value = model.model_validate(arguments)
        if whole:
            return await call((value,), {})
        return await call((), {field: getattr(value, field) for field in type(value).model_fields})

    return _Tool(name, description, model.model_json_schema(), invoke_model)


@dataclass(frozen=True)
class _Reply:
    """The assistant's answer to one call."""

    content: str
    tool_calls: list[Any]
    finish_reason: Any


def _tool_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str)


# -- errors the HTTP layer raises ----------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, dropped connection)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Refused(AgentError):
    """The server refused the request with an HTTP status we do not retry."""

    def __init__(self, message: str, *, status: int, kind: str = "provider") -> None:
        super().__init__(message, kind=kind)
        self.status = status


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return min(max(float(millis) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _reset_after(headers: httpx.Headers) -> float | None:
    """Seconds until the provider's windows reset (``x-ratelimit-reset-*``, e.g. ``6m0s``)."""
    longest: float | None = None
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name, "").strip()
        parts = _DURATION.findall(value)
        if not parts or _DURATION.sub("", value):
            try:  # a bare number of seconds
                seconds = float(value)
            except ValueError:
                continue
        else:
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in parts)
        if math.isfinite(seconds):
            longest = max(longest or 0.0, min(max(seconds, 0.0), MAX_RETRY_AFTER_S))
    return longest


def _usage_total(data: Any) -> int | None:
    """The ``usage.total_tokens`` of a completion (``None`` when absent)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if type(total) is int and total > 0 else None


def _error_message(text: str) -> str:
    """The ``error.message`` of an error body, else the body itself (shortened)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:500]
        if isinstance(inner, str):
            return inner[:500]
    return text.strip()[:500] or "(empty body)"


def _parse_json(text: str) -> Any:
    """Parse the model's JSON answer, tolerating a surrounding Markdown code fence."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.partition("\n")[2].rstrip()
        stripped = stripped.removesuffix("```").strip()
    return json.loads(stripped), stripped


# -- the agent ---------------------------------------------------------------------


class OpenAIAgent:
    """An agent backed by an OpenAI-compatible chat-completions server.

    ``OpenAIAgent(OpenAIAgentConfig(base_url=..., model=...))`` is an agent function
    (``await agent(spec, ctx)``); register it under a name with :meth:`definition` to
    keep its default token reservation, or pass it directly in
    ``LocalExecutor(agents={...})``.

    Args:
        config: the server, model and behaviour.
        name: the agent's name in log lines.

    Raises:
        ConfigError: a tool cannot be imported or its parameters are not a JSON Schema,
            or two tools share a name.
    """

    def __init__(self, config: OpenAIAgentConfig, *, name: str = "openai") -> None:
        self.config = config
        self.name = name
        tools: dict[str, _Tool] = {}
        for tool_config in config.tools:
            tool = _build_tool(tool_config)
            if tool.name in tools:
                raise ConfigError(
                    f"agent {name!r}: two tools are named {tool.name!r}; set `name` on one",
                    key=tool_config.target,
                )
            tools[tool.name] = tool
        self._tools = tools
        self.endpoint = config.base_url.rstrip("/") + "/chat/completions"
        self.where = mask_url(config.base_url)

    def __repr__(self) -> str:
        return (
            f"OpenAIAgent(name={self.name!r}, model={self.config.model!r}, "
            f"base_url={self.where!r}, tools={sorted(self._tools)!r})"
        )

    def first_messages(self, spec: AgentStepSpec) -> list[dict[str, Any]]:
        """The conversation a step starts with (system prompt, then the step's prompt)."""
        messages: list[dict[str, Any]] = []
        if self.config.system:
            messages.append({"role": "system", "content": self.config.system})
        prompt = spec.prompt
        if spec.output_schema is not None:
            schema = json.dumps(spec.output_schema, indent=2, sort_keys=True)
            prompt = f"{prompt}\n\n{_CONTRACT.format(schema=schema)}"
        messages.append({"role": "user", "content": prompt})
        return messages

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The ``tools`` array sent to the server."""
        return [tool.schema() for tool in self._tools.values()]

    def prompt_estimate(self, messages: list[dict[str, Any]], *, tools: bool) -> int:
        """Tokens a request with ``messages`` (and the tools, if offered) is expected to take."""
        estimate = estimate_tokens(json.dumps(messages))
        if tools and self._tools:
            estimate += estimate_tokens(json.dumps(self.tool_schemas()))
        return estimate

    def reserve_tokens(self, spec: AgentStepSpec) -> int:
        """Default reservation for ``spec``: ``reserve_tokens``, else ``max_tokens`` + prompt."""
        if self.config.reserve_tokens is not None:
            return self.config.reserve_tokens
        return self.config.max_tokens + self.prompt_estimate(self.first_messages(spec), tools=True)

    def definition(self, name: str | None = None) -> AgentDefinition:
        """This agent as a registry entry (with its default reservation)."""
        return AgentDefinition(
            name=name or self.name, run=self, reserve_tokens=self.reserve_tokens, kind="openai"
        )

    async def __call__(self, spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        """Run one step: the conversation, its tool rounds and its structured output."""
        env = self.config.api_key_env
        key = (os.environ.get(env) or None) if env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(headers=headers) as client:
            return await _Conversation(self, spec, ctx, client, key).run()


class _Conversation:
    """One step's exchange with the server."""

    def __init__(
        self,
        agent: OpenAIAgent,
        spec: AgentStepSpec,
        ctx: AgentContext,
        client: httpx.AsyncClient,
        key: str | None,
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.spec = spec
        self.ctx = ctx
        self.client = client
        self._secrets = [key, json.dumps(key)[1:-1]] if key else []
        self.use_format = self.config.json_schema_format and spec.output_schema is not None
        self.label = f"agent {agent.name!r} step {spec.task_id!r}"
        backoff = self.config.backoff_s
        self._backoff = wait_exponential(multiplier=backoff, max=30.0) + wait_random(0, backoff)
        self._gave_up = ""
        self._planned: dict[int, float] = {}
        self._call_tokens = 0

    def scrub(self, text: str) -> str:
        """``text`` with the API key masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def run(self) -> AgentResult:
        messages = self.agent.first_messages(self.spec)
        rounds_allowed = (
            self.spec.max_steps if self.spec.max_steps is not None else self.config.max_tool_rounds
        )
        offer_tools = rounds_allowed > 0 and bool(self.agent.tool_schemas())
        rounds = 0
        while True:
            answer = await self.complete(messages, tools=offer_tools)
            calls = answer.tool_calls
            if not calls:
                break
            if rounds >= rounds_allowed:
                raise AgentError(
                    f"the model asked for tool round {rounds + 1} but max_steps allows "
                    f"{rounds_allowed}; raise the step's max_steps or simplify the task",
                    kind="max_steps",
                )
            rounds += 1
            messages.append(
                {"role": "assistant", "content": answer.content or None, "tool_calls": calls}
            )
            for call in calls:
                messages.append(await self.run_tool(call))
        text = answer.content
        if self.spec.output_schema is not None:
            return await self.structured(messages, text)
        if not text.strip():
            raise AgentError(
                f"model {self.config.model!r} returned no final output "
                f"(finish_reason {answer.finish_reason!r})",
                kind="provider",
            )
        return AgentResult(output=text, usage=self.ctx.used)

    async def run_tool(self, call: Any) -> dict[str, Any]:
        """Run one requested tool call; problems go back to the model as the result."""
        call_id = call.get("id", "") if isinstance(call, dict) else ""
        function = call.get("function", {}) if isinstance(call, dict) else {}
        name = function.get("name") if isinstance(function, dict) else None
        tool = self.agent._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(sorted(self.agent._tools)) or "none"
            content = f"error: there is no tool named {name!r}; available tools: {known}"
        else:
            try:
                raw = function.get("arguments") or "{}"
                arguments = json.loads(raw) if isinstance(raw, str) else raw
                if not isinstance(arguments, dict):
                    raise ValueError("arguments must be a JSON object")
            except ValueError as problem:
                content = f"error: arguments for {name!r} are not a JSON object ({problem})"
            else:
                try:
                    content = _tool_result(await tool.invoke(arguments))
                except (ValidationError, ValueError, TypeError) as problem:
                    content = f"error: invalid arguments for {name!r}: {problem}"
                except Exception as problem:
                    content = f"error: tool {name!r} raised {type(problem).__name__}: {problem}"
                    logger.info("%s: tool %r raised %s", self.label, name, type(problem).__name__)
        return {"role": "tool", "tool_call_id": call_id, "content": content}

    async def structured(self, messages: list[dict[str, Any]], text: str) -> AgentResult:
        """Validate the final answer against the schema, with one repair call."""
        output, value, problem = self.validate(text)
        if problem is not None:
            logger.info("%s: answer does not fit output_schema; one repair call", self.label)
            repair = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": _REPAIR.format(problem=problem)},
            ]
            answer = await self.complete(repair, tools=False)
            output, value, problem = self.validate(answer.content)
            if problem is not None:
                raise AgentError(f"{problem} (still after one repair call)", kind="schema")
        return AgentResult(output=output, structured=value, usage=self.ctx.used)

    def validate(self, text: str) -> tuple[str, Any, str | None]:
        """``(json_text, value, problem)`` for one answer."""
        assert self.spec.output_schema is not None
        try:
            value, stripped = _parse_json(text)
        except ValueError as problem:
            return text, None, f"output is not JSON ({problem})"
        validator = Draft202012Validator(self.spec.output_schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            return (
                stripped,
                None,
                f"output does not match output_schema at {where}: {errors[0].message}",
            )
        return stripped, value, None

    # -- one call ----------------------------------------------------------------------

    async def complete(self, messages: list[dict[str, Any]], *, tools: bool) -> _Reply:
        """One chat completion: budget check, request (with retries), usage charge."""
        estimate = self.agent.prompt_estimate(messages, tools=tools)
        cap = self.ctx.check_tokens(self.config.max_tokens, prompt_estimate=estimate)
        self._call_tokens = estimate + (self.config.max_tokens if cap is None else cap)
        body: dict[str, Any] = {"model": self.config.model, "messages": messages}
        if cap is not None:
            body["max_tokens"] = cap
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if tools:
            body["tools"] = self.agent.tool_schemas()
        if self.use_format:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "step_output", "schema": self.spec.output_schema},
            }
        try:
            data = await self.post(body)
        except _Refused as refused:
            if refused.status != 400 or "response_format" not in body:
                raise
            logger.info(
                "%s: server rejected response_format; asking in the prompt only", self.label
            )
            self.use_format = False
            del body["response_format"]
            data = await self.post(body)
        return self.charge(data, estimate)

    def charge(self, data: Any, estimate: int) -> _Reply:
        """Charge one response's usage and return its message."""
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        usage = data.get("usage") if isinstance(data, dict) else None
        try:
            charged = TokenUsage.model_validate(usage) if isinstance(usage, dict) else None
        except ValidationError:
            charged = None
        if charged is None or charged.total_tokens == 0:
            # No usage reported: charge an estimate rather than nothing (the cap stays hard).
            completion = json.dumps(message) if message is not None else ""
            charged = TokenUsage(
                prompt_tokens=estimate, completion_tokens=estimate_tokens(completion)
            )
            logger.debug("%s: server reported no usage; charged an estimate", self.label)
        self.ctx.charge(charged)
        if not isinstance(message, dict):
            raise AgentError(
                f"model server at {self.agent.where} sent a completion without a message",
                kind="provider",
            )
        content = message.get("content")
        calls = message.get("tool_calls")
        return _Reply(
            content=content if isinstance(content, str) else "",
            tool_calls=calls if isinstance(calls, list) else [],
            finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
        )

    async def post(self, body: dict[str, Any]) -> Any:
        """POST one request, retrying transient failures within the step's deadline."""
        self._planned, self._gave_up = {}, ""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            wait=self._wait,
            stop=self._stop,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self.attempt(body)
        except _Transient as last:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise AgentError(
                f"model server at {self.agent.where} is unavailable: {last} "
                f"(gave up after {attempts} attempt(s){self._gave_up})",
                kind="unavailable",
            ) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _wait(self, state: RetryCallState) -> float:
        # Memoised per attempt: the stop check needs the same (jittered) value.
        planned = self._planned.get(state.attempt_number)
        if planned is None:
            problem = state.outcome.exception() if state.outcome is not None else None
            if isinstance(problem, _Transient) and problem.retry_after is not None:
                planned = problem.retry_after
            else:
                planned = float(self._backoff(state))
            self._planned[state.attempt_number] = planned
        return planned

    def _stop(self, state: RetryCallState) -> bool:
        if state.attempt_number > self.config.max_retries:
            self._gave_up = ""
            return True
        remaining = self.ctx.remaining_s()
        upcoming = self._wait(state)
        if remaining is not None and upcoming >= remaining:
            self._gave_up = (
                f"; the next try would be in {upcoming:.2f} s but the step has "
                f"{remaining:.2f} s left"
            )
            return True
        return False

    def _before_sleep(self, state: RetryCallState) -> None:
        problem = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "%s: %s; retrying in %.2f s (attempt %d of %d)",
            self.label,
            problem,
            self._wait(state),
            state.attempt_number + 1,
            self.config.max_retries + 1,
        )

    async def attempt(self, body: dict[str, Any]) -> Any:
        """One HTTP request, admitted under the agent's provider limit first.

        Raises ``_Transient`` for what is worth retrying. The admission is settled with
        the response's real usage (nothing for a 429, which also pauses the limit for
        the whole fleet until the provider's reset; the estimate when unknown).
        """
        admission = await self.ctx.admit_call(
            self._call_tokens, lease_s=self.config.timeout_s + _LEASE_MARGIN_S
        )
        used: int | None = None
        try:
            timeout = self.config.timeout_s
            remaining = self.ctx.remaining_s()
            if remaining is not None:
                timeout = max(min(timeout, remaining), 0.001)
            try:
                response = await self.client.post(self.agent.endpoint, json=body, timeout=timeout)
            except httpx.TimeoutException:
                raise _Transient(f"no answer within {timeout:.3g} s") from None
            except httpx.TransportError as problem:
                raise _Transient(self.scrub(f"{type(problem).__name__}: {problem}")) from None
            text = self.scrub(response.text)
            status = response.status_code
            if 200 <= status < 300:
                try:
                    data = json.loads(text)
                except ValueError:
                    raise _Refused(
                        f"model server at {self.agent.where} sent a response that is not JSON",
                        status=status,
                    ) from None
                used = _usage_total(data)
                return data
            if status == 429:
                used = 0  # refused calls spend nothing at the provider
                reset = _retry_after(response.headers) or _reset_after(response.headers)
                if reset:
                    await self.ctx.pause_limit(reset)
            raise self._status_error(status, _error_message(text), response.headers)
        finally:
            await asyncio.shield(admission.settle(used))

    def _status_error(self, status: int, message: str, headers: httpx.Headers) -> Exception:
        where = self.agent.where
        if status in (401, 403):
            env = self.config.api_key_env
            hint = (
                f"check the key in ${env}"
                if env and self._secrets
                else f"${env} is not set, so no key was sent"
                if env
                else "no key is sent because api_key_env is not set"
            )
            return _Refused(
                f"model server at {where} refused the API key (HTTP {status}: {message}); {hint}",
                status=status,
                kind="auth",
            )
        if status == 404:
            return _Refused(
                f"model server at {where} answered 404 for model {self.config.model!r} "
                f"({message}); check the model name and that base_url is the API root "
                "(usually ending in /v1)",
                status=status,
            )
        if status in (408, 429) or status >= 500:
            wait = _retry_after(headers)
            if wait is None and status == 429:
                wait = _reset_after(headers)
            return _Transient(f"HTTP {status}: {message}", retry_after=wait)
        return _Refused(
            f"model server at {where} refused the request (HTTP {status}: {message})",
            status=status,
        )


# -- the agents file ---------------------------------------------------------------


def definition_from_config(name: str, table: Mapping[str, Any], *, source: str) -> AgentDefinition:
    """Build the agent of one ``[agents.NAME]`` table of kind ``openai``.

    Args:
        name: the agent's name.
        table: the table's keys (``kind`` included).
        source: where the table came from (the file path), for messages.

    Raises:
        ConfigError: a key is missing, unknown or of the wrong type, or a tool is
            invalid (the message names the file and the key, never a value).
    """
    where = f"{source}: [agents.{name}]"
    if "api_key" in table:
        raise ConfigError(
            f"{where} has an api_key; keys never go in the agents file. Put the key in an "
            "environment variable and name it with api_key_env",
            key=f"agents.{name}.api_key",
        )
    options = {key: value for key, value in table.items() if key != "kind"}
    try:
        config = OpenAIAgentConfig.model_validate(options)
    except ValidationError as problem:
        first = problem.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(
            f"{where} (kind 'openai') is invalid: "
            + describe_validation_error(problem, "agent").removeprefix("invalid agent: "),
            key=f"agents.{name}.{field}",
        ) from None
    try:
        agent = OpenAIAgent(config, name=name)
    except ConfigError as problem:
        raise ConfigError(f"{where}: {problem}", key=problem.key) from None
    return agent.definition(name)
