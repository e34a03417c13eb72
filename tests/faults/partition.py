"""The partition workload, in the spirit of Jepsen's set-append: run, break the fleet, check.

One trial: a ``redis-server`` (AOF on) and three workers on one queue. ``worker1`` reaches
Redis only through a fault proxy (:class:`tests.faults.link.Link`); ``worker2`` and
``worker3`` directly. Rounds of budgeted, journaled steps (agent ``set_append``: a few
model calls, then the step appends its id to a file of its own attempt, named with the
attempt's lease token) run back to back while a nemesis, for a bounded time, in turn
cuts ``worker1``'s link, pauses ``worker2`` (``SIGSTOP``) longer than the lease, delays
``worker1``'s link past the lease, restarts Redis (``SIGTERM``), blackholes ``worker1``'s
link, each healed after a while. A watcher reads every step lease in Redis every few
milliseconds and remembers, per attempt token, when that lease lapses (or lapsed). The
nemesis and the watcher are in :mod:`tests.faults.nemesis`.

The checker (:func:`check_round`, :func:`check_budget`), per round, once every fault is
healed: every step succeeded; the journal holds exactly one record per step, it is the
attempt the host was answered with, and that attempt is the last one that held the step's
lease (an earlier owner's lease had lapsed) and appended the step's id; no attempt
started, and no model call began, after its lease lapsed; the budget's consumed equals
the sum of what was settled and the sum of what every attempt's model calls used;
nothing is left reserved.

``tests/faults/test_partition.py`` runs a bounded trial in the suite; ``bench/partition.py``
runs the long ones (3 trials of at least 60 s with at least 10 faults each).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fleet import AgentStepSpec, StepOutcome, WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.celery.protocol import step_task_id
from fleet.config import FleetSettings
from fleet.ledgers.redis import RedisLedger
from fleet.redis.clients import OUTAGE_TOLERANCE_S
from fleet.redis.keys import tagged
from fleet.redis_server import RedisServer
from fleet.stores.redis import RedisCheckpointStore
from tests.celery_support import CeleryWorkers
from tests.faults.link import Link, resume
from tests.faults.nemesis import Fault, LeaseWatch, Nemesis, Shape
from tests.faults.support import fresh_redis, trial_settings

STEP_TOKENS = 10
"""Tokens each model call of a step uses."""
LAPSE_TOLERANCE_S = 0.05
"""Slack for the watcher's own delay in reading a lease (it reads every few ms)."""


@dataclass
class Attempt:
    """One attempt of one step, as its agent recorded it (``tests/faults/agents.set_append``)."""

    step: str
    token: str
    events: list[tuple[str, float, str]] = field(default_factory=list)

    def times(self, kind: str) -> list[float]:
        return [at for name, at, _ in self.events if name == kind]

    @property
    def worker(self) -> str:
        return next(arg for name, _, arg in self.events if name == "start")

    @property
    def used(self) -> int:
        return sum(int(arg) for name, _, arg in self.events if name == "used")

    @property
    def ended(self) -> str | None:
        """The id the attempt appended, if it got that far."""
        return next((arg for name, _, arg in self.events if name == "end"), None)


def read_attempts(directory: Path) -> list[Attempt]:
    """Every attempt recorded under ``directory/attempts``."""
    found = []
    folder = directory / "attempts"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        step, token = path.name.rsplit(".", 1)
        attempt = Attempt(step, token)
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            attempt.events.append((words[0], float(words[-1]), " ".join(words[1:-1])))
        found.append(attempt)
    return found


@dataclass
class Tally:
    """What a trial came to, summed over its rounds."""

    rounds: int = 0
    steps: int = 0
    attempts: int = 0
    reruns: int = 0
    lapsed: int = 0
    """Attempts whose lease lapsed before they were recorded."""
    stopped: int = 0
    """Of those, attempts the worker interrupted (``stopped``/``refused`` in their record)."""
    stop_lags: dict[str, list[float]] = field(default_factory=dict)
    """Per worker, for each attempt it stopped: when it stopped minus when its lease lapsed
    (s; negative: stopped before the lapse)."""
    late_calls: int = 0
    late_starts: int = 0
    faults: list[Fault] = field(default_factory=list)

    def line(self) -> str:
        kinds: dict[str, int] = {}
        for fault in self.faults:
            kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
        lag = "; ".join(
            f"{worker} {len(lags)}: min {min(lags):+.3f} s, median "
            f"{statistics.median(lags):+.3f} s, max {max(lags):+.3f} s"
            for worker, lags in sorted(self.stop_lags.items())
        )
        return (
            f"{len(self.faults)} faults ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
            f"{self.rounds} rounds, {self.steps} steps, {self.attempts} attempts, "
            f"{self.reruns} re-runs; {self.lapsed} lapsed attempts, {self.stopped} stopped "
            f"(stop - lapse by worker: {lag or 'none'}); calls begun after a lapse "
            f"{self.late_calls}, attempts started after a lapse {self.late_starts}"
        )


