"""A per-item pipeline: each document is normalized, mined for keywords and summarized.

Run it with ``fleet run examples/pipeline.py:main``. There is no barrier between stages:
a short document can be summarized while a long one is still being normalized, and an
empty document stops after its first stage.
"""

from __future__ import annotations

from examples.agents import AGENTS as AGENTS
from fleet import AgentStepSpec, StepOutcome, Workflow

DOCUMENTS = {
    "redis": "Redis keeps the journal. The journal survives a crash. Workers read the "
    "journal before they run a step, so a step runs once.",
    "celery": "Celery workers take steps from the queue. More workers drain the queue "
    "faster. A worker that dies loses no step: the step is sent again.",
    "budget": "The budget is a hard cap. Every step reserves tokens before it runs. "
    "Unused tokens return to the budget when the step settles.",
    "empty": "   ",
}


def _step(stage: str, name: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=f"{name}-{stage}",
        agent=stage,
        description=f"{stage} {name}",
        prompt=prompt,
        max_tokens=400,  # the step's reservation from the budget, and its cap
    )


def normalize(_previous: StepOutcome | None, name: str) -> AgentStepSpec:
    return _step("normalize", name, DOCUMENTS[name])


def keywords(previous: StepOutcome | None, name: str) -> AgentStepSpec | None:
    assert previous is not None
    if not previous.structured["words"]:
        return None  # nothing to mine: this item's chain ends here
    return _step("keywords", name, previous.output)


def summarize(previous: StepOutcome | None, name: str) -> AgentStepSpec:
    assert previous is not None
    return _step("summarize", name, previous.output)


async def main(workflow: Workflow) -> dict[str, str]:
    """Run every document through normalize -> keywords -> summarize."""
    names = list(DOCUMENTS)
    results = await workflow.pipeline(names, [normalize, keywords, summarize])
    summaries = {}
    for name, outcome in zip(names, results, strict=True):
        if outcome is None or not outcome.success:
            summaries[name] = "(no summary)"
        elif outcome.agent != "summarize":
            summaries[name] = "(nothing to summarize)"
        else:
            summaries[name] = outcome.structured["summary"]
        workflow.log("info", f"{name}: {summaries[name]}")
    return summaries
