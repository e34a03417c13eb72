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


async def set_append(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """One attempt of the partition workload's step: ``$FLEET_TEST_CALLS`` model calls, then append.

    Writes ``$FLEET_TEST_COUNTER_DIR/attempts/<task id>.<attempt token>``, one line per event
    with its wall-clock time: ``start <worker>``, ``call <i>`` before each call (after
    ``ctx.check_tokens``, which a tripped fence refuses: ``refused``), ``used <tokens>``
    once a call has spent ``$FLEET_TEST_CALL_TOKENS`` (charged to the step), ``stopped`` when
    the step is interrupted, and last ``end <task id>``: the id appended to the set. The
    output names the attempt, so the journal says which attempt it holds.
    """
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"]) / "attempts"
    directory.mkdir(exist_ok=True)
    path = directory / f"{spec.task_id}.{ctx.attempt or 'local'}"
    calls = int(os.environ.get("FLEET_TEST_CALLS", "4"))
    call_s = float(os.environ.get("FLEET_TEST_CALL_S", "0.3"))
    tokens = int(os.environ.get("FLEET_TEST_CALL_TOKENS", "10"))
    # Written synchronously, so each line is on disk before the next await can be interrupted.
    with open(path, "a", encoding="utf-8", buffering=1) as record:  # noqa: ASYNC230
        record.write(f"start {ctx.worker.split('@')[0]} {time.time():.6f}\n")
        try:
            for i in range(calls):
                try:
                    ctx.check_tokens(tokens)
                except Exception:
                    record.write(f"refused {time.time():.6f}\n")
                    raise
                record.write(f"call {i} {time.time():.6f}\n")
                await asyncio.sleep(call_s)  # the model call; an interrupt closes it unpaid
                ctx.charge(TokenUsage(prompt_tokens=0, completion_tokens=tokens))
                record.write(f"used {tokens} {time.time():.6f}\n")
        except asyncio.CancelledError:
            record.write(f"stopped {time.time():.6f}\n")
            raise
        record.write(f"end {spec.task_id} {time.time():.6f}\n")
    return f"{spec.task_id} {ctx.attempt}"