async def check_round(
    settings: FleetSettings,
    workflow_id: str,
    specs: list[AgentStepSpec],
    outcomes: list[StepOutcome],
    attempts: list[Attempt],
    watch: LeaseWatch,
    tally: Tally,
) -> None:
    """Check one round (see the module docstring); add its numbers to ``tally``."""
    lapses = dict(watch.lapses)
    failed = [(o.task_id, o.error, o.output[:160]) for o in outcomes if not o.success]
    assert not failed, f"steps failed: {failed[:5]}"
    store = RedisCheckpointStore(settings.redis_url, key_prefix=settings.key_prefix)
    try:
        journal = await store.load(workflow_id)
    finally:
        await store.close()
    assert journal is not None, f"no journal for {workflow_id}"
    journaled = {record.task_id: record.outcome.output for record in journal.steps}
    assert sorted(journaled) == sorted(s.task_id for s in specs), "journal != steps"
    answered = {o.task_id: o.output for o in outcomes}
    differ = {t: (answered[t], journaled[t]) for t in journaled if journaled[t] != answered[t]}
    assert not differ, f"the journal holds another attempt than the host was answered: {differ}"
    by_token = {a.token: a for a in attempts}
    for spec in specs:
        step, (_, token) = spec.task_id, journaled[spec.task_id].split()
        attempt = by_token.get(token)
        assert attempt is not None, f"{step}: journaled attempt {token} left no record"
        assert attempt.ended == step, f"{step}: journaled attempt {token} did not append {step}"
        # Only the attempt that held the lease last may count: an earlier owner's lease
        # lapsed before the step went to the next one.
        owners = watch.owners.get(f"{settings.key_prefix}:lease:{step_task_id(workflow_id, spec)}")
        assert owners and owners[-1] == token, (
            f"{step}: journaled attempt {token}, but the lease was held last by "
            f"{owners[-1] if owners else None} (owners in order: {owners})"
        )
    unseen = [a.token for a in attempts if a.token not in lapses]
    assert not unseen, f"attempts whose lease the watcher never saw: {unseen}"
    late_starts = [a.token for a in attempts if a.times("start")[0] > lapses[a.token]]
    late_calls = [
        (a.token, round(at - lapses[a.token], 3))
        for a in attempts
        for at in a.times("call")
        if at > lapses[a.token] + LAPSE_TOLERANCE_S
    ]
    recorded = {output.split()[1] for output in journaled.values()}
    lapsed = [a for a in attempts if a.token not in recorded]
    for attempt in lapsed:
        stops = attempt.times("stopped") + attempt.times("refused")
        if stops:
            tally.stopped += 1
            lag = min(stops) - lapses[attempt.token]
            tally.stop_lags.setdefault(attempt.worker, []).append(lag)
    tally.rounds += 1
    tally.steps += len(specs)
    tally.attempts += len(attempts)
    tally.reruns += len(attempts) - len(specs)
    tally.lapsed += len(lapsed)
    tally.late_calls += len(late_calls)
    tally.late_starts += len(late_starts)
    assert not late_starts, f"attempts started after their lease lapsed: {late_starts}"
    assert not late_calls, f"model calls begun after the lease lapsed (token, s late): {late_calls}"


async def budget_state(settings: FleetSettings, workflow_id: str) -> tuple[int, int, int]:
    """The round's ledger: consumed, reserved, and the sum of every settled usage."""
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        base = f"{settings.key_prefix}:budget:{tagged(workflow_id)}"
        account = await client.hgetall(f"{base}:account")
        settled = await client.hvals(f"{base}:settled")
    finally:
        await client.aclose()
    settled_sum = sum(int(value.split(b"|")[0]) for value in settled)
    return int(account.get(b"consumed", 0)), int(account.get(b"reserved", 0)), settled_sum


