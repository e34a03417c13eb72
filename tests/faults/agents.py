"""Agents the fault scenarios' workers run (``tests/faults/agents.toml``).

Every agent here appends one line per run to ``$FLEET_TEST_COUNTER_DIR/<task id>``:
``<worker node> <wall-clock start time>``. The file is the step's observable side
effect, outside Redis and any journal, so a test sees how many times each step ran,
on which worker and when, even across a Redis restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from fleet import AgentContext, AgentResult, AgentStepSpec, TokenUsage


def record_attempt(spec: AgentStepSpec, ctx: AgentContext) -> None:
    """Append ``<worker> <time.time()>`` to this step's counter file."""
    path = Path(os.environ["FLEET_TEST_COUNTER_DIR"]) / spec.task_id
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.worker} {time.time():.6f}\n")


async def attempt(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Record the run, sleep ``$FLEET_TEST_STEP_SLEEP`` seconds, echo the prompt.

    While ``~hang-<worker node>`` exists in the counter directory, a step starting on that
    worker marks itself ``~hung-<task id>`` and never finishes: a kill trial uses it to be
    sure the victim dies in the middle of a step.
    """
    record_attempt(spec, ctx)
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    if (directory / f"~hang-{ctx.worker}").exists():
        (directory / f"~hung-{spec.task_id}").touch()
        await asyncio.Event().wait()  # until the trial kills this worker
    await asyncio.sleep(float(os.environ.get("FLEET_TEST_STEP_SLEEP", "0")))
    return spec.prompt


async def spend_counted(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Record the run, then use exactly the number of tokens in the prompt."""
    record_attempt(spec, ctx)
    tokens = int(spec.prompt)
    ctx.check_tokens(tokens)
    usage = TokenUsage(prompt_tokens=0, completion_tokens=tokens)
    ctx.charge(usage)
    await asyncio.sleep(0.05)
    return AgentResult(output=f"spent {tokens}", usage=usage)


async def hang(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Record the run, use the prompt's number of tokens, then wait for a reply that never comes.

    Models a model call that hangs: only the step's ``timeout_s`` ends it.
    """
    record_attempt(spec, ctx)
    ctx.charge(TokenUsage(prompt_tokens=int(spec.prompt), completion_tokens=0))
    await asyncio.Event().wait()
    raise AssertionError("unreachable: nothing sets the event")


async def attempt_charged(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Like :func:`attempt`, then use ``$FLEET_TEST_STEP_TOKENS`` tokens (default 10)."""
    record_attempt(spec, ctx)
    await asyncio.sleep(float(os.environ.get("FLEET_TEST_STEP_SLEEP", "0")))
    tokens = int(os.environ.get("FLEET_TEST_STEP_TOKENS", "10"))
    ctx.check_tokens(tokens)
    usage = TokenUsage(prompt_tokens=0, completion_tokens=tokens)
    ctx.charge(usage)
    return AgentResult(output=spec.prompt, usage=usage)
