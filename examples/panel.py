"""A verification panel: N reviewers check every claim in parallel, then a judge rules.

Run it with ``fleet run examples/panel.py:main``. Two phases, so with a journal a crash
during judging re-runs none of the reviews.
"""

from __future__ import annotations

import json
from typing import Any

from examples.agents import AGENTS as AGENTS
from fleet import AgentStepSpec, Workflow

CLAIMS = [
    "12 * 12 = 144",
    "17 * 23 = 391",
    "2 ** 10 = 1000",
    "99 * 99 = 9810",
    "123 + 456 = 579",
]
LENSES = ["arithmetic", "parity", "magnitude", "last-digit"]


def review(number: int, claim: str, lens: str) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=f"review-{number}-{lens}",
        agent="fact_check",
        description=f"check claim {number} ({lens})",
        prompt=json.dumps({"claim": claim, "lens": lens}),
        max_tokens=100,  # the step's reservation from the budget, and its cap
    )


def ruling(number: int, claim: str, reviews: list[dict[str, Any]]) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=f"judge-{number}",
        agent="judge",
        description=f"rule on claim {number}",
        prompt=json.dumps({"claim": claim, "reviews": reviews}),
        max_tokens=400,
    )


async def main(workflow: Workflow) -> dict[str, str]:
    """Review every claim through every lens, then have a judge rule on each claim."""
    specs = [review(n, claim, lens) for n, claim in enumerate(CLAIMS) for lens in LENSES]
    reviews = await workflow.phase("review", specs)
    by_claim: dict[int, list[dict[str, Any]]] = {n: [] for n in range(len(CLAIMS))}
    for spec, outcome in zip(specs, reviews, strict=True):
        if outcome.success:
            by_claim[int(spec.task_id.split("-")[1])].append(outcome.structured)
        else:
            workflow.log("warning", "a reviewer failed", task_id=spec.task_id, error=outcome.error)
    rulings = await workflow.phase(
        "judge", [ruling(n, claim, by_claim[n]) for n, claim in enumerate(CLAIMS)]
    )
    verdicts = {}
    for claim, outcome in zip(CLAIMS, rulings, strict=True):
        verdict = (
            outcome.structured["verdict"] if outcome.success else f"no ruling ({outcome.error})"
        )
        verdicts[claim] = verdict
        workflow.log("info", f"{claim}: {verdict}", votes=(outcome.structured or {}).get("votes"))
    return verdicts
