"""The agent's model as one step sees it: every request held, admitted, traced and settled.

:class:`StepModel` is a pydantic-ai ``WrapperModel`` around the agent's own model (any
model pydantic-ai supports). Each request it forwards, plain, streamed or a compaction
(``compact_messages``, which pydantic-ai's compaction capabilities send), runs inside
:func:`fleet.agents.calls.model_call` (the step's token hold checked and ``max_tokens``
capped to it and to the dollars left, a ``chat`` span, the real usage charged and the
cost settled, a count in the metrics), is admitted by the agent's provider limit first,
and is a task of the step's own, so a cancel closes its connection. A token count
(``count_tokens``) bills nothing and is only admitted by the limit. A batch request
(pydantic-ai's ``BatchModelRequests``) cannot be held and is refused.

:func:`step_model` wraps a ``FallbackModel``'s models one by one instead of the chain:
each attempt is then held, priced and admitted as the model that makes it. A model the
run moves a request to (pydantic-ai's ``ModelFallback`` and ``SelectModel``
capabilities) is wrapped the same way by :class:`StepRequests`, before the request is
prepared, so its compactions, counts and requests are held too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
from pydantic_ai.exceptions import ModelRateLimitError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestContext, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage
from pydantic_core import to_json

from ...errors import AgentError
from ...pricing import ModelPrice, UnknownPrice
from ...spec import TokenUsage
from ..base import AgentContext, estimate_tokens
from ..calls import ModelCall, model_call

if TYPE_CHECKING:
    from pydantic_ai.models.batch import BatchRequest, EncodedBatchRequest

__all__ = ["StepCalls", "StepModel", "StepRequests", "leaf_models", "step_model"]

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
            tokens = call.prompt_estimate + (call.max_tokens or 0)
            async with self.admitted(tokens, settings, lambda: _total(call.charged)):
                yield settings, call

    @contextlib.asynccontextmanager
    async def admitted(
        self, tokens: int, settings: ModelSettings | None, used: Callable[[], int | None]
    ) -> AsyncIterator[None]:
        """Admit one request of ``tokens`` under the agent's provider limit for the block.

        The window then counts ``used()`` instead of the estimate. A 429 spent nothing
        at the provider and pauses the limit fleet-wide for as long as the provider asked.
        """
        timeout = (settings or {}).get("timeout")
        lease_s = float(timeout) if isinstance(timeout, int | float) else LEASE_S
        admission = await self.ctx.admit_call(tokens, lease_s=lease_s)
        spent: int | None = None
        try:
            yield
            spent = used()
        except ModelRateLimitError as refused:
            spent = 0
            if refused.retry_after:
                await self.ctx.pause_limit(refused.retry_after)
            raise
        finally:
            await asyncio.shield(admission.settle(spent))

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

    async def compact_messages(
        self, request_context: ModelRequestContext, *, instructions: str | None = None
    ) -> ModelResponse:
        """A compaction request (pydantic-ai's compaction capabilities), held like any other.

        It is billed as a request of the conversation it compacts, so it holds, caps
        ``max_tokens``, is admitted, traced, counted and settled as :meth:`request` is.
        """
        calls = self.calls
        context = request_context
        async with calls.held(
            self.wrapped, context.messages, context.model_settings, context.model_request_parameters
        ) as (settings, call):
            capped = dataclasses.replace(context, model_settings=settings)
            response = await self.wrapped.compact_messages(capped, instructions=instructions)
            calls.charge(call, response.usage, response)
        return response

    async def count_tokens(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> RequestUsage:
        """Count a request's tokens at the provider, admitted by the agent's provider limit.

        Providers do not bill a count (Anthropic's, Google's, Bedrock's and OpenAI's
        Responses API's are free), so it holds nothing against the budget and is no
        ``chat`` call; it is a request to the provider all the same, so it takes a
        request's place under the agent's limit, with no tokens. A model that cannot
        count raises its own ``NotImplementedError`` without taking that place.
        """
        wrapped = self.wrapped
        if type(wrapped).count_tokens is Model.count_tokens:
            return await wrapped.count_tokens(messages, model_settings, model_request_parameters)
        async with self.calls.admitted(0, model_settings, lambda: 0):
            return await wrapped.count_tokens(messages, model_settings, model_request_parameters)

    async def batch_encode(self, request: BatchRequest) -> EncodedBatchRequest:
        """Refused: a batch request is billed when the provider runs it, up to a day later.

        No hold could span that, nor a cancel close it, so fleet refuses it before it is
        queued rather than let it spend outside the step's budget.

        Raises:
            AgentError: always, naming pydantic-ai's ``BatchModelRequests``.
        """
        raise AgentError(
            f"agent {self.calls.agent!r}: pydantic-ai's batch API (BatchModelRequests) sends "
            "requests fleet cannot hold against the step's budget, limit or cancel; run the "
            "agent without BatchModelRequests under fleet"
        )


def step_model(model: Model, calls: StepCalls) -> Model:
    """``model`` as one step runs it: every request it makes held by ``calls``.

    A ``FallbackModel`` is not held as one model (it has no price of its own, and one
    hold could not tell which model answered): each of its models is wrapped instead,
    in a chain that falls back on the same conditions, so every attempt is held,
    priced, admitted, traced and settled as the model that makes it.
    """
    if isinstance(model, FallbackModel):
        chain = FallbackModel(*(step_model(inner, calls) for inner in model.models))
        chain._predicates = model._predicates  # its fallback_on, as pydantic-ai parsed it
        return chain
    return StepModel(model, calls)


@dataclass(init=False)
class StepRequests(AbstractCapability[Any]):
    """A run capability: whatever model an attempt goes to, it goes through the step.

    The run's own model is already a step model; a capability can move an attempt to
    another (``ModelFallback``'s next candidate, ``SelectModel``'s choice). This one
    runs last of the hooks that prepare an attempt and wraps such a model with
    :func:`step_model`, so its request, and a compaction or count made for it, is held.

    Args:
        calls: the step's request holder.
        run_model: the model the run was given (already held).
    """

    def __init__(self, calls: StepCalls, run_model: Model) -> None:
        super().__init__()
        self.calls = calls
        self._held: dict[int, Model] = {id(run_model): run_model}
        self._ours = {id(run_model)}

    def get_ordering(self) -> CapabilityOrdering:
        """Innermost: after every hook that picks the model an attempt goes to."""
        return CapabilityOrdering(position="innermost")

    async def prepare_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """The attempt's model, wrapped by :func:`step_model` unless it already is."""
        model = request_context.model
        if self._is_held(model):
            return request_context
        held = self._held.get(id(model))
        if held is None:
            held = self._held[id(model)] = step_model(model, self.calls)
            self._ours.add(id(held))
        request_context.model = held
        return request_context

    def _is_held(self, model: Model) -> bool:
        """Whether ``model`` is a step model of this run's, or wraps one (instrumentation)."""
        while id(model) not in self._ours:
            if not isinstance(model, WrapperModel):
                return False
            model = model.wrapped
        return True


def leaf_models(model: Model) -> list[Model]:
    """The models that send ``model``'s requests: a ``FallbackModel``'s own, else itself."""
    if isinstance(model, FallbackModel):
        return [leaf for inner in model.models for leaf in leaf_models(inner)]
    return [model]


def _total(usage: TokenUsage | None) -> int | None:
    return usage.total_tokens if usage is not None else None


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
