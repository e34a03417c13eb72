"""Every request a pydantic-ai agent makes goes through fleet, and its failures map to kinds.

Compactions, token counts and fallback chains are held, admitted and priced like any
request; each call is a span and a counted metric. The models are pydantic-ai's in-process ``FunctionModel`` (a model any provider could be
in its place: fleet sees only pydantic-ai's ``Model`` interface), the OpenAI agent's
server a real one on loopback (``tests/fake_openai.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.capabilities import BatchModelRequests, ModelFallback, NativeCompaction
from pydantic_ai.exceptions import (
    ModelAuthenticationError,
    ModelHTTPError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from pydantic_ai.messages import (
    CompactionPart,
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
)
from pydantic_ai.models import ModelRequestContext, ModelRequestParameters
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.profiles import ModelProfile
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage

from fleet import AgentStepSpec, LocalExecutor, WorkflowBudget, load_agents, metrics
from fleet.agents import OpenAIAgent, OpenAIAgentConfig
from fleet.agents.pydantic_ai import PydanticAIAgent
from fleet.pricing import ModelPrice
from tests.fake_openai import FakeOpenAI, error

REPO = Path(__file__).resolve().parent.parent


def _spec(task_id: str, agent: str = "pa", **fields: Any) -> AgentStepSpec:
    fields.setdefault("prompt", "go")
    return AgentStepSpec(task_id=task_id, agent=agent, description="d", **fields)


def _usage(input_tokens: int, output_tokens: int) -> RequestUsage:
    return RequestUsage(input_tokens=input_tokens, output_tokens=output_tokens)


def _cap(settings: ModelSettings | None) -> Any:
    return (settings or {}).get("max_tokens")


# -- compaction -----------------------------------------------------------------------


class CompactingModel(FunctionModel):
    """A FunctionModel that compacts on demand, as Anthropic's and OpenAI's Responses do."""

    def __init__(self, function: Any, compacted: list[Any]) -> None:
        profile = ModelProfile(supports_compaction_on_demand=True)
        super().__init__(function, model_name="compacting", profile=profile)
        self.compacted = compacted

    async def compact_messages(
        self, request_context: ModelRequestContext, *, instructions: str | None = None
    ) -> ModelResponse:
        self.compacted.append(_cap(request_context.model_settings))
        return ModelResponse(
            parts=[CompactionPart(content="summary")],
            usage=_usage(50, 7),
            model_name="compacting",
        )


def compact_now(ctx: RunContext[None]) -> str:
    """Ask for the history to be compacted before the next request."""
    ctx.request_compaction()
    return "asked"


def _compacting_agent(first_usage: RequestUsage, compacted: list[Any]) -> PydanticAIAgent:
    """A run of a tool round whose tool asks for a compaction before the second request."""

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("compact_now", {})], usage=first_usage)
        return ModelResponse(parts=[TextPart("done")], usage=_usage(30, 5))

    model = CompactingModel(answer, compacted)
    agent = Agent(model, tools=[compact_now], capabilities=[NativeCompaction()])
    return PydanticAIAgent(agent, name="pa", unknown_price="allow")


async def test_a_compaction_is_held_capped_and_charged_like_a_request() -> None:
    """NativeCompaction's compact_messages: capped to the hold, its usage in the budget exactly."""
    compacted: list[Any] = []
    budget = WorkflowBudget(1_000)
    host = LocalExecutor(agents={"pa": _compacting_agent(_usage(40, 9), compacted)}, budget=budget)
    outcome = await host.execute_step(_spec("c", max_tokens=400))
    snapshot = await budget.snapshot()

    assert outcome.success and outcome.output == "done", outcome.output
    assert len(compacted) == 1
    assert compacted[0] is not None and 0 < compacted[0] < 400
    assert outcome.usage.total_tokens == 49 + 57 + 35
    assert snapshot.consumed_tokens == 49 + 57 + 35 and snapshot.reserved_tokens == 0


