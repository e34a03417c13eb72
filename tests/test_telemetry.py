"""Traces (fleet[otel]) and Prometheus metrics, end to end with real workers.

* A two-phase workflow on two real Celery workers exports its spans to an OTLP/HTTP
  receiver this test starts: one trace, every step span the child of its round (a child
  of its phase, a child of the workflow), token attributes equal to the journal's usage,
  and no prompt text in any attribute.
* A worker started with a metrics port serves counters equal to the steps and tokens of
  a known workflow, with no workflow or task id in any label.
* Without OTEL_* variables (or without the extra), ``import fleet``, a workflow and a
  worker import no OpenTelemetry module at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.otlp_receiver import OTLPReceiver
from fleet import AgentStepSpec, LocalExecutor, Workflow, WorkflowBudget, metrics, telemetry
from fleet.agents.echo import echo_usage
from fleet.redis_server import free_port
from fleet.stores.redis import RedisCheckpointStore

from .celery_support import REPO, fleet_settings, running_workers, until

pytestmark = [pytest.mark.redis, pytest.mark.celery]

SECRET = "PROMPT-TEXT-7f3a"


def _specs(phase: str, count: int) -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{phase}-{i}",
            agent="echo",
            description="",
            prompt=f"{SECRET} {phase} {i} " * (i + 1),
        )
        for i in range(count)
    ]


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    running = OTLPReceiver().start()
    try:
        yield running
    finally:
        running.stop()


def _otel_env(receiver: OTLPReceiver, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


async def test_two_phase_workflow_on_two_workers_is_one_trace(
    redis_url: str, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fleet_settings(redis_url)
    for name, value in _otel_env(receiver, "fleet-host").items():
        monkeypatch.setenv(name, value)
    telemetry.reset()
    drafts, reviews = _specs("draft", 6), _specs("review", 4)
    reviews.append(AgentStepSpec(task_id="review-bad", agent="fail", description="", prompt=SECRET))
    env = _otel_env(receiver, "fleet-worker")
    try:
        with running_workers(settings, tmp_path, "w1", "w2", concurrency=2, env=env) as workers:
            store = RedisCheckpointStore(redis_url, key_prefix=settings.key_prefix)
            executor = workers.executor()
            try:
                workflow = Workflow.builder(executor).with_store(store).with_root_id("tr").build()
                async with workflow:
                    first = await workflow.phase("draft", drafts)
                    second = await workflow.phase("review", reviews)
                    journal = {}
                    for name in ("tr/draft", "tr/review"):
                        checkpoint = await store.load(name)
                        assert checkpoint is not None
                        journal.update({r.task_id: r.outcome.usage for r in checkpoint.steps})
            finally:
                await executor.aclose()
                await store.close()
            assert [o.task_id for o in first + second if not o.success] == ["review-bad"]
            assert telemetry.flush()
            await until(lambda: len(receiver.named("invoke_agent")) >= 11, 30, "11 step spans")
    finally:
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        telemetry.reset()

    spans = list(receiver.spans)
    by_id = {s.span_id: s for s in spans}
    assert len({s.trace_id for s in spans}) == 1, {s.trace_id for s in spans}
    (root,) = [s for s in spans if s.name == "workflow"]
    assert root.parent_span_id == "" and root.attributes["fleet.workflow.id"] == "tr"
    phases = {s.attributes["fleet.phase.name"]: s for s in spans if s.name == "phase"}
    assert set(phases) == {"draft", "review"}
    assert all(p.parent_span_id == root.span_id for p in phases.values())

    steps = receiver.named("invoke_agent")
    (bad,) = [s for s in steps if s.attributes["fleet.step.task_id"] == "review-bad"]
    assert bad.attributes["fleet.step.error"] == "failed"
    assert by_id[by_id[bad.parent_span_id].parent_span_id] is phases["review"]
    steps.remove(bad)
    assert sorted(s.attributes["fleet.step.task_id"] for s in steps) == sorted(journal)
    assert {s.service for s in steps} == {"fleet-worker"}
    for step in steps:
        task_id = step.attributes["fleet.step.task_id"]
        parent = by_id[step.parent_span_id]
        assert parent.name == "round", parent
        assert by_id[parent.parent_span_id] is phases[task_id.split("-")[0]]
        usage = journal[task_id]
        assert step.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert step.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert usage.prompt_tokens > 0
        assert step.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert step.attributes["fleet.step.agent"] == "echo"
        assert step.attributes["fleet.workflow.id"] in {"tr/draft", "tr/review"}
        assert "fleet.step.error" not in step.attributes
    for span in spans:
        for value in span.attributes.values():
            assert SECRET not in json.dumps(value), (span.name, value)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_worker_metrics_equal_the_workflow_counts(redis_url: str, tmp_path: Path) -> None:
    settings = fleet_settings(redis_url)
    port = free_port()
    specs = _specs("m", 5) + [
        AgentStepSpec(task_id=f"bad-{i}", agent="fail", description="", prompt="x")
        for i in range(2)
    ]
    env = {"FLEET_METRICS_PORT": str(port)}
    with running_workers(settings, tmp_path, "m1", concurrency=2, env=env) as workers:
        executor = workers.executor()
        try:
            workflow = Workflow.builder(executor).with_root_id("metrics-wf").build()
            async with workflow:
                outcomes = await workflow.phase("all", specs)
        finally:
            await executor.aclose()
        samples = _scrape(port)

    assert [o.success for o in outcomes] == [True] * 5 + [False] * 2
    prompt = sum(echo_usage(s).prompt_tokens for s in specs[:5])
    completion = sum(echo_usage(s).completion_tokens for s in specs[:5])
    assert samples[("fleet_steps_started_total", (("agent", "echo"),))] == 5
    assert samples[("fleet_steps_started_total", (("agent", "fail"),))] == 2
    assert samples[("fleet_steps_finished_total", (("agent", "echo"), ("outcome", "success")))] == 5
    assert samples[("fleet_steps_finished_total", (("agent", "fail"), ("outcome", "failed")))] == 2
    tokens = "fleet_tokens_total"
    assert samples[(tokens, (("agent", "echo"), ("kind", "input"), ("model", "")))] == prompt
    assert samples[(tokens, (("agent", "echo"), ("kind", "output"), ("model", "")))] == completion
    assert not any(name == tokens and ("agent", "fail") in pairs for name, pairs in samples)
    assert samples[("fleet_step_duration_seconds_count", (("agent", "echo"),))] == 5
    assert samples[("fleet_steps_in_flight", ())] == 0
    assert samples[("fleet_queue_depth", (("queue", settings.queue),))] == 0
    ids = {s.task_id for s in specs} | {"metrics-wf", "metrics-wf/all"}
    labels = {value for _, pairs in samples for _, value in pairs}
    assert not labels & ids, labels & ids


async def test_budget_refusals_are_counted_in_the_host_process() -> None:
    registry = metrics.enable()
    before = registry.get_sample_value("fleet_budget_refusals_total") or 0.0
    budget = WorkflowBudget(30)
    executor = LocalExecutor(budget=budget)
    specs = [
        AgentStepSpec(task_id=f"b{i}", agent="echo", description="", prompt="word " * 20)
        for i in range(3)
    ]
    outcomes = await Workflow.builder(executor).with_budget(budget).build().parallel(specs)
    refused = sum(1 for o in outcomes if o.error == "budget_exhausted")
    assert refused >= 1
    assert registry.get_sample_value("fleet_budget_refusals_total") == before + refused


_NO_OTEL_PROGRAM = r"""
import asyncio, importlib.abc, json, os, sys

