"""The bundled demo: a code-review panel over a small sample project, fully offline.

Four reviewer agents read every file of ``fleet/demo_project`` in one fan-out round
(lint, security, complexity, docs); a per-file pipeline turns each file's findings into
a verdict and a patch plan; a loop applies automatic fixes and re-lints until nothing
fixable is left. Every agent does real, deterministic work (``ast`` and text analysis)
and reports a token estimate, so the budget and the summary have something to count.

One module on purpose (about 500 lines): the reviewers, their LLM-backed twins and the
workflow that runs them are read together, as the one example of a whole program.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agents.base import AgentContext, AgentDefinition, AgentResult, estimate_tokens
from .combinators import LoopDecision, execute_loop, execute_pipeline, execute_steps_parallel
from .events import EventSink
from .executor import AgentExecutor
from .spec import AgentStepSpec, StepOutcome, TokenUsage

__all__ = [
    "DEFAULT_LLM_CONCURRENCY",
    "DEMO_AGENTS",
    "DEMO_AGENT_TARGETS",
    "SAMPLE_PROJECT",
    "FINDINGS_SCHEMA",
    "DemoReport",
    "llm_reviewers",
    "load_sources",
    "run_demo",
]

SAMPLE_PROJECT = Path(__file__).parent / "demo_project"
"""The bundled sample project the panel reviews."""

MAX_LINE = 88
REVIEWERS = ("lint", "security", "complexity", "docs")


def _finding(line: int, rule: str, message: str, *, fixable: bool = False) -> dict[str, Any]:
    return {"line": line, "rule": rule, "message": message, "fixable": fixable}


def _usage(prompt: str, output: str) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=estimate_tokens(prompt), completion_tokens=estimate_tokens(output)
    )


def _reply(spec: AgentStepSpec, ctx: AgentContext, payload: Any) -> AgentResult:
    output = json.dumps(payload, sort_keys=True)
    usage = _usage(spec.prompt, output)
    ctx.check_tokens(usage.completion_tokens, prompt_estimate=usage.prompt_tokens)
    ctx.charge(usage)
    return AgentResult(output=output, structured=payload, usage=usage)


def _source(spec: AgentStepSpec) -> tuple[str, str]:
    document = json.loads(spec.prompt)
    return str(document["path"]), str(document["source"])


def lint_findings(source: str) -> list[dict[str, Any]]:
    """Style problems: long lines, trailing whitespace, tabs, TODO/FIXME, no module docstring."""
    findings = []
    for number, text in enumerate(source.splitlines(), start=1):
        if len(text) > MAX_LINE:
            findings.append(_finding(number, "E501", f"line is {len(text)} > {MAX_LINE} chars"))
        if text != text.rstrip():
            findings.append(_finding(number, "W291", "trailing whitespace", fixable=True))
        if "\t" in text:
            findings.append(_finding(number, "W191", "indentation contains tabs", fixable=True))
        if re.search(r"#\s*(TODO|FIXME)", text):
            findings.append(_finding(number, "TD001", "unresolved TODO/FIXME"))
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [*findings, _finding(error.lineno or 0, "E999", f"syntax error: {error.msg}")]
    if ast.get_docstring(tree) is None:
        findings.append(_finding(1, "D100", "module has no docstring"))
    return findings


_RISKY_CALLS = {
    "eval": "eval() runs arbitrary code",
    "exec": "exec() runs arbitrary code",
    "pickle.load": "unpickling untrusted data runs arbitrary code",
    "pickle.loads": "unpickling untrusted data runs arbitrary code",
}


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def security_findings(source: str) -> list[dict[str, Any]]:
    """Risky calls, ``shell=True`` and hard-coded secrets."""
    findings = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in _RISKY_CALLS:
                findings.append(_finding(node.lineno, "S307", _RISKY_CALLS[name]))
            for keyword in node.keywords:
                if keyword.arg == "shell" and getattr(keyword.value, "value", False) is True:
                    findings.append(
                        _finding(node.lineno, "S602", "subprocess call with shell=True")
                    )
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and re.search(
                    r"pass(word)?|secret|token", target.id, re.I
                ):
                    findings.append(_finding(node.lineno, "S105", f"hard-coded secret {target.id}"))
    return findings


_BRANCHES = (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.BoolOp, ast.IfExp)


def complexity_findings(source: str, *, limit: int = 6) -> list[dict[str, Any]]:
    """Functions whose cyclomatic complexity exceeds ``limit``."""
    findings = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            score = 1 + sum(isinstance(inner, _BRANCHES) for inner in ast.walk(node))
            if score > limit:
                findings.append(
                    _finding(node.lineno, "C901", f"{node.name}() has complexity {score} > {limit}")
                )
    return findings


def docs_findings(source: str) -> list[dict[str, Any]]:
    """Public functions and classes without a docstring or without type hints."""
    findings = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                findings.append(_finding(node.lineno, "D103", f"{node.name} has no docstring"))
            if isinstance(node, ast.FunctionDef) and node.returns is None:
                findings.append(
                    _finding(node.lineno, "ANN201", f"{node.name}() has no return type")
                )
    return findings


_CHECKS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "lint": lint_findings,
    "security": security_findings,
    "complexity": complexity_findings,
    "docs": docs_findings,
}


def _reviewer(kind: str) -> Callable[[AgentStepSpec, AgentContext], Any]:
    async def review(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
        path, source = _source(spec)
        return _reply(
            spec, ctx, {"path": path, "reviewer": kind, "findings": _CHECKS[kind](source)}
        )

    review.__name__ = review.__qualname__ = f"review_{kind}"
    review.__doc__ = f"The {kind} reviewer: {(_CHECKS[kind].__doc__ or '').strip()}"
    return review


_WEIGHTS = {"security": 5, "complexity": 3, "lint": 1, "docs": 1}


async def judge(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Weigh a file's findings from every reviewer into a verdict and a score out of 100."""
    panel = json.loads(spec.prompt)
    penalty = 0
    blocking = []
    for review in panel["reviews"]:
        for finding in review["findings"]:
            penalty += _WEIGHTS.get(review["reviewer"], 1)
            if review["reviewer"] == "security":
                blocking.append(f"{finding['rule']} line {finding['line']}: {finding['message']}")
    score = max(100 - 4 * penalty, 0)
    verdict = "reject" if blocking else ("approve" if score >= 85 else "revise")
    fixable = sum(f["fixable"] for r in panel["reviews"] for f in r["findings"])
    return _reply(
        spec,
        ctx,
        {"path": panel["path"], "verdict": verdict, "score": score, "blocking": blocking,
         "fixable": fixable},
    )  # fmt: skip


