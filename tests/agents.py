"""Agents used by the tests; importable by worker processes as ``tests.agents:NAME``."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from decimal import Decimal
from pathlib import Path

from fleet import AgentContext, AgentResult, AgentStepSpec, TokenUsage
from fleet.errors import AgentError
from fleet.pricing import ModelPrice

DOLLAR_A_TOKEN = ModelPrice(
    model="dollar-a-token",
    source="prices",
    input_per_mtok=Decimal(0),
    output_per_mtok=Decimal(1_000_000),
)
"""The price of :func:`pay`'s model: a completion token costs one dollar."""


async def slow_echo(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Echo the prompt after 15 ms (the reference test executor's shape)."""
    await asyncio.sleep(0.015)
    return spec.prompt


async def fail(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Always fail with a named kind."""
    raise AgentError(f"refused {spec.task_id}", kind="failed")


async def boom(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Always crash."""
    raise RuntimeError("boom")


async def noop(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Return at once."""
    return ""


async def sleep_prompt(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Sleep for the number of seconds in the prompt, then return it."""
    await asyncio.sleep(float(spec.prompt))
    return spec.prompt


async def spend(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Use exactly the number of tokens in the prompt."""
    tokens = int(spec.prompt)
    ctx.check_tokens(tokens)
    usage = TokenUsage(prompt_tokens=0, completion_tokens=tokens)
    ctx.charge(usage)
    return AgentResult(output=f"spent {tokens}", usage=usage)


async def count_and_echo(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Count the run in FLEET_TEST_COUNTER_DIR/<task_id>, then echo.

    The counter lives outside any journal: it is the step's observable side effect.
    """
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    _append(directory / spec.task_id)
    await asyncio.sleep(float(os.environ.get("FLEET_TEST_STEP_SLEEP", "0")))
    return spec.prompt


def _append(path: Path, text: str = "x") -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


async def count_where(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Append this worker's name to FLEET_TEST_COUNTER_DIR/<task_id>, sleep, echo.

    One line per run, so a test sees how many times a step ran and where. While the file
    ``~hang-<worker node>`` exists, a step starting on that worker marks itself
    ``~hung-<task_id>`` and never finishes: a kill test uses it to be sure it kills the
    worker in the middle of a step.
    """
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    _append(directory / spec.task_id, f"{ctx.worker}\n")
    if (directory / f"~hang-{ctx.worker}").exists():
        (directory / f"~hung-{spec.task_id}").touch()
        await asyncio.Event().wait()  # until the test kills this worker
    await asyncio.sleep(float(os.environ.get("FLEET_TEST_STEP_SLEEP", "0")))
    return spec.prompt


_GAUGE_UP = """
local now = redis.call('INCR', KEYS[1])
if now > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], now) end
return now
"""


async def gauge(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Echo after 50 ms, counting in Redis how many gauge steps run at once.

    FLEET_TEST_GAUGE_URL / FLEET_TEST_GAUGE_KEY name the server and key; the peak is
    kept at ``KEY:peak`` (works the same in-process and on Celery workers).
    """
    import redis.asyncio as aioredis

    key = os.environ["FLEET_TEST_GAUGE_KEY"]
    client = aioredis.Redis.from_url(os.environ["FLEET_TEST_GAUGE_URL"])
    try:
        await client.eval(_GAUGE_UP, 2, f"{key}:now", f"{key}:peak")
        try:
            await asyncio.sleep(0.05)
        finally:
            await client.decr(f"{key}:now")
    finally:
        await client.aclose()
    return spec.prompt


async def stream_words(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """Stream the prompt's words as deltas, 10 ms apart.

    A prompt ``"N/SECONDS"`` streams the words ``w0 … wN-1``, SECONDS apart, instead
    (``"N/SECONDS/STEM"``: ``STEM0 … STEMN-1``).
    """
    delay, words = _words(spec.prompt)
    text = ""
    for index, word in enumerate(words):
        piece = word if index == 0 else " " + word
        ctx.emit_delta(piece)
        text += piece
        await asyncio.sleep(delay)
    return text


def _words(prompt: str) -> tuple[float, list[str]]:
    """``stream_words``' prompt: its words 10 ms apart, or ``"N/SECONDS[/STEM]"``."""
    count, slash, rest = prompt.partition("/")
    if slash and count.isdigit():
        seconds, _, stem = rest.partition("/")
        return float(seconds), [f"{stem or 'w'}{i}" for i in range(int(count))]
    return 0.01, prompt.split()


BLOCKING_ENDED: dict[str, threading.Event] = {}
"""Set for a task id once :func:`stream_words_blocking` returned (its thread is done)."""


def stream_words_blocking(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """:func:`stream_words` as a plain function (``blocking = true``: run in a thread)."""
    ended = BLOCKING_ENDED.setdefault(spec.task_id, threading.Event())
    delay, words = _words(spec.prompt)
    text = ""
    try:
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            ctx.emit_delta(piece)
            text += piece
            time.sleep(delay)
        return text
    finally:
        ended.set()


async def long_step(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Prompt ``SECONDS TOKENS``: note the run, sleep SECONDS, then spend TOKENS.

    Each run appends ``<worker> <time.time()>`` to FLEET_TEST_COUNTER_DIR/<task_id> when
    it starts (one line per run), so a test sees how often, where and when a step ran.
    """
    seconds, tokens = spec.prompt.split()
    directory = Path(os.environ["FLEET_TEST_COUNTER_DIR"])
    _append(directory / spec.task_id, f"{ctx.worker} {time.time():.3f}\n")
    await asyncio.sleep(float(seconds))
    usage = TokenUsage(prompt_tokens=0, completion_tokens=int(tokens))
    ctx.check_tokens(usage.total_tokens)
    ctx.charge(usage)
    return AgentResult(output=f"slept {seconds}", usage=usage)


async def pay(spec: AgentStepSpec, ctx: AgentContext) -> AgentResult:
    """Buy the completion tokens the prompt names at $1 each, as one priced model call.

    The call's worst case is held in dollars first (fewer tokens when less is left).
    """
    hold = await ctx.hold_call(
        DOLLAR_A_TOKEN,
        model=DOLLAR_A_TOKEN.model,
        agent=spec.agent,
        prompt_tokens=0,
        max_tokens=int(spec.prompt),
    )
    usage = TokenUsage(prompt_tokens=0, completion_tokens=hold.max_tokens)
    ctx.charge(usage)
    await hold.settle(usage)
    return AgentResult(output=f"paid {hold.max_tokens}", usage=usage)
