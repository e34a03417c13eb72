"""The agent object: tools, prompts, token reservation, and one step's run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from ...config import mask_url
from ...errors import ConfigError
from ...pricing import ModelPrice, UnknownPrice, price_model
from ...spec import AgentStepSpec
from ..base import AgentContext, AgentDefinition, AgentResult, estimate_tokens
from ..tables import validate_agent_table
from .capabilities import Capabilities
from .config import OpenAIAgentConfig
from .conversation import CONTRACT, Conversation
from .tools import Tool, build_tool
from .transport import Transport, tls_context

__all__ = ["OpenAIAgent", "definition_from_config"]


class OpenAIAgent:
    """An agent backed by an OpenAI-compatible chat-completions server.

    ``OpenAIAgent(OpenAIAgentConfig(base_url=..., model=...))`` is an agent function
    (``await agent(spec, ctx)``). Register it under a name, directly in
    ``LocalExecutor(agents={...})`` or as :meth:`definition`; either way a step without
    ``max_tokens`` reserves this agent's own default (see :meth:`reserve_tokens`).

    Args:
        config: the server, model and behaviour.
        name: the agent's name in log lines.
        prices: the agents file's ``[prices."MODEL"]`` tables; they win over genai-prices.
        unknown_price: the default for an unpriced model when ``config.unknown_price``
            is not set (the agents file's top-level key).

    Raises:
        ConfigError: a tool cannot be imported or its parameters are not a JSON Schema,
            or two tools share a name.
    """

    def __init__(
        self,
        config: OpenAIAgentConfig,
        *,
        name: str = "openai",
        prices: Mapping[str, ModelPrice] | None = None,
        unknown_price: UnknownPrice = "refuse",
    ) -> None:
        self.config = config
        self.name = name
        self.prices = dict(prices or {})
        self.unknown_price: UnknownPrice = config.unknown_price or unknown_price
        self._price: tuple[ModelPrice | None] | None = None
        tools: dict[str, Tool] = {}
        for tool_config in config.tools:
            tool = build_tool(tool_config)
            if tool.name in tools:
                raise ConfigError(
                    f"agent {name!r}: two tools are named {tool.name!r}; set `name` on one",
                    key=tool_config.target,
                )
            tools[tool.name] = tool
        self.tools: Mapping[str, Tool] = tools
        self.where = mask_url(config.base_url)
        self.transport = Transport(config, where=self.where)
        self.capabilities = Capabilities(json_schema_format=config.json_schema_format)
        self.endpoint = self.transport.endpoint

    def __repr__(self) -> str:
        return (
            f"OpenAIAgent(name={self.name!r}, model={self.config.model!r}, "
            f"base_url={self.where!r}, tools={sorted(self.tools)!r})"
        )

    def first_messages(self, spec: AgentStepSpec) -> list[dict[str, Any]]:
        """The conversation a step starts with (system prompt, then the step's prompt)."""
        messages: list[dict[str, Any]] = []
        if self.config.system:
            messages.append({"role": "system", "content": self.config.system})
        prompt = spec.prompt
        if spec.output_schema is not None:
            schema = json.dumps(spec.output_schema, indent=2, sort_keys=True)
            prompt = f"{prompt}\n\n{CONTRACT.format(schema=schema)}"
        messages.append({"role": "user", "content": prompt})
        return messages

    @property
    def price(self) -> ModelPrice | None:
        """The model's price (the agents file's table, else genai-prices); ``None``: unpriced.

        Looked up on first use: genai-prices' bundled data takes a moment to load.
        """
        if self._price is None:
            config = self.config
            self._price = (
                price_model(
                    config.model,
                    prices=self.prices,
                    provider=config.provider,
                    base_url=config.base_url,
                ),
            )
        return self._price[0]

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The ``tools`` array sent to the server."""
        return [tool.schema() for tool in self.tools.values()]

    def prompt_estimate(self, messages: list[dict[str, Any]], *, tools: bool) -> int:
        """Tokens a request with ``messages`` (and the tools, if offered) is expected to take."""
        estimate = estimate_tokens(json.dumps(messages))
        if tools and self.tools:
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

    def prepare(self) -> None:
        """Do now what the first step would: look up the price, build the TLS context.

        A worker calls it at start: genai-prices' bundled data takes real CPU time to
        load, and on the first step it would hold the event loop every step shares.
        """
        _ = self.price
        tls_context()

    async def aclose(self) -> None:
        """Close this event loop's pooled connections (also done when the loop shuts down)."""
        await self.transport.aclose()

    async def __call__(self, spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        """Run one step: the conversation, its tool rounds and its structured output."""
        env = self.config.api_key_env
        key = (os.environ.get(env) or None) if env else None
        sender = self.transport.sender(
            key=key,
            label=f"agent {self.name!r} step {spec.task_id!r}",
            remaining_s=ctx.remaining_s,
            limit=ctx if ctx.limit is not None else None,
            on_text=_delta_sink(ctx) if self.config.stream else None,
            memory=ctx.limiter,
        )
        return await Conversation(self, spec, ctx, sender).run()


def _delta_sink(ctx: AgentContext) -> Callable[[str, bool], None]:
    """Streamed text to the step's deltas; each answer's first piece starts the text over."""

    def on_text(text: str, first: bool) -> None:
        ctx.emit_delta(text, replace=first)

    return on_text


def definition_from_config(
    name: str,
    table: Mapping[str, Any],
    *,
    source: str,
    prices: Mapping[str, ModelPrice] | None = None,
    unknown_price: UnknownPrice = "refuse",
) -> AgentDefinition:
    """Build the agent of one ``[agents.NAME]`` table of kind ``openai``.

    Args:
        name: the agent's name.
        table: the table's keys (``kind`` included).
        source: where the table came from (the file path), for messages.
        prices: the file's ``[prices."MODEL"]`` tables.
        unknown_price: the file's top-level ``unknown_price`` (default ``"refuse"``).

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
    config = validate_agent_table(OpenAIAgentConfig, table, where=where, kind="openai", name=name)
    try:
        agent = OpenAIAgent(config, name=name, prices=prices, unknown_price=unknown_price)
    except ConfigError as problem:
        raise ConfigError(f"{where}: {problem}", key=problem.key) from None
    return agent.definition(name)