HIDE = sys.argv[1] == "uninstalled"
FLEET = (os.path.join(sys.argv[2], "fleet", ""), os.path.join(sys.argv[2], "workers", ""))
asked_by_fleet = []


class Watch(importlib.abc.MetaPathFinder):
    # Notes who asks for opentelemetry; hides it when the extra is "uninstalled".
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "opentelemetry":
            return None
        frame = sys._getframe(1)
        while frame is not None and (
            "importlib" in frame.f_code.co_filename or frame.f_code.co_filename.startswith("<")
        ):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(FLEET):
            asked_by_fleet.append(name)
        if HIDE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Watch())

import fleet
from fleet import AgentStepSpec, LocalExecutor, Workflow, telemetry

async def main():
    async with Workflow.builder(LocalExecutor()).build() as workflow:
        spec = AgentStepSpec(task_id="a", agent="echo", description="", prompt="hi")
        outcomes = await workflow.phase("p", [spec])
    assert outcomes[0].success, outcomes

asyncio.run(main())
after_import_and_workflow = sorted(m for m in sys.modules if m.startswith("opentelemetry"))

import workers.app
from fleet.agents import AgentRegistry, load_agents
from fleet.config import load_settings
from workers.tasks import WorkerRuntime

settings = load_settings()
workers.app.create_app(settings)
runtime = WorkerRuntime(settings, AgentRegistry(load_agents(settings.agents_file)), {})
spec = AgentStepSpec(task_id="w", agent="echo", description="", prompt="hi")
assert runtime.execute(spec, "w", None).success
print(json.dumps({
    "after_import_and_workflow": after_import_and_workflow,
    "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
    "prometheus_client": "prometheus_client" in sys.modules,
    "asked_by_fleet": asked_by_fleet,
    "tracing": telemetry.active() is not None,
}))
"""


@pytest.mark.parametrize(
    ("case", "otel_env"),
    [
        ("installed", {}),
        ("uninstalled", {}),
        ("uninstalled", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}),
    ],
)
def test_without_otel_fleet_imports_nothing(case: str, otel_env: dict[str, str]) -> None:
    """No OTEL_* variable, or no extra: fleet imports (and asks for) no OpenTelemetry module.

    redis-py itself imports the OpenTelemetry SDK's metrics when it finds it installed;
    that is redis's doing, so with the extra installed only fleet's own asks are checked.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLEET_"))}
    env.update(otel_env)
    env["FLEET_AGENTS_FILE"] = str(REPO / "tests" / "agents.toml")
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", _NO_OTEL_PROGRAM, case, str(REPO)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    assert seen["after_import_and_workflow"] == []
    assert seen["prometheus_client"] is False
    assert seen["tracing"] is False
    if case == "uninstalled":
        assert seen["loaded"] == []
    if not otel_env:
        assert seen["asked_by_fleet"] == []
    else:  # configured: fleet looked once whether the extra is there, and went on without
        assert seen["asked_by_fleet"] == ["opentelemetry"]


