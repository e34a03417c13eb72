"""Offline, deterministic agents the examples run (no network, no model server).

Each does real work on its prompt (JSON in, JSON out) and reports a token estimate, so
budgets and progress have something to count. Workers can run them too: register them
by dotted path (``examples.agents:fact_check``) in the workers' agents file.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from typing import Any

from fleet import AgentContext, AgentResult, AgentStepSpec, TokenUsage
from fleet.agents import estimate_tokens
from fleet.errors import AgentError

__all__ = ["AGENTS", "crawl", "fact_check", "judge", "keywords", "normalize", "summarize"]


def reply(spec: AgentStepSpec, ctx: AgentContext, payload: Any) -> AgentResult:
    """Answer with ``payload`` as JSON, charging an estimate of the tokens a model would use."""
    output = json.dumps(payload, sort_keys=True)
    usage = TokenUsage(
        prompt_tokens=estimate_tokens(spec.prompt), completion_tokens=estimate_tokens(output)
    )
    ctx.check_tokens(usage.completion_tokens, prompt_estimate=usage.prompt_tokens)
    ctx.charge(usage)
    return AgentResult(output=output, structured=payload, usage=usage)


# --- verification panel ------------------------------------------------------------------

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return int(_OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError("only integer arithmetic (+ - * // **) is understood")


def _sides(claim: str) -> tuple[str, str]:
    left, sep, right = claim.partition("=")
    if not sep:
        raise AgentError(f"claim has no '=': {claim!r}", kind="bad_input")
    return left.strip(), right.strip()


def _check(lens: str, left: str, right: str) -> tuple[bool, str]:
    value, stated = _evaluate(ast.parse(left, mode="eval").body), int(right)
    if lens == "arithmetic":
        return value == stated, f"{left} evaluates to {value}"
    if lens == "parity":
        same = value % 2 == stated % 2
        return same, f"{left} is {'even' if value % 2 == 0 else 'odd'}"
    if lens == "magnitude":
        digits = len(str(abs(value)))
        return digits == len(str(abs(stated))), f"{left} has {digits} digits"
    if lens == "last-digit":
        return abs(value) % 10 == abs(stated) % 10, f"{left} ends in {abs(value) % 10}"
    raise AgentError(f"unknown lens {lens!r}", kind="bad_input")


async def fact_check(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Review an arithmetic claim through one lens: ``{"claim": "12 * 12 = 144", "lens": ...}``.

    Lenses: ``arithmetic`` (recompute), ``parity``, ``magnitude`` (digit count) and
    ``last-digit``; the cheap lenses can be fooled, which is why a panel votes.
    """
    request = json.loads(spec.prompt)
    left, right = _sides(request["claim"])
    ok, note = _check(request["lens"], left, right)
    return reply(
        spec, ctx, {"claim": request["claim"], "lens": request["lens"], "ok": ok, "note": note}
    )


async def judge(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Weigh a panel's reviews: ``{"claim": ..., "reviews": [{"lens", "ok"}...]}``.

    The arithmetic lens is decisive; otherwise the majority wins.
    """
    request = json.loads(spec.prompt)
    reviews = request["reviews"]
    decisive = [review for review in reviews if review["lens"] == "arithmetic"]
    votes = sum(1 for review in reviews if review["ok"])
    accepted = decisive[0]["ok"] if decisive else votes * 2 > len(reviews)
    dissent = sorted(review["lens"] for review in reviews if review["ok"] != accepted)
    return reply(
        spec,
        ctx,
        {
            "claim": request["claim"],
            "verdict": "accepted" if accepted else "rejected",
            "votes": f"{votes}/{len(reviews)}",
            "dissent": dissent,
        },
    )


# --- per-item pipeline -------------------------------------------------------------------

_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was "
    "were will with".split()
)


async def normalize(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Lower-case a document and split it into sentences and words."""
    text = " ".join(spec.prompt.split())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    words = re.findall(r"[a-z0-9']+", text.lower())
    return reply(spec, ctx, {"sentences": sentences, "words": words})


async def keywords(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """The five most frequent non-stopwords (ties broken alphabetically)."""
    document = json.loads(spec.prompt)
    counts = Counter(w for w in document["words"] if w not in _STOPWORDS and len(w) > 2)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5]
    return reply(
        spec, ctx, {"sentences": document["sentences"], "keywords": [w for w, _ in ranked]}
    )


async def summarize(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """A one-line summary: the sentence that mentions the most keywords."""
    document = json.loads(spec.prompt)
    wanted = set(document["keywords"])

    def score(sentence: str) -> int:
        return len(wanted & set(re.findall(r"[a-z0-9']+", sentence.lower())))

    best = max(document["sentences"], key=score)
    return reply(spec, ctx, {"summary": best, "keywords": document["keywords"]})


# --- loop until dry ----------------------------------------------------------------------

SITE: dict[str, list[str]] = {
    "/": ["/docs", "/blog", "/about"],
    "/docs": ["/docs/install", "/docs/workflows", "/"],
    "/docs/install": ["/docs", "/docs/redis"],
    "/docs/workflows": ["/docs/phases", "/docs/events", "/docs"],
    "/docs/phases": ["/docs/workflows"],
    "/docs/events": ["/docs/workflows", "/docs/redis"],
    "/docs/redis": [],
    "/blog": ["/blog/launch", "/"],
    "/blog/launch": ["/blog", "/docs/install", "/about"],
    "/about": ["/"],
}
"""A small offline "website": page -> the links on it."""


async def crawl(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Fetch one page of :data:`SITE` and return its links (a missing page fails the step)."""
    page = spec.prompt
    if page not in SITE:
        raise AgentError(f"404: no page {page!r}", kind="not_found")
    return reply(spec, ctx, {"page": page, "links": SITE[page]})


AGENTS = {
    "fact_check": fact_check,
    "judge": judge,
    "normalize": normalize,
    "keywords": keywords,
    "summarize": summarize,
    "crawl": crawl,
}
"""Every example agent by name (``fleet run`` registers a program's ``AGENTS``)."""
