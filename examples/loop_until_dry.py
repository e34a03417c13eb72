"""Loop until dry: crawl a site round by round until a round finds no new page.

Run it with ``fleet run examples/loop_until_dry.py:main``. Each round fetches every
page discovered by the previous one (a barrier fan-out); the loop ends when nothing new
turns up, or after ``MAX_ROUNDS``.
"""

from __future__ import annotations

from examples.agents import AGENTS as AGENTS
from fleet import AgentStepSpec, LoopDecision, StepOutcome, Workflow

MAX_ROUNDS = 10


def fetch(page: str) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=f"crawl:{page}",
        agent="crawl",
        description=f"fetch {page}",
        prompt=page,
        max_tokens=100,  # the step's reservation from the budget, and its cap
    )


async def main(workflow: Workflow) -> dict[str, object]:
    """Crawl from ``/`` until no round discovers a page not seen before."""
    seen = {"/"}
    rounds = 0

    def next_round(outcomes: list[StepOutcome]) -> LoopDecision.Continue:
        nonlocal rounds
        rounds += 1
        fresh = sorted(
            {link for o in outcomes if o.success for link in o.structured["links"]} - seen
        )
        seen.update(fresh)
        workflow.log("info", f"round {rounds}: {len(fresh)} new pages", pages=fresh)
        return LoopDecision.Continue([fetch(page) for page in fresh])

    await workflow.loop([fetch("/")], MAX_ROUNDS, next_round)
    return {"rounds": rounds, "pages": sorted(seen)}