_OPENAI_PROGRAM = r"""
import asyncio, json, sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the program's own provider: fleet uses it

from fleet import AgentStepSpec, LocalExecutor, Workflow
from fleet.agents.openai import OpenAIAgent, OpenAIAgentConfig
from tests.fake_openai import FakeOpenAI, reply, tool_call


async def main():
    with FakeOpenAI() as server:
        server.script(
            reply(tool_calls=[tool_call("add", {"a": 2, "b": 3}, call_id="c1")],
                  prompt_tokens=11, completion_tokens=4),
            reply("five, PROMPT-TEXT-7f3a", prompt_tokens=20, completion_tokens=6),
        )
        config = OpenAIAgentConfig(
            base_url=server.base_url, model="test-model", backoff_s=0.01, max_tokens=64,
            tools=["tests.test_openai_agent:add"],
        )
        agent = OpenAIAgent(config, name="llm").definition("llm")
        executor = LocalExecutor(agents={"llm": agent})
        spec = AgentStepSpec(task_id="t1", agent="llm", description="", prompt="PROMPT-TEXT-7f3a")
        async with Workflow.builder(executor).with_root_id("oa").build() as workflow:
            (outcome,) = await workflow.phase("ask", [spec])
    assert outcome.success, outcome
    spans = [
        {
            "name": s.name,
            "id": s.context.span_id,
            "parent": s.parent.span_id if s.parent else None,
            "trace": s.context.trace_id,
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps({"spans": spans, "usage": outcome.usage.model_dump()}))

asyncio.run(main())
"""


def test_local_workflow_spans_model_and_tool_calls() -> None:
    """In-process: workflow → phase → invoke_agent → chat (each model call) and execute_tool."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLEET_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", _OPENAI_PROGRAM],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    spans = {s["name"]: s for s in seen["spans"]}
    chats = [s for s in seen["spans"] if s["name"] == "chat test-model"]
    assert len({s["trace"] for s in seen["spans"]}) == 1
    workflow, phase = spans["workflow"], spans["phase"]
    step, tool = spans["invoke_agent llm"], spans["execute_tool add"]
    assert workflow["parent"] is None and phase["parent"] == workflow["id"]
    assert step["parent"] == phase["id"]
    assert [c["parent"] for c in chats] == [step["id"], step["id"]]
    assert tool["parent"] == step["id"]
    assert tool["attributes"]["gen_ai.tool.name"] == "add"
    assert tool["attributes"]["gen_ai.tool.call.id"] == "c1"
    assert [c["attributes"]["gen_ai.usage.input_tokens"] for c in chats] == [11, 20]
    assert [c["attributes"]["gen_ai.usage.output_tokens"] for c in chats] == [4, 6]
    assert [c["attributes"]["gen_ai.response.finish_reasons"] for c in chats] == [
        ["tool_calls"],
        ["stop"],
    ]
    assert chats[0]["attributes"]["gen_ai.request.model"] == "test-model"
    assert chats[0]["attributes"]["gen_ai.operation.name"] == "chat"
    assert step["attributes"]["gen_ai.usage.input_tokens"] == seen["usage"]["prompt_tokens"] == 31
    assert step["attributes"]["gen_ai.usage.output_tokens"] == seen["usage"]["completion_tokens"]
    for span in seen["spans"]:
        assert SECRET not in json.dumps(span["attributes"]), span


async def test_metric_labels_stay_bounded() -> None:
    """Past MAX_LABEL_VALUES distinct agents, further ones are counted as 'other'."""
    registry = metrics.enable()
    extra = 5
    names = [f"bounded-agent-{i}" for i in range(metrics.MAX_LABEL_VALUES + extra)]
    for name in names:
        metrics.step_started(name)
        metrics.step_ended()
    started = {
        sample.labels["agent"]: sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        if family.name == "fleet_steps_started"
        for sample in family.samples
        if sample.name == "fleet_steps_started_total"
    }
    assert len(started) <= metrics.MAX_LABEL_VALUES + 1
    assert started["other"] >= extra
    assert not any(name in started for name in names[-extra:])
    assert registry.get_sample_value("fleet_steps_in_flight") is not None


def test_an_exporter_fleet_does_not_ship_turns_tracing_off_with_a_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    telemetry.reset()
    try:
        assert telemetry.active() is None
    finally:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER")
        telemetry.reset()
    (record,) = [r for r in caplog.records if r.name == "fleet.telemetry"]
    assert "OTEL_TRACES_EXPORTER='zipkin'" in record.getMessage()
    assert "otlp, console or none" in record.getMessage()
    assert telemetry.active() is None