async def test_a_compaction_the_hold_cannot_cover_is_refused_before_it_is_sent() -> None:
    """The first request spends the hold: the compaction is refused budget_exhausted, never sent."""
    compacted: list[Any] = []
    budget = WorkflowBudget(1_000)
    host = LocalExecutor(
        agents={"pa": _compacting_agent(_usage(300, 100), compacted)}, budget=budget
    )
    outcome = await host.execute_step(_spec("c", max_tokens=400))
    snapshot = await budget.snapshot()

    assert outcome.error == "budget_exhausted", outcome.output
    assert compacted == []
    assert snapshot.consumed_tokens == 400 and snapshot.reserved_tokens == 0


# -- count_tokens ---------------------------------------------------------------------


class CountingModel(FunctionModel):
    """A FunctionModel that counts tokens at its 'provider', as Anthropic's and Google's do."""

    counted = 0

    async def count_tokens(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> RequestUsage:
        CountingModel.counted += 1
        return _usage(12, 0)


async def count_first(ctx: RunContext[None]) -> int:
    """Count the conversation's tokens with the run's model."""
    counted = await ctx.model.count_tokens(ctx.messages, None, ModelRequestParameters())
    return counted.input_tokens


def _count_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if len(messages) == 1:
        return ModelResponse(parts=[ToolCallPart("count_first", {})], usage=_usage(10, 2))
    return ModelResponse(parts=[TextPart("done")], usage=_usage(20, 2))


def counting() -> Agent[None, str]:
    """An agent whose tool counts tokens between its two requests (an agents-file target)."""
    return Agent(CountingModel(_count_then_answer, model_name="m"), tools=[count_first])


def __getattr__(name: str) -> Any:
    if name == "counting_agent":
        return counting()
    raise AttributeError(name)


async def test_a_token_count_is_admitted_by_the_agents_provider_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2 requests in 3 s: request, count, request — the third waits for the window."""
    path = tmp_path / "agents.toml"
    path.write_text(
        'unknown_price = "allow"\n[limits.provider]\nrequests = 2\nwindow_s = 3.0\n\n'
        '[agents.pa]\nkind = "pydantic_ai"\n'
        'target = "tests.test_pydantic_ai_requests:counting_agent"\nlimit = "provider"\n'
    )
    CountingModel.counted = 0
    caplog.set_level(logging.INFO, logger="fleet.limits")
    outcome = await LocalExecutor(agents=load_agents(path)).execute_step(_spec("n", timeout_s=20))

    assert outcome.success and outcome.output == "done", outcome.output
    assert CountingModel.counted == 1
    waited = [r.getMessage() for r in caplog.records if "after waiting" in r.getMessage()]
    assert len(waited) == 1 and "limit 'provider'" in waited[0], waited


# -- batches --------------------------------------------------------------------------


async def test_a_batch_request_is_refused_before_it_is_queued() -> None:
    """BatchModelRequests bills up to a day later: refused with a message saying what to do."""
    seen: list[Any] = []
    agent = Agent(_answering("batched", seen), capabilities=[BatchModelRequests()])
    budget = WorkflowBudget(1_000)
    host = LocalExecutor(agents={"pa": PydanticAIAgent(agent, name="pa")}, budget=budget)
    outcome = await asyncio.wait_for(host.execute_step(_spec("b", max_tokens=100)), 20)
    snapshot = await budget.snapshot()

    assert outcome.error == "agent", outcome.output
    assert "without BatchModelRequests" in outcome.output
    assert seen == []
    assert snapshot.consumed_tokens == 0 and snapshot.reserved_tokens == 0


# -- fallback chains ------------------------------------------------------------------


def _failing(name: str, failure: Exception, seen: list[Any]) -> FunctionModel:
    def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append((name, _cap(info.model_settings)))
        raise failure

    return FunctionModel(fail, model_name=name)


def _answering(name: str, seen: list[Any]) -> FunctionModel:
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append((name, _cap(info.model_settings)))
        return ModelResponse(parts=[TextPart("from b")], usage=_usage(100, 20), model_name=name)

    return FunctionModel(answer, model_name=name)


def _price(model: str, per_mtok: str) -> ModelPrice:
    return ModelPrice(
        model=model,
        source="prices",
        input_per_mtok=Decimal(per_mtok),
        output_per_mtok=Decimal(per_mtok),
    )


def _unavailable(name: str) -> ModelHTTPError:
    return ModelHTTPError.for_category(
        ModelUnavailableError, status_code=503, model_name=name, body="overloaded"
    )


def _chain(how: str, first: FunctionModel, second: FunctionModel) -> Agent[None, str]:
    """An agent falling back from ``first`` to ``second``: a FallbackModel, or the capability."""
    if how == "FallbackModel":
        return Agent(FallbackModel(first, second))
    return Agent(first, capabilities=[ModelFallback(second)])


CHAINS = ["FallbackModel", "ModelFallback"]


@pytest.mark.parametrize("how", CHAINS)
async def test_a_fallback_chain_is_held_and_priced_per_model_under_a_dollar_budget(
    how: str,
) -> None:
    """a fails 503, b answers: each request capped by its own price, the cost is b's exactly."""
    seen: list[Any] = []
    agent = _chain(how, _failing("fb-a", _unavailable("fb-a"), seen), _answering("fb-b", seen))
    prices = {"fb-a": _price("fb-a", "1000"), "fb-b": _price("fb-b", "100")}
    budget = WorkflowBudget(limit_usd="0.10")
    host = LocalExecutor(
        agents={"pa": PydanticAIAgent(agent, name="pa", prices=prices)}, budget=budget
    )
    outcome = await host.execute_step(_spec("f", max_tokens=100_000))
    snapshot = await budget.snapshot()

    assert outcome.success and outcome.output == "from b", outcome.output
    assert [name for name, _ in seen] == ["fb-a", "fb-b"]
    (_, cap_a), (_, cap_b) = seen
    assert 0 < cap_a < 100 < cap_b < 1_000, seen
    assert outcome.cost_usd == Decimal("0.012")
    assert snapshot.consumed_usd == Decimal("0.012") and snapshot.reserved_usd == 0
    assert outcome.usage.total_tokens == 120


async def test_a_streamed_fallback_chain_is_held_per_model() -> None:
    """stream = true: a's stream fails before its first event, b's streams; each held as itself."""
    seen: list[Any] = []

    async def fail(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        seen.append(("fb-a", _cap(info.model_settings)))
        raise _unavailable("fb-a")
        yield ""  # a stream function is a generator

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        seen.append(("fb-b", _cap(info.model_settings)))
        yield "from "
        yield "b"

    chain = FallbackModel(
        FunctionModel(stream_function=fail, model_name="fb-a"),
        FunctionModel(stream_function=stream, model_name="fb-b"),
    )
    prices = {"fb-a": _price("fb-a", "1000"), "fb-b": _price("fb-b", "100")}
    agent = PydanticAIAgent(Agent(chain), name="pa", prices=prices, stream=True)
    budget = WorkflowBudget(limit_usd="0.10")
    host = LocalExecutor(agents={"pa": agent}, budget=budget)
    outcome = await host.execute_step(_spec("s", max_tokens=100_000))
    snapshot = await budget.snapshot()

    assert outcome.success and outcome.output == "from b", outcome.output
    (_, cap_a), (_, cap_b) = seen
    assert 0 < cap_a < 100 < cap_b < 1_000, seen
    assert outcome.cost_usd is not None and outcome.cost_usd > 0
    assert snapshot.consumed_usd == outcome.cost_usd and snapshot.reserved_usd == 0


@pytest.mark.parametrize(
    ("failures", "kind"),
    [
        ([_unavailable("fb-a"), _unavailable("fb-b")], "unavailable"),
        (
            [
                _unavailable("fb-a"),
                ModelHTTPError.for_category(
                    ModelAuthenticationError, status_code=401, model_name="fb-b", body="sk-x"
                ),
            ],
            "auth",
        ),
        ([ModelTimeoutError("fb-a", "read timed out"), _unavailable("fb-b")], "timeout"),
        ([_unavailable("fb-a"), ModelHTTPError(400, "fb-b", "bad request")], "provider"),
    ],
)
@pytest.mark.parametrize("how", CHAINS)
async def test_a_fallback_chain_that_fails_everywhere_fails_with_its_most_telling_kind(
    how: str, failures: list[Exception], kind: str
) -> None:
    """FallbackExceptionGroup: not a crash, but the kind that tells most, naming every model."""
    seen: list[Any] = []
    first, second = (_failing(f"fb-{n}", f, seen) for n, f in zip("ab", failures, strict=True))
    agent = PydanticAIAgent(_chain(how, first, second), name="pa", unknown_price="allow")
    outcome = await LocalExecutor(agents={"pa": agent}).execute_step(_spec("g"))

    assert outcome.error == kind, outcome.output
    assert "every model failed" in outcome.output
    assert "fb-a: " in outcome.output and "fb-b: " in outcome.output
    assert "sk-x" not in outcome.output
    assert len(seen) == 2


@pytest.mark.parametrize("how", CHAINS)
async def test_a_fallback_chain_the_budget_refuses_ends_budget_exhausted_without_a_request(
    how: str,
) -> None:
    """A refused hold is not a model failure: the chain does not fall back past it."""
    seen: list[Any] = []
    chain = _chain(how, _answering("fb-a", seen), _answering("fb-b", seen))
    agent = PydanticAIAgent(chain, name="pa", unknown_price="allow")
    host = LocalExecutor(agents={"pa": agent}, budget=WorkflowBudget(10))
    outcome = await host.execute_step(_spec("h", max_tokens=10, prompt="go " * 100))

    assert outcome.error == "budget_exhausted", outcome.output
    assert seen == []


# -- error kinds ----------------------------------------------------------------------


def _refusing(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A refusal whose text happens to say 'output'."""
    return ModelResponse(
        parts=[],
        finish_reason="content_filter",
        provider_details={"refusal": "I will not output that"},
        usage=_usage(5, 0),
    )


def _transport_timeout(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelTimeoutError("slow", "Request timed out.", phase="read")


async def _late(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    await asyncio.sleep(10)
    return ModelResponse(parts=[TextPart("late")])


@pytest.mark.parametrize(
    ("function", "settings", "kind", "says"),
    [
        (_refusing, None, "provider", "ContentFilterError"),
        (_transport_timeout, None, "timeout", "ModelTimeoutError"),
        (_late, ModelSettings(request_timeout=0.2), "timeout", "ModelRequestTimeout"),
    ],
)
async def test_pydantic_ais_own_failures_map_to_their_kind(
    function: Any, settings: ModelSettings | None, kind: str, says: str
) -> None:
    """A refusal is no schema failure; pydantic-ai's transport and request timeouts are timeout."""
    model = FunctionModel(function, model_name="slow", settings=settings)
    agent = PydanticAIAgent(Agent(model), name="pa", unknown_price="allow")
    outcome = await LocalExecutor(agents={"pa": agent}).execute_step(_spec("e", timeout_s=5))

    assert outcome.error == kind, outcome.output
    assert says in outcome.output


# -- metrics and spans ----------------------------------------------------------------


def _calls(agent: str, model: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "fleet_model_calls_total", {"agent": agent, "model": model, "outcome": outcome}
    )
    return value or 0.0


def _broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(400, "broken-fn", "bad request")


@pytest.mark.parametrize("kind", ["pydantic_ai", "openai"])
async def test_a_failed_model_call_is_counted_with_its_outcome(kind: str) -> None:
    """Both model agents count a call the provider refused as outcome="failed"."""
    metrics.enable()
    name = f"failing-{kind}"
    with FakeOpenAI() as server:
        server.script(error(400, "bad request"))
        if kind == "openai":
            config = OpenAIAgentConfig(base_url=server.base_url, model="broken-fn", backoff_s=0.01)
            definition = OpenAIAgent(config, name=name).definition(name)
        else:
            model = FunctionModel(_broken, model_name="broken-fn")
            definition = PydanticAIAgent(Agent(model), name=name).definition(name)
        before = _calls(name, "broken-fn", "failed")
        outcome = await LocalExecutor(agents={name: definition}).execute_step(_spec("x", name))

    assert outcome.error == "provider", outcome.output
    assert _calls(name, "broken-fn", "failed") == before + 1
    assert _calls(name, "broken-fn", "ok") == 0


_SPANS_PROGRAM = r"""
import asyncio, json

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.usage import RequestUsage

from fleet import AgentStepSpec, LocalExecutor, Workflow, metrics
from fleet.agents.pydantic_ai import PydanticAIAgent

SECRET = "PROMPT-TEXT-7f3a"


def add(a: int, b: int) -> int:
    return a + b


def answer(messages, info):
    if len(messages) == 1:
        call = ToolCallPart("add", {"a": 2, "b": 3}, tool_call_id="c1")
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=11, output_tokens=4),
                             finish_reason="tool_call")
    return ModelResponse(parts=[TextPart("five " + SECRET)],
                         usage=RequestUsage(input_tokens=20, output_tokens=6), finish_reason="stop")


async def main():
    registry = metrics.enable()
    agent = PydanticAIAgent(Agent(FunctionModel(answer, model_name="local-fn"), tools=[add]))
    executor = LocalExecutor(agents={"pa": agent.definition("pa")})
    spec = AgentStepSpec(task_id="t1", agent="pa", description="", prompt=SECRET)
    async with Workflow.builder(executor).with_root_id("pa").build() as workflow:
        (outcome,) = await workflow.phase("ask", [spec])
    assert outcome.success, outcome
    spans = [
        {
            "name": s.name,
            "id": s.context.span_id,
            "parent": s.parent.span_id if s.parent else None,
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ]
    calls = {
        outcome: registry.get_sample_value(
            "fleet_model_calls_total", {"agent": "pa", "model": "local-fn", "outcome": outcome}
        )
        for outcome in ("ok", "failed", "cancelled")
    }
    print(json.dumps({"spans": spans, "calls": calls, "usage": outcome.usage.model_dump()}))

asyncio.run(main())
"""


def test_each_request_is_a_chat_span_and_a_counted_call() -> None:
    """A tool round: two `chat local-fn` spans under the step's, their usage, two calls counted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLEET_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", _SPANS_PROGRAM],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    step = next(s for s in seen["spans"] if s["name"] == "invoke_agent pa")
    chats = [s for s in seen["spans"] if s["name"] == "chat local-fn"]
    assert [c["parent"] for c in chats] == [step["id"], step["id"]]
    assert [c["attributes"]["gen_ai.usage.input_tokens"] for c in chats] == [11, 20]
    assert [c["attributes"]["gen_ai.usage.output_tokens"] for c in chats] == [4, 6]
    assert [c["attributes"]["gen_ai.response.finish_reasons"] for c in chats] == [
        ["tool_call"],
        ["stop"],
    ]
    assert chats[0]["attributes"]["gen_ai.request.model"] == "local-fn"
    assert chats[0]["attributes"]["gen_ai.operation.name"] == "chat"
    assert step["attributes"]["gen_ai.usage.input_tokens"] == seen["usage"]["prompt_tokens"] == 31
    assert seen["calls"] == {"ok": 2.0, "failed": None, "cancelled": None}
    for span in seen["spans"]:
        assert "PROMPT-TEXT-7f3a" not in json.dumps(span["attributes"]), span
