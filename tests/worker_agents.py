"""Agents of tests/test_worker_loop.py, importable by worker processes as ``tests.worker_agents``."""

from __future__ import annotations

import threading
import time

import httpx

from fleet import AgentContext, AgentStepSpec


def wait_for_calls(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """A plain (blocking) agent: sleep until the provider in the prompt answered N calls.

    The prompt is ``"<provider root> <N>"``. It blocks its thread the whole time, so the
    calls it waits for must be made by other steps of the same worker meanwhile.
    """
    root, wanted = spec.prompt.split()
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline:
        seen = httpx.get(f"{root}/_provider/stats", params={"log": 0}).json()["ok"]
        if seen >= int(wanted):
            return f"saw {seen}"
        time.sleep(0.1)
    raise RuntimeError(f"the provider answered only {seen} of {wanted} calls")


async def hog(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """An async agent that blocks its event loop (a synchronous sleep) for the prompt's seconds."""
    time.sleep(float(spec.prompt))  # noqa: ASYNC251 - blocking on purpose
    return spec.prompt


def thread_name(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """A plain agent: the name of the thread it runs on."""
    return threading.current_thread().name