async def plan_fixes(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Turn a verdict into a patch plan: what can be fixed automatically, what needs a human."""
    verdict = json.loads(spec.prompt)
    steps = []
    if verdict["fixable"]:
        steps.append(f"auto-fix {verdict['fixable']} whitespace finding(s)")
    steps += [f"human: {item}" for item in verdict["blocking"]]
    if verdict["verdict"] == "revise":
        steps.append("human: reduce complexity and document the public API")
    return _reply(
        spec, ctx, {"path": verdict["path"], "verdict": verdict["verdict"], "plan": steps}
    )


async def fixer(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Apply one round of automatic fixes: tabs to spaces, then trailing whitespace."""
    path, source = _source(spec)
    lines = source.split("\n")
    if any("\t" in line for line in lines):
        fixed = [line.replace("\t", "    ") for line in lines]
        applied = "W191"
    else:
        fixed = [line.rstrip() for line in lines]
        applied = "W291"
    text = "\n".join(fixed)
    remaining = sum(f["fixable"] for f in lint_findings(text))
    return _reply(
        spec, ctx, {"path": path, "source": text, "applied": applied, "remaining": remaining}
    )


review_lint = _reviewer("lint")
review_security = _reviewer("security")
review_complexity = _reviewer("complexity")
review_docs = _reviewer("docs")

DEMO_AGENTS: dict[str, Any] = {
    "lint": review_lint,
    "security": review_security,
    "complexity": review_complexity,
    "docs": review_docs,
    "judge": judge,
    "plan": plan_fixes,
    "fixer": fixer,
}
"""The demo's agents by name (pass to ``LocalExecutor(agents=...)``)."""

DEMO_AGENT_TARGETS: dict[str, str] = {
    name: f"{__name__}:{agent.__name__}" for name, agent in DEMO_AGENTS.items()
}
"""The same agents as dotted paths, for an agents file a Celery worker loads."""


FINDINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "findings": {
            "type": "array",
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "line": {"type": "integer"},
                    "rule": {"type": "string"},
                    "message": {"type": "string"},
                    "fixable": {"type": "boolean"},
                },
                "required": ["line", "rule", "message"],
            },
        }
    },
    "required": ["findings"],
}
"""What an LLM reviewer must answer with (``--llm`` mode). The bounds keep a small local
model, whose output a server constrains to this schema, from generating for minutes."""