async def check_budget(
    settings: FleetSettings, workflow_id: str, attempts: list[Attempt], wait_s: float
) -> None:
    """Consumed equals what was settled and what the attempts used; nothing is reserved.

    A stopped attempt reports what it used once it reaches Redis again (its worker may
    have been cut off or paused when the round ended): waits up to ``wait_s`` for that.
    """
    used = sum(a.used for a in attempts)
    deadline = time.monotonic() + wait_s
    while True:
        consumed, reserved, settled = await budget_state(settings, workflow_id)
        if (consumed, reserved, settled) == (used, 0, used) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert (consumed, reserved) == (settled, 0), (
        f"budget of {workflow_id}: consumed {consumed}, reserved {reserved}, settled {settled}"
    )
    assert consumed == used, (
        f"budget of {workflow_id}: consumed {consumed} != {used} used by the attempts' calls"
    )


@contextlib.contextmanager
def partitioned_fleet(
    directory: Path, shape: Shape, env: dict[str, str]
) -> Iterator[tuple[FleetSettings, RedisServer, Link, CeleryWorkers, CeleryWorkers]]:
    """Redis, a fault proxy, ``worker1`` behind it and ``worker2``, ``worker3`` beside it."""
    with fresh_redis(directory, appendonly=True) as server, Link(server.port) as link:
        settings = trial_settings(
            server.url,
            step_lease_s=shape.lease_s,
            claim_timeout_s=2.0,
            max_in_flight=3 * shape.concurrency,
        )
        behind = FleetSettings(**{**settings.model_dump(), "redis_url": link.url()})
        proxied = CeleryWorkers(behind, directory, shape.concurrency, env)
        direct = CeleryWorkers(settings, directory, shape.concurrency, env)
        try:
            proxied.start("worker1")
            direct.start("worker2", "worker3")
            yield settings, server, link, proxied, direct
        finally:
            for worker in direct.workers.values():
                resume(worker.process.pid)
            proxied.stop()
            direct.stop()


async def run_trial(directory: Path, shape: Shape) -> Tally:
    """One trial: rounds back to back under the nemesis, each checked; returns the tally."""
    counters = directory / "counters"
    counters.mkdir()
    env = {
        "FLEET_TEST_COUNTER_DIR": str(counters),
        "FLEET_TEST_CALLS": str(shape.calls),
        "FLEET_TEST_CALL_S": str(shape.call_s),
        "FLEET_TEST_CALL_TOKENS": str(STEP_TOKENS),
    }
    tally = Tally()
    with partitioned_fleet(directory, shape, env) as (settings, server, link, _, direct):
        nemesis = Nemesis(shape, link, direct, server, counters)
        with LeaseWatch(settings.redis_url, settings.key_prefix) as watch:
            chaos = asyncio.create_task(nemesis.run())
            rounds = []
            try:
                while not chaos.done() or not rounds:
                    rounds.append(await _one_round(settings, shape, len(rounds)))
                await chaos
            finally:
                if not chaos.done():
                    chaos.cancel()
                    await asyncio.gather(chaos, return_exceptions=True)
            tally.faults = nemesis.faults
            # Every fault is healed: what a stopped attempt still had to say reaches Redis
            # within the clients' outage tolerance.
            for n, (workflow_id, specs, outcomes) in enumerate(rounds):
                mine = [a for a in read_attempts(counters) if a.step.startswith(f"r{n}s")]
                await check_budget(settings, workflow_id, mine, OUTAGE_TOLERANCE_S + 10)
                await check_round(settings, workflow_id, specs, outcomes, mine, watch, tally)
    return tally


async def _one_round(
    settings: FleetSettings, shape: Shape, n: int
) -> tuple[str, list[AgentStepSpec], list[StepOutcome]]:
    workflow_id = f"part-{n}-{uuid.uuid4().hex[:8]}"
    specs = [
        AgentStepSpec(
            task_id=f"r{n}s{i}",
            agent="set_append",
            description="partition",
            prompt=str(i),
            max_tokens=STEP_TOKENS * 100,
        )
        for i in range(shape.steps)
    ]
    ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
    budget = WorkflowBudget(10**9, ledger=ledger, workflow_id=workflow_id)
    async with CeleryExecutor(settings=settings, budget=budget, worker_journal=True) as executor:
        outcomes = await asyncio.wait_for(
            executor.native_round(specs, workflow_id=workflow_id), timeout=180
        )
    await ledger.close()
    assert outcomes is not None
    return workflow_id, specs, outcomes
