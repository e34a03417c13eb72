"""The agent's model as one step sees it: every request held, admitted, traced and settled.

:class:`StepModel` is a pydantic-ai ``WrapperModel`` around the agent's own model (any
model pydantic-ai supports). Each request it forwards, plain or streamed, runs inside
:func:`fleet.agents.calls.model_call` (the step's token hold checked and ``max_tokens``
capped to it and to the dollars left, a ``chat`` span, the real usage charged and the
cost settled), is admitted by the agent's provider limit first, and is a task of the
step's own, so a cancel closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic_ai.exceptions import ModelRateLimitError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage
from pydantic_core import to_json

from ...pricing import ModelPrice, UnknownPrice
from ...spec import TokenUsage
from ..base import AgentContext, estimate_tokens
from ..calls import ModelCall, model_call

__all__ = ["StepCalls", "StepModel"]

LEASE_S = 600.0
"""A request's in-flight slot under a provider limit lapses after this (pydantic-ai's
default HTTP timeout), unless its settings name a shorter ``timeout``."""


@dataclass
class StepCalls:
    """How one step's model requests are held: its context and the agent's pricing."""

    ctx: AgentContext
    """The step's context (token hold, budget, provider limit, deadline)."""
    agent: str
    """The agent's name, for messages."""
    price: Callable[[Model], ModelPrice | None]
    """The price of a model (looked up once per model name by the agent)."""
    unknown_price: UnknownPrice
    """What to do with an unpriced model where dollars are counted."""
    capped: bool = False
    """Whether fleet lowered the last request's ``max_tokens`` (a run that then ends on
    the token limit ran out of budget, not of the agent's own cap)."""

    @contextlib.asynccontextmanager
    async def held(
        self,
        model: Model,
        messages: list[ModelMessage],
        settings: ModelSettings | None,
        parameters: ModelRequestParameters,
    ) -> AsyncIterator[tuple[ModelSettings | None, ModelCall]]:
        """Hold one request for the block; yields its settings (``max_tokens`` capped)."""
        wanted = _max_tokens(settings)
        if wanted is None:
            wanted = _max_tokens(model.settings)
        estimate = prompt_estimate(messages, parameters)
        async with model_call(
            self.ctx,
            agent=self.agent,
            model=model.model_name,
            system=model.system,
            price=self.price(model),
            unknown_price=self.unknown_price,
            wanted=wanted,
            prompt_estimate=estimate,
        ) as call:
            self.capped = call.capped
            if call.max_tokens is not None and call.max_tokens != wanted:
                settings = ModelSettings(**{**(settings or {}), "max_tokens": call.max_tokens})
            async with self._admitted(call, settings):
                yield settings, call

    @contextlib.asynccontextmanager
    async def _admitted(
        self, call: ModelCall, settings: ModelSettings | None
    ) -> AsyncIterator[None]:
        """Admit the request under the agent's provider limit; count its real usage after.

        A 429 spent nothing at the provider and pauses the limit fleet-wide for as long
        as the provider asked.
        """
        timeout = (settings or {}).get("timeout")
        lease_s = float(timeout) if isinstance(timeout, int | float) else LEASE_S
        tokens = call.prompt_estimate + (call.max_tokens or 0)
        admission = await self.ctx.admit_call(tokens, lease_s=lease_s)
        used: int | None = None
        try:
            yield
            used = call.charged.total_tokens if call.charged is not None else None
        except ModelRateLimitError as refused:
            used = 0
            if refused.retry_after:
                await self.ctx.pause_limit(refused.retry_after)
            raise
        finally:
            await asyncio.shield(admission.settle(used))

    def charge(self, call: ModelCall, usage: RequestUsage, response: ModelResponse) -> None:
        """Charge one response's usage; a model that reports none is charged an estimate."""
        charged = TokenUsage(
            prompt_tokens=usage.input_tokens, completion_tokens=usage.output_tokens
        )
        if charged.total_tokens == 0:
            charged = TokenUsage(
                prompt_tokens=call.prompt_estimate,
                completion_tokens=estimate_tokens(to_json(response.parts).decode()),
            )
        call.charge(charged)
        call.finished(response.finish_reason)


class StepModel(WrapperModel):
    """An agent's model for one step: each request goes through :class:`StepCalls`.

    Args:
        wrapped: the agent's own model.
        calls: the step's request holder.
    """

    def __init__(self, wrapped: Model, calls: StepCalls) -> None:
        super().__init__(wrapped)
        self.calls = calls

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        """One request, held against the step."""
        calls = self.calls
        async with calls.held(self.wrapped, messages, model_settings, model_request_parameters) as (
            settings,
            call,
        ):
            response = await self.wrapped.request(messages, settings, model_request_parameters)
            calls.charge(call, response.usage, response)
        return response

    @contextlib.asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        """One streamed request, held against the step until the stream closes."""
        calls = self.calls
        async with calls.held(self.wrapped, messages, model_settings, model_request_parameters) as (
            settings,
            call,
        ):
            async with self.wrapped.request_stream(
                messages, settings, model_request_parameters, run_context
            ) as stream:
                try:
                    yield stream
                finally:
                    calls.charge(call, stream.usage, stream.get())


def _max_tokens(settings: ModelSettings | None) -> int | None:
    value = (settings or {}).get("max_tokens")
    return value if isinstance(value, int) and value > 0 else None


def prompt_estimate(messages: list[ModelMessage], parameters: ModelRequestParameters) -> int:
    """Tokens a request is expected to take: its messages' text and the tools it offers.

    Only what reaches the model counts (instructions, contents, tool names and arguments),
    not the timestamps and ids pydantic-ai keeps beside them.
    """
    texts: list[str] = []
    for message in messages:
        instructions = getattr(message, "instructions", None)
        if isinstance(instructions, str):
            texts.append(instructions)
        for part in message.parts:
            for name in _SENT:
                value = getattr(part, name, None)
                if value is not None:
                    texts.append(value if isinstance(value, str) else _text(value))
    tools = [*parameters.function_tools, *parameters.output_tools]
    if tools:
        texts.append(to_json(tools).decode())
    return estimate_tokens("\n".join(texts))


_SENT = ("content", "args", "tool_name")


def _text(value: Any) -> str:
    """A part's non-text content (a tool's return value, multimodal parts) as JSON."""
    try:
        return to_json(value, fallback=str).decode()
    except (TypeError, ValueError):
        return str(value)