DEFAULT_LLM_CONCURRENCY = 2
"""Model calls in flight at most in ``--llm`` mode: one queued behind one running, which a
one-slot local server (llama.cpp on a laptop) answers well within the request timeout."""

_FOCUS = {
    "lint": "style: over-long lines, trailing whitespace, tabs, unresolved TODO/FIXME, "
    "a missing module docstring (mark whitespace and tab problems fixable)",
    "security": "security: eval/exec, unpickling untrusted data, shell=True, hard-coded secrets",
    "complexity": "complexity: functions with too many branches or nesting",
    "docs": "documentation: public functions or classes without docstrings or return types",
}


def llm_reviewers(
    base_url: str,
    model: str,
    *,
    api_key_env: str | None = None,
    max_concurrent: int | None = DEFAULT_LLM_CONCURRENCY,
) -> dict[str, AgentDefinition]:
    """The four reviewers backed by a chat model on an OpenAI-compatible server.

    Each asks the model for its kind of review of one file, as JSON matching
    :data:`FINDINGS_SCHEMA` (validated, one repair call), and answers in the same shape as
    the offline reviewers, so the rest of the demo is unchanged. The four share one
    agent, so at most ``max_concurrent`` model calls are in flight to the server (fewer
    while it is slow: see ``fleet.agents.openai.concurrency``).
    """
    from .agents.openai import OpenAIAgent, OpenAIAgentConfig

    agent = OpenAIAgent(
        OpenAIAgentConfig(
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            system="You are a meticulous Python code reviewer. Report only real problems.",
            temperature=0.0,
            max_tokens=700,
            # A small model on a laptop's CPU reads a file for tens of seconds: one call is
            # given minutes (calls wait for a slot in fleet, not in the server's queue).
            timeout_s=300.0,
            max_concurrent=max_concurrent,
        ),
        name="demo-llm",
    )

    def question(spec: AgentStepSpec, kind: str) -> AgentStepSpec:
        path, source = _source(spec)
        numbered = "\n".join(f"{n:4} {line}" for n, line in enumerate(source.splitlines(), 1))
        # The file comes first, the question last: the four reviews of one file then share
        # a long prompt prefix, which servers with prefix caching (llama.cpp, vLLM, hosted
        # APIs) do not read again.
        prompt = (
            f"The Python file {path}, with line numbers:\n\n{numbered}\n\nReview it for "
            f"{_FOCUS[kind]}. Give each problem's line number, a short rule code and a "
            "one-sentence message."
        )
        return spec.model_copy(update={"prompt": prompt, "output_schema": FINDINGS_SCHEMA})

    def reviewer(kind: str) -> AgentDefinition:
        async def review(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
            path, _ = _source(spec)
            answer = await agent(question(spec, kind), ctx)
            findings = [
                _finding(int(f["line"]), str(f["rule"]), str(f["message"]),
                         fixable=bool(f.get("fixable", False)))
                for f in answer.structured["findings"]
            ]  # fmt: skip
            payload = {"path": path, "reviewer": kind, "findings": findings}
            return AgentResult(
                output=json.dumps(payload, sort_keys=True), structured=payload, usage=answer.usage
            )

        return AgentDefinition(
            name=kind,
            run=review,
            reserve_tokens=lambda spec: agent.reserve_tokens(question(spec, kind)),
            kind="openai",
        )

    return {kind: reviewer(kind) for kind in REVIEWERS}


def load_sources(root: Path = SAMPLE_PROJECT) -> dict[str, str]:
    """The sample project's files, by relative path, in a stable order."""
    return {
        str(path.relative_to(root)): path.read_text(encoding="utf-8")
        for path in sorted(root.glob("*.py"))
    }


def _doc(path: str, source: str) -> str:
    return json.dumps({"path": path, "source": source})


@dataclass
class DemoReport:
    """What the demo found, for the summary."""

    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, list[str]] = field(default_factory=dict)
    fix_rounds: int = 0
    fixed_files: dict[str, int] = field(default_factory=dict)
    outcomes: list[StepOutcome] = field(default_factory=list)
    incomplete: dict[str, str] = field(default_factory=dict)
    """Files that got no verdict, with the reason (a failed review is never a clean one)."""

    @property
    def failed(self) -> list[StepOutcome]:
        """The steps that failed."""
        return [outcome for outcome in self.outcomes if not outcome.success]


