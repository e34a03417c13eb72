"""A pydantic-ai ``Agent`` as a fleet agent: one step is one run, the step's prompt its prompt."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import StructuredDict
from pydantic_ai.agent import AbstractAgent, EventStreamHandler
from pydantic_ai.exceptions import AgentRunError, FallbackExceptionGroup
from pydantic_ai.messages import (
    AgentStreamEvent,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
)
from pydantic_ai.models import Model, infer_model
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import UsageLimits
from pydantic_core import to_json, to_jsonable_python

from ...errors import ConfigError
from ...pricing import ModelPrice, UnknownPrice, price_model
from ...spec import AgentStepSpec, TokenUsage
from ..base import AgentContext, AgentDefinition, AgentResult
from ..tables import validate_agent_table
from ..targets import import_target
from .errors import as_agent_error, fallback_error
from .model import StepCalls, StepRequests, leaf_models, step_model

__all__ = ["PydanticAIAgent", "PydanticAIAgentConfig", "definition_from_config"]


class PydanticAIAgentConfig(BaseModel):
    """The ``[agents.NAME]`` table of kind ``pydantic_ai`` (besides ``kind`` and ``limit``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    target: str
    """Dotted path ``"package.module:attribute"`` of a ``pydantic_ai.Agent``."""
    reserve_tokens: int | None = Field(default=None, ge=0)
    """The reservation of a step without ``max_tokens`` (default: the host's); a run of
    several requests needs room for all of them."""
    provider: str | None = None
    """genai-prices' provider id for pricing (default: the one whose API the model's
    ``base_url`` is, else the one whose models match the model name)."""
    unknown_price: Literal["refuse", "allow"] | None = None
    """An unpriced model where dollars are counted: ``"refuse"`` fails the step
    ``no_price`` before any request; ``"allow"`` runs it uncounted. Default: the agents
    file's top-level ``unknown_price``."""
    stream: bool = False
    """Stream each request and publish the text as the step's output deltas
    (``ctx.emit_delta``: ``fleet watch ROOT --output``, ``subscribe(deltas=True)``)."""


class PydanticAIAgent:
    """A pydantic-ai agent run as fleet steps, every model request under fleet's control.

    ``await agent(spec, ctx)`` runs ``spec.prompt`` through the agent with its model
    wrapped in a :class:`~.model.StepModel` (a ``FallbackModel``'s models each in
    one: :func:`~.model.step_model`); the agent keeps its tools, instructions,
    model settings and output type. A step with an ``output_schema`` (an object schema)
    asks for it as the run's output type instead.

    Args:
        agent: the pydantic-ai agent.
        name: the agent's registry name (for messages).
        prices: the agents file's ``[prices."MODEL"]`` tables; they win over genai-prices.
        provider: genai-prices' provider id, when the model's own does not say.
        unknown_price: what to do with an unpriced model where dollars are counted.
        reserve_tokens: the reservation of a step without ``max_tokens``.
        stream: stream each request, publishing its text as the step's output deltas.

    Raises:
        ConfigError: ``agent`` is not a pydantic-ai agent or has no model.
    """

    def __init__(
        self,
        agent: AbstractAgent[Any, Any],
        *,
        name: str = "pydantic_ai",
        prices: Mapping[str, ModelPrice] | None = None,
        provider: str | None = None,
        unknown_price: UnknownPrice = "refuse",
        reserve_tokens: int | None = None,
        stream: bool = False,
    ) -> None:
        if not isinstance(agent, AbstractAgent):
            raise ConfigError(
                f"agent {name!r}: {agent!r} is not a pydantic_ai.Agent", key=f"agents.{name}"
            )
        if agent.model is None:
            raise ConfigError(
                f"agent {name!r}: the pydantic-ai agent has no model; give it one, e.g. "
                "Agent('openai:gpt-4o', ...) or Agent(OpenAIChatModel(...))",
                key=f"agents.{name}",
            )
        self.agent = agent
        self.name = name
        self.prices = dict(prices or {})
        self.provider = provider
        self.unknown_price: UnknownPrice = unknown_price
        self.reserve_tokens = reserve_tokens
        self.stream = stream
        self._model: Model | None = None
        self._priced: dict[str, ModelPrice | None] = {}

    def __repr__(self) -> str:
        return f"PydanticAIAgent(name={self.name!r}, agent={self.agent!r})"

    @property
    def model(self) -> Model:
        """The agent's own model (a model name is resolved once, on first use)."""
        if self._model is None:
            assert self.agent.model is not None
            self._model = infer_model(self.agent.model)
        return self._model

    def price(self, model: Model) -> ModelPrice | None:
        """``model``'s price (the agents file's table, else genai-prices), looked up once."""
        name = model.model_name
        if name not in self._priced:
            self._priced[name] = price_model(
                name, prices=self.prices, provider=self.provider, base_url=model.base_url
            )
        return self._priced[name]

    def prepare(self) -> None:
        """Do now what the first step would: resolve the model and look its price up.

        A worker calls it at start: genai-prices' bundled data takes a moment of CPU to
        load, and on the first step it would hold the event loop every step shares.
        """
        for model in leaf_models(self.model):
            self.price(model)

    def definition(self, name: str | None = None) -> AgentDefinition:
        """This agent as a registry entry."""
        return AgentDefinition(
            name=name or self.name, run=self, reserve_tokens=self.reserve_tokens, kind="pydantic_ai"
        )

    async def __call__(self, spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        """Run one step: the agent's run on the step's prompt, every request held by fleet."""
        calls = StepCalls(ctx, self.name, self.price, self.unknown_price)
        model = step_model(self.model, calls)
        options: dict[str, Any] = {"capabilities": [StepRequests(calls, model)]}
        if spec.max_steps is not None:  # tool rounds, as for the openai agent
            options["usage_limits"] = UsageLimits(request_limit=spec.max_steps + 1)
        schema = spec.output_schema
        if schema is not None and schema.get("type") == "object":
            options["output_type"] = StructuredDict(schema, name="step_output", validate=True)
        if self.stream:
            options["event_stream_handler"] = _deltas(ctx)
        try:
            result = await self.agent.run(spec.prompt, model=model, **options)
        except AgentRunError as error:
            raise as_agent_error(
                error, model=model.model_name, capped=calls.capped, secrets=_keys(self.model)
            ) from None
        except FallbackExceptionGroup as group:
            failure = fallback_error(
                group, model=model.model_name, capped=calls.capped, secrets=_keys(self.model)
            )
            raise failure from None
        run = result.usage
        usage = TokenUsage(prompt_tokens=run.input_tokens, completion_tokens=run.output_tokens)
        if usage.total_tokens < ctx.used.total_tokens:
            usage = ctx.used
        return _result(result.output, usage)


def _deltas(ctx: AgentContext) -> EventStreamHandler[Any]:
    """An event handler that publishes each streamed response's text as the step's deltas.

    Each model response starts the shown text over, so it ends as the last response's.
    """

    async def publish(run: RunContext[Any], events: AsyncIterable[AgentStreamEvent]) -> None:
        fresh = True
        async for event in events:
            text = None
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                text = event.part.content
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                text = event.delta.content_delta
            if text is not None:
                ctx.emit_delta(text, replace=fresh)
                fresh = False

    return publish


def _keys(model: Model) -> list[str]:
    """The API keys the model's clients send, where they have one (to mask them in messages)."""
    keys = []
    for leaf in leaf_models(model):
        key = getattr(getattr(leaf, "client", None), "api_key", None)
        if isinstance(key, str) and len(key) >= 8:
            keys.append(key)
    return keys


def _result(output: Any, usage: TokenUsage) -> AgentResult:
    """The step's result: text as it is; anything else as JSON text and its structure."""
    if isinstance(output, str):
        return AgentResult(output=output, usage=usage)
    if isinstance(output, BaseModel):
        return AgentResult(
            output=output.model_dump_json(), structured=output.model_dump(mode="json"), usage=usage
        )
    structured = to_jsonable_python(output)
    return AgentResult(output=to_json(output).decode(), structured=structured, usage=usage)


def definition_from_config(
    name: str,
    table: Mapping[str, Any],
    *,
    source: str,
    prices: Mapping[str, ModelPrice] | None = None,
    unknown_price: UnknownPrice = "refuse",
) -> AgentDefinition:
    """Build the agent of one ``[agents.NAME]`` table of kind ``pydantic_ai``.

    Raises:
        ConfigError: a key is missing, unknown or of the wrong type, or the target is
            not an importable pydantic-ai agent with a model (the message names the file
            and the key).
    """
    where = f"{source}: [agents.{name}]"
    if "api_key" in table or "api_key_env" in table:
        raise ConfigError(
            f"{where} (kind 'pydantic_ai') takes no API key: keys never go in the agents "
            "file, and the agent's model reads its own (e.g. OPENAI_API_KEY for 'openai:' "
            "models, or the provider you built the model with)",
            key=f"agents.{name}.api_key",
        )
    config = validate_agent_table(
        PydanticAIAgentConfig, table, where=where, kind="pydantic_ai", name=name
    )
    try:
        target = import_target(config.target, what="pydantic-ai agent")
        agent = PydanticAIAgent(
            target,
            name=name,
            prices=prices,
            provider=config.provider,
            unknown_price=config.unknown_price or unknown_price,
            reserve_tokens=config.reserve_tokens,
            stream=config.stream,
        )
    except ConfigError as problem:
        raise ConfigError(f"{where}: {problem}", key=f"agents.{name}.target") from None
    return agent.definition(name)
