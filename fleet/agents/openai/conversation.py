"""One step's conversation: the prompt, tool rounds, the structured answer, and every call.

Each model call goes through :meth:`Conversation.complete`, in three parts that other
concerns hook into:

1. :meth:`Conversation.before_call` — *before each model call*: the step's token hold
   is checked and the call's ``max_tokens`` capped (refused → ``budget_exhausted``);
2. the request itself (:meth:`Conversation.send`, retries inside);
3. :meth:`Conversation.after_call` — *after each model call, usage known*: the usage the
   server reported (or an estimate) is charged to the step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from ... import metrics, telemetry
from ...errors import AgentError
from ...spec import AgentStepSpec, TokenUsage
from ..base import AgentContext, AgentResult, estimate_tokens
from .tools import run_tool_call
from .transport import Refused, Sender
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


@dataclass
class Call:
    """One model call about to be made."""

    body: dict[str, Any]
    """The request body (``max_tokens`` already capped to the step's hold)."""
    prompt_estimate: int
    """Tokens the prompt is expected to take."""


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
        self.use_format = self.config.json_schema_format and spec.output_schema is not None

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
        """``(json_text, value, problem)`` for one answer."""
        assert self.spec.output_schema is not None
        try:
            value, stripped = parse_json(text)
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

    async def complete(self, messages: list[dict[str, Any]], *, tools: bool) -> Reply:
        """One model call: :meth:`before_call`, :meth:`send`, :meth:`after_call`.

        With tracing on, the call is a ``chat {model}`` span (GenAI conventions, no text).
        """
        call = self.before_call(messages, tools=tools)
        if telemetry.active() is None:
            reply = self.after_call(call, ChatCompletion.parse(await self.send(call)))
        else:
            with telemetry.span(f"chat {self.config.model}", self._call_attributes()) as span:
                before = self.ctx.used
                reply = self.after_call(call, ChatCompletion.parse(await self.send(call)))
                used = self.ctx.used
                span.set_attribute(
                    "gen_ai.usage.input_tokens", used.prompt_tokens - before.prompt_tokens
                )
                span.set_attribute(
                    "gen_ai.usage.output_tokens", used.completion_tokens - before.completion_tokens
                )
                if reply.finish_reason is not None:
                    span.set_attribute("gen_ai.response.finish_reasons", [str(reply.finish_reason)])
        self.ctx.model = self.config.model
        metrics.model_call(self.spec.agent, self.config.model)
        return reply

    def _call_attributes(self) -> dict[str, Any]:
        config = self.config
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": config.model,
            "fleet.step.task_id": self.spec.task_id,
            "fleet.step.agent": self.spec.agent,
        }
        if config.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = config.max_tokens
        if config.temperature is not None:
            attributes["gen_ai.request.temperature"] = config.temperature
        return attributes

    def before_call(self, messages: list[dict[str, Any]], *, tools: bool) -> Call:
        """Before each model call: check the step's hold and build the capped request.

        Raises:
            BudgetExhaustedError: the hold cannot cover the prompt.
        """
        estimate = self.agent.prompt_estimate(messages, tools=tools)
        cap = self.ctx.check_tokens(self.config.max_tokens, prompt_estimate=estimate)
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
        return Call(body=body, prompt_estimate=estimate)

    async def send(self, call: Call) -> Any:
        """Send the call (retries inside); a rejected ``response_format`` is dropped."""
        body = call.body
        tokens = call.prompt_estimate + body.get("max_tokens", self.config.max_tokens)
        try:
            return await self.sender.post(body, call_tokens=tokens)
        except Refused as refused:
            if refused.status != 400 or "response_format" not in body:
                raise
            logger.info(
                "%s: server rejected response_format; asking in the prompt only", self.label
            )
            self.use_format = False
            del body["response_format"]
            return await self.sender.post(body, call_tokens=tokens)

    def after_call(self, call: Call, completion: ChatCompletion) -> Reply:
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
        self.ctx.charge(charged)
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
