"""A step that hangs past its ``timeout_s`` on a worker, under a Redis budget.

Each trial: its own redis-server and one worker; a round of eight token-spending steps
and one step whose agent uses some tokens and then waits forever (a model call that
never answers), with ``timeout_s`` = 1 s, guarded by a ``WorkflowBudget`` on a
``RedisLedger``. The hung step must fail with ``error="timeout"`` (reporting the tokens it
used), run once (its lease stays alive, so the host does not re-send it), and its
reservation must be settled: ``reserved_tokens`` back to 0 and ``consumed_tokens`` equal
to what the steps really used. The reservation lease is 30 s, so only the settle (not a
lapsed lease) can release it within the trial. The other steps all succeed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import AgentStepSpec, StepOutcome, WorkflowBudget, execute_steps_parallel
from fleet.celery import CeleryExecutor
from fleet.ledgers import RedisLedger
from tests.faults.support import attempts, fresh_redis, fresh_workers, run_trials, trial_settings

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults]

TRIALS = 3
TIMEOUT_S = 1.0
HUNG_TOKENS = 7
LIMIT_TOKENS = 10_000


def round_specs() -> list[AgentStepSpec]:
    steps = [
        AgentStepSpec(
            task_id=f"s{i}",
            agent="spend_counted",
            description="spend",
            prompt=str(10 + i),
            max_tokens=100,
        )
        for i in range(8)
    ]
    hung = AgentStepSpec(
        task_id="hung", agent="hang", description="hangs", prompt=str(HUNG_TOKENS),
        max_tokens=100, timeout_s=TIMEOUT_S,
    )  # fmt: skip
    return [*steps[:4], hung, *steps[4:]]


async def one_trial(directory: Path) -> str:
    counter_dir = directory / "counters"
    counter_dir.mkdir()
    env = {"FLEET_TEST_COUNTER_DIR": str(counter_dir)}
    with fresh_redis(directory) as server:
        settings = trial_settings(server.url, claim_timeout_s=2.0, step_lease_s=1.0)
        with fresh_workers(settings, directory, ["worker1"], concurrency=4, env=env) as fleet:
            ledger = RedisLedger(settings.redis_url, key_prefix=settings.key_prefix)
            budget = WorkflowBudget(
                LIMIT_TOKENS, ledger=ledger, workflow_id=f"budget-{directory.name}", lease_s=30.0
            )
            executor = CeleryExecutor(settings=settings, budget=budget)
            try:
                outcomes: list[StepOutcome] = await execute_steps_parallel(executor, round_specs())
                snapshot = await budget.snapshot()
                held = await ledger.reservations(budget.workflow_id)
            finally:
                await executor.aclose()
                await ledger.close()
            alive = fleet.workers["worker1"].process.poll() is None

    by_id = {o.task_id: o for o in outcomes}
    hung = by_id.pop("hung")
    assert not hung.success and hung.error == "timeout", (hung.error, hung.output)
    assert hung.usage.total_tokens == HUNG_TOKENS, hung.usage
    assert hung.duration_s >= TIMEOUT_S
    assert all(o.success for o in by_id.values()), [o for o in by_id.values() if not o.success]
    assert {t: o.usage.total_tokens for t, o in by_id.items()} == {
        f"s{i}": 10 + i for i in range(8)
    }
    actual = sum(o.usage.total_tokens for o in outcomes)
    assert snapshot.reserved_tokens == 0 and not held, (snapshot, held)
    assert snapshot.consumed_tokens == actual, (snapshot, actual)
    runs = {task: len(r) for task, r in attempts(counter_dir).items()}
    assert runs == {"hung": 1, **{f"s{i}": 1 for i in range(8)}}, runs
    assert alive, "the worker died"
    return (
        f"hung step failed 'timeout' after {hung.duration_s:.2f} s, ran once; budget "
        f"{snapshot.consumed_tokens} consumed (= actual), {snapshot.reserved_tokens} reserved"
    )


@pytest.mark.timeout(300)
async def test_hung_step_times_out_and_releases_its_budget(tmp_path: Path) -> None:
    """A step hanging past timeout_s fails 'timeout'; its reservation is settled."""
    await run_trials("hung_step", TRIALS, tmp_path, lambda n, d: one_trial(d))
