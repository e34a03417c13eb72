"""An approval: agents draft release notes, a person approves them, then they are published.

Run it with ``fleet run examples/approval.py:main --root-id release-1``. It stops at the
question and waits (holding no tokens); answer from another terminal::

    fleet asks                                         # what is waiting, and where
    fleet answer release-1 publish --json '{"approved": true, "note": "ship it"}'

or with Approve / Reject on ``fleet dashboard``. Kill the run while it waits and start it
again: the drafting is served from the journal, and an answer given meanwhile is used at
once. Nobody answering within ``APPROVAL_TIMEOUT_S`` (default a day) counts as a rejection.
"""

from __future__ import annotations

import json
import os

from pydantic import BaseModel

from examples.agents import AGENTS as AGENTS
from fleet import AgentStepSpec, Workflow

NOTES = (
    "Workflows can now ask a person and wait for the answer. The wait survives a crash of "
    "the host. Answers are checked against a schema before the workflow sees them."
)


class Approval(BaseModel):
    """What the approver answers."""

    approved: bool
    note: str = ""


def step(task_id: str, agent: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description=task_id, prompt=prompt, max_tokens=200
    )


async def main(workflow: Workflow) -> dict[str, object]:
    """Draft, ask for approval, publish only if approved."""
    (parsed,) = await workflow.phase("parse", [step("parse", "normalize", NOTES)])
    (ranked,) = await workflow.phase("keywords", [step("keywords", "keywords", parsed.output)])
    (draft,) = await workflow.phase("draft", [step("draft", "summarize", ranked.output)])
    summary = json.loads(draft.output)["summary"]
    decision = await workflow.ask(
        "publish",
        question=f"Publish these release notes? {summary}",
        schema=Approval,
        timeout_s=float(os.environ.get("APPROVAL_TIMEOUT_S", 86_400)),
        default=Approval(approved=False, note="nobody answered in time"),
    )
    if not decision.approved:
        workflow.log("warning", "not published", note=decision.note)
        return {"published": False, "note": decision.note}
    (published,) = await workflow.phase("publish", [step("publish", "echo", summary)])
    return {"published": published.success, "summary": published.output, "note": decision.note}
