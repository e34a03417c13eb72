"""Pipeline stages registered by name in tests/agents.toml (``[stages.NAME]``).

Celery workers import them as ``tests.pipeline_stages:NAME``; the conformance suite
runs the same stages in-process, on Celery chains, and host-driven (wrapped in closures).
"""

from __future__ import annotations

from fleet import AgentStepSpec, StepOutcome


def _spec(task_id: str, agent: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent=agent, description=task_id, prompt=prompt)


def draft(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 1: echo the item."""
    return _spec(f"draft-{item}", "slow_echo", item)


def review(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 2: review the previous output."""
    assert prev is not None
    return _spec(f"review-{item}", "slow_echo", f"review of: {prev.output}")


def fail_alpha(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 1: item 'alpha' fails, others draft."""
    if item == "alpha":
        return _spec(f"draft-{item}", "fail", item)
    return draft(prev, item)


def stop_beta(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 2: item 'beta' stops its chain, others are reviewed."""
    return None if item == "beta" else review(prev, item)


def skip_first(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 1: item 'skip' declines at once, others draft."""
    return None if item == "skip" else draft(prev, item)


def crash_middle(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 2: raises for item 'boom' (its chain yields None), others are reviewed."""
    if item == "boom":
        raise RuntimeError("stage crashed")
    return review(prev, item)


def sleepy(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 1: sleep the seconds after ':' in the item ("slow:0.6")."""
    name, _, delay = item.partition(":")
    return _spec(f"sleep-{name}", "sleep_prompt", delay or "0")


def gauged(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Both stages: a gauge step (counts concurrency)."""
    stage = 1 if prev is None else 2
    return _spec(f"g{stage}-{item}", "gauge", f"{item}/{stage}")


def bench_noop(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Any stage: a no-op step (the benchmark's pipeline)."""
    stage = 1 if prev is None else int(prev.task_id.rsplit("-", 1)[1]) + 1
    return _spec(f"{item}-{stage}", "noop", "")


def counted(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Both stages: a count_where step (records each run and its worker)."""
    stage = 1 if prev is None else 2
    return _spec(f"c{stage}-{item}", "count_where", f"{item}/{stage}")


def streamed(prev: StepOutcome | None, item: str) -> AgentStepSpec | None:
    """Stage 1: stream the item's words as output deltas."""
    return _spec(f"streamed-{item}", "stream_words", item)
