"""One step's conversation: the prompt, tool rounds, the structured answer, and every call.

Each model call goes through :meth:`Conversation.complete`, in three parts that other
concerns hook into:

1. :meth:`Conversation.before_call` — *before each model call*: the prompt's estimate;
   :func:`fleet.agents.calls.model_call` then checks the step's token hold, caps the
   call's ``max_tokens`` (refused → ``budget_exhausted``), holds its worst case in
   dollars (an unpriced model fails ``no_price`` before the request) and traces it;
2. the request itself (:meth:`Conversation.send`, retries inside);
3. :meth:`Conversation.after_call` — *after each model call, usage known*: the usage the
   server reported (or an estimate) is charged to the step, and its real cost settled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AgentError
from ...spec import AgentStepSpec, TokenUsage
from ...step import validate_output
from ..base import AgentContext, AgentResult, estimate_tokens
from ..calls import ModelCall, model_call
from .capabilities import Learned
from .failures import Refused
from .sender import Sender
from .tools import run_tool_call
from .wire import ChatCompletion, Message, ToolCall, parse_json

if TYPE_CHECKING:
    from .agent import OpenAIAgent

__all__ = ["CONTRACT", "Call", "Conversation", "Reply"]

logger = logging.getLogger("fleet.agents.openai")

CONTRACT = (
    "FINAL OUTPUT CONTRACT: your final answer must be exactly one JSON value that matches "
    "the JSON Schema below, with no other text before or after it.\n{schema}"
)
_REPAIR = (
    "Your previous answer does not satisfy the output contract: {problem}. Reply with only "
    "the corrected JSON value matching the JSON Schema, and nothing else."
)


MAX_FALLBACKS = 6
"""Request features one call may fall back on before the refusal is final."""


@dataclass
class Call:
    """One model call about to be made (the request body is rendered from it per try)."""

    messages: list[dict[str, Any]]
    """The conversation so far."""
    tools: bool
    """Whether the tools are offered."""
    max_tokens: int | None
    """The completion-token cap (already capped to the step's hold; ``None``: no cap)."""
    prompt_estimate: int
    """Tokens the prompt is expected to take."""
    output_schema: dict[str, Any] | None
    """The schema to ask for through ``response_format``, if any."""


@dataclass(frozen=True)
class Reply:
    """The assistant's answer to one call."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: Any


class Conversation:
    """One step's exchange with the server.

    Args:
        agent: the agent running the step.
        spec: the step.
        ctx: the step's context (token hold, deadline).
        sender: the step's way to the server.
    """

    def __init__(
        self, agent: OpenAIAgent, spec: AgentStepSpec, ctx: AgentContext, sender: Sender
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.spec = spec
        self.ctx = ctx
        self.sender = sender
        self.label = sender.label

    async def run(self) -> AgentResult:
        """The whole step: calls and tool rounds until a final answer."""
        messages = self.agent.first_messages(self.spec)
        rounds_allowed = (
            self.spec.max_steps if self.spec.max_steps is not None else self.config.max_tool_rounds
        )
        offer_tools = rounds_allowed > 0 and bool(self.agent.tools)
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
                {
                    "role": "assistant",
                    "content": answer.content or None,
                    "tool_calls": [call.to_message() for call in calls],
                }
            )
            for call in calls:
                messages.append(await run_tool_call(self.agent.tools, call, label=self.label))
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
        """``(json_text, value, problem)`` for one answer (a Markdown fence tolerated)."""
        assert self.spec.output_schema is not None
        try:
            parsed, stripped = parse_json(text)
        except ValueError as problem:
            return text, None, f"output is not JSON ({problem})"
        value, problem_text = validate_output(self.spec.output_schema, stripped, parsed)
        return stripped, value, problem_text

    # -- one call ----------------------------------------------------------------------

    async def complete(self, messages: list[dict[str, Any]], *, tools: bool) -> Reply:
        """One model call, held against the step by :func:`fleet.agents.calls.model_call`.

        :meth:`before_call` (the prompt estimate), the hold (tokens and dollars capped,
        a ``chat {model}`` span), :meth:`send`, then :meth:`after_call` charges the usage.
        """
        estimate = self.before_call(messages, tools=tools)
        config = self.config
        async with model_call(
            self.ctx,
            agent=self.agent.name,
            model=config.model,
            system="openai",
            price=self.agent.price,
            unknown_price=self.agent.unknown_price,
            wanted=config.max_tokens,
            prompt_estimate=estimate,
            attributes=self._call_attributes(),
        ) as held:
            call = Call(
                messages=messages,
                tools=tools,
                max_tokens=held.max_tokens,
                prompt_estimate=estimate,
                output_schema=self.spec.output_schema,
            )
            data = await self.send(call)
            reply = self.after_call(call, ChatCompletion.parse(data), held)
            held.finished(reply.finish_reason)
        return reply

    def _call_attributes(self) -> dict[str, Any]:
        config = self.config
        attributes: dict[str, Any] = {"gen_ai.request.max_tokens": config.max_tokens}
        if config.temperature is not None:
            attributes["gen_ai.request.temperature"] = config.temperature
        return attributes

    def before_call(self, messages: list[dict[str, Any]], *, tools: bool) -> int:
        """Before each model call: the tokens its prompt is expected to take."""
        return self.agent.prompt_estimate(messages, tools=tools)

    def render(self, call: Call, learned: Learned) -> dict[str, Any]:
        """The request body for ``call``, in the features the server is known to accept."""
        messages = call.messages
        if not learned.null_content:
            messages = [
                {**m, "content": ""} if "content" in m and m["content"] is None else m
                for m in messages
            ]
        body: dict[str, Any] = {"model": self.config.model, "messages": messages}
        if call.max_tokens is not None:
            body[learned.token_field] = call.max_tokens
        if self.config.temperature is not None and "temperature" not in learned.dropped:
            body["temperature"] = self.config.temperature
        if call.tools:
            body["tools"] = self.agent.tool_schemas()
            if "tool_choice" not in learned.dropped:
                # OpenAI's default, but some servers (llama-cpp-python) ignore tools without it.
                body["tool_choice"] = "auto"
        schema = call.output_schema
        if schema is not None and learned.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "step_output", "schema": schema},
            }
        elif schema is not None and learned.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        if self.config.stream and learned.stream:
            body["stream"] = True
            if "stream_options" not in learned.dropped:
                body["stream_options"] = {"include_usage": True}
        return body

    async def send(self, call: Call) -> Any:
        """Send the call (retries inside), falling back on features the server refuses.

        The body is built when the call gets its slot, so a call that waited behind one
        whose refusal taught the agent something is sent the new way at once. Until the
        server has answered one call using an optional feature (structured output,
        streaming), calls using it go one at a time: a wide start would otherwise send
        every one of them in a form the server may refuse.
        """
        capabilities = self.agent.capabilities
        features = self.features(call)
        if not capabilities.unconfirmed(features):
            return await self._send(call)
        probe = capabilities.probe
        await probe.acquire()
        if not capabilities.unconfirmed(features):  # learned while this call waited
            probe.forget()
            return await self._send(call)
        try:
            data = await self._send(call)
            capabilities.confirm(features)
            return data
        finally:
            probe.forget()

    def features(self, call: Call) -> frozenset[str]:
        """The optional request features ``call`` would ask the server for."""
        wanted = set()
        if call.output_schema is not None:
            wanted.add("response_format")
        if self.config.stream:
            wanted.add("stream")
        return frozenset(wanted)

    async def _send(self, call: Call) -> Any:
        capabilities = self.agent.capabilities
        used = capabilities.learned
        cap = call.max_tokens if call.max_tokens is not None else self.config.max_tokens
        tokens = call.prompt_estimate + cap

        def body() -> dict[str, Any]:
            nonlocal used
            used = capabilities.learned
            return self.render(call, used)

        for _ in range(MAX_FALLBACKS):
            try:
                data = await self.sender.post(body, call_tokens=tokens)
            except Refused as refused:
                if refused.rejected is None:
                    raise
                change = capabilities.fall_back(refused.rejected, refused.detail, used)
                if change is None:
                    raise
                if change:
                    logger.warning(
                        "agent %r: the model server at %s rejects %r; using %s from now on",
                        self.agent.name,
                        self.agent.where,
                        refused.rejected,
                        change,
                    )
            else:
                self._check_stream_usage(data, used)
                return data
        return await self.sender.post(body, call_tokens=tokens)

    def _check_stream_usage(self, data: Any, used: Learned) -> None:
        """A streamed answer without usage: stream no more from this server.

        This call is charged an estimate (see :meth:`after_call`); later ones are exact.
        """
        if not (self.config.stream and used.stream):
            return
        if isinstance(data, dict) and isinstance(data.get("usage"), dict):
            return
        change = self.agent.capabilities.fall_back("stream", "", used)
        if change:
            logger.warning(
                "agent %r: the model server at %s streams without usage, so the budget "
                "could only be charged an estimate; using %s from now on",
                self.agent.name,
                self.agent.where,
                change,
            )

    def after_call(self, call: Call, completion: ChatCompletion, held: ModelCall) -> Reply:
        """After each model call: charge its usage to the step and return its message.

        A server that reports no usage is charged an estimate, so the cap stays hard.

        Raises:
            AgentError: ``provider`` when the completion has no message.
        """
        choice = completion.first
        message = choice.message if choice is not None else None
        charged = completion.usage
        if charged is None or charged.total_tokens == 0:
            completion_text = _message_json(message)
            charged = TokenUsage(
                prompt_tokens=call.prompt_estimate,
                completion_tokens=estimate_tokens(completion_text),
            )
            logger.debug("%s: server reported no usage; charged an estimate", self.label)
        held.charge(charged)
        if message is None:
            raise AgentError(
                f"model server at {self.agent.where} sent a completion without a message",
                kind="provider",
            )
        return Reply(
            content=message.text,
            tool_calls=message.tool_calls,
            finish_reason=choice.finish_reason if choice is not None else None,
        )


def _message_json(message: Message | None) -> str:
    if message is None:
        return ""
    return json.dumps(message.model_dump(mode="json"))