async def _review_round(
    executor: AgentExecutor, sources: dict[str, str], report: DemoReport, events: EventSink | None
) -> dict[str, list[dict[str, Any]]]:
    """Fan-out: every reviewer reads every file, in one barrier round."""
    specs = [
        AgentStepSpec(task_id=f"review/{kind}/{path}", agent=kind, description=f"{kind} {path}",
                      prompt=_doc(path, source))
        for path, source in sources.items()
        for kind in REVIEWERS
    ]  # fmt: skip
    reviews = await execute_steps_parallel(executor, specs, events=events)
    report.outcomes += reviews
    by_file: dict[str, list[dict[str, Any]]] = {path: [] for path in sources}
    for spec, outcome in zip(specs, reviews, strict=True):
        path = json.loads(spec.prompt)["path"]
        if outcome.success:
            by_file[path].append(outcome.structured)
        else:
            reason = f"{spec.agent} review failed ({outcome.error}: {_first_line(outcome.output)})"
            report.incomplete.setdefault(path, reason)
    return {path: reviews for path, reviews in by_file.items() if path not in report.incomplete}


def _first_line(text: str, limit: int = 160) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def _verdict_pipeline(
    executor: AgentExecutor,
    by_file: dict[str, list[dict[str, Any]]],
    report: DemoReport,
    events: EventSink | None,
) -> None:
    """Pipeline: per file, judge the panel's findings, then plan the fixes; no barrier."""

    def judge_stage(_previous: StepOutcome | None, path: str) -> AgentStepSpec:
        panel = {"path": path, "reviews": by_file[path]}
        return AgentStepSpec(task_id=f"judge/{path}", agent="judge", description=f"judge {path}",
                             prompt=json.dumps(panel))  # fmt: skip

    def plan_stage(previous: StepOutcome | None, path: str) -> AgentStepSpec | None:
        if previous is None or previous.structured is None:
            return None
        report.verdicts[path] = previous.structured
        return AgentStepSpec(task_id=f"plan/{path}", agent="plan", description=f"plan {path}",
                             prompt=previous.output)  # fmt: skip

    paths = list(by_file)
    planned = await execute_pipeline(executor, paths, [judge_stage, plan_stage], events=events)
    for path, last in zip(paths, planned, strict=True):
        if last is not None:
            report.outcomes.append(last)
            if last.success:
                report.plans[path] = last.structured["plan"]
            elif path not in report.verdicts:
                report.incomplete[path] = f"judge failed ({last.error})"


async def _fix_loop(
    executor: AgentExecutor,
    sources: dict[str, str],
    report: DemoReport,
    events: EventSink | None,
    max_rounds: int,
) -> None:
    """Loop: apply automatic fixes and re-check, until nothing fixable is left (dry)."""
    current = {
        path: src for path, src in sources.items() if any(f["fixable"] for f in lint_findings(src))
    }

    def fix_specs(round_no: int) -> list[AgentStepSpec]:
        return [
            AgentStepSpec(task_id=f"fix/{round_no}/{path}", agent="fixer",
                          description=f"fix {path}", prompt=_doc(path, src))
            for path, src in current.items()
        ]  # fmt: skip

    def next_round(outcomes: list[StepOutcome]) -> LoopDecision.Continue | LoopDecision.Stop:
        report.fix_rounds += 1
        report.outcomes.extend(outcomes)
        current.clear()
        for outcome in outcomes:
            if outcome.success:
                fixed = outcome.structured
                report.fixed_files[fixed["path"]] = report.fixed_files.get(fixed["path"], 0) + 1
                if fixed["remaining"]:
                    current[fixed["path"]] = fixed["source"]
        return LoopDecision.Continue(fix_specs(report.fix_rounds))

    await execute_loop(executor, fix_specs(0), max_rounds, next_round, events=events)


async def run_demo(
    executor: AgentExecutor, *, events: EventSink | None = None, max_fix_rounds: int = 5
) -> DemoReport:
    """Run the review panel (fan-out), the verdict pipeline and the fix-until-clean loop."""
    sources = load_sources()
    report = DemoReport()
    by_file = await _review_round(executor, sources, report, events)
    await _verdict_pipeline(executor, by_file, report, events)
    await _fix_loop(executor, sources, report, events, max_fix_rounds)
    return report
