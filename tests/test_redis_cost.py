"""What one budgeted, journaled, logged step costs Redis, counted at ``bench.redis_cost``'s shape.

The bench's own fleet (a real ``redis-server``, two real Celery workers, the ``parrot``
agent) runs behind its counting proxy; these tests pin the round trips a step makes
where a count does not depend on the machine's load: the ledger is asked once per step
(the reservation), the worker records and settles in one script, and the host notes
what it read, and appends its events, in batches rather than a round trip per step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.redis_cost import measure
from fleet.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.celery]

STEPS = 60


@pytest.fixture(scope="module")
def cost(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One measured round of :data:`STEPS` steps (after a warm-up round)."""
    directory = tmp_path_factory.mktemp("redis-cost")
    with RedisServer(directory / "redis") as server:
        return asyncio.run(measure(server, STEPS, directory))


def _per_step(cost: dict[str, Any], shape: str) -> float:
    return sum(row["per_step"] for row in cost["sent_by_key"] if row["command_and_key"] == shape)


def _trips(cost: dict[str, Any], component: str) -> float:
    (row,) = [row for row in cost["by_component"] if row["component"] == component]
    return float(row["round_trips_per_step"])


def test_a_budgeted_step_asks_the_ledger_once(cost: dict[str, Any]) -> None:
    """The host reserves; the worker settles inside its finish script, with the host's chain."""
    assert _per_step(cost, "evalsha ledger_reserve cost-*:budget:{measured}:account") == 1.0
    assert _per_step(cost, "evalsha ledger_settle cost-*:budget:{measured}:account") == 0.0
    # The accounts above the workflow come with the hold: no read of them per step.
    assert _per_step(cost, "evalsha ledger_state cost-*:budget:{measured}:account") < 0.1
    assert _trips(cost, "ledger") < 1.1


def test_the_worker_records_settles_and_notifies_in_one_round_trip(cost: dict[str, Any]) -> None:
    """``finish_settle.lua`` writes the outcome, settles, and pushes the notice: one script."""
    assert _per_step(cost, "evalsha finish_settle cost-*:result:fs-*:*") == 1.0
    assert _per_step(cost, "evalsha finish cost-*:result:fs-*:*") == 0.0
    # The notice is pushed inside the script (a duplicate's own RPUSH aside).
    assert _per_step(cost, "rpush cost-*:reply:host-*") < 0.1
    # The script, and the host's pops of the started and finished notices (at most two).
    assert _trips(cost, "results") <= 3.1


def test_the_host_checks_a_journaled_round_once_and_notes_reads_in_batches(
    cost: dict[str, Any],
) -> None:
    """Done-markers and leases are read for the whole round at once, not before each send."""
    # One done-marker read and one lease check per step, all in one pipeline...
    assert _per_step(cost, "hget cost-*:steps:{measured}") == 1.0
    assert _per_step(cost, "exists cost-*:lease:fs-*") >= 1.0
    # ...so the host's own step-record traffic adds no round trip per step to kombu's
    # four (push, pop, unacked add and remove) and the batched task-sent events.
    assert _trips(cost, "broker") < 5.0
    # The steps read are noted at most once a check interval, not after each outcome.
    assert _per_step(cost, "hset cost-*:steps:{measured}") < 0.5


def test_the_events_of_steps_that_end_together_share_a_round_trip(cost: dict[str, Any]) -> None:
    """The event stream's writer lingers a moment: XADDs go out in pipelines, not one each."""
    assert _per_step(cost, "xadd cost-*:events:{measured}") >= 2.0  # started and finished
    assert _trips(cost, "events") < 1.0


def test_the_host_sends_task_sent_events_in_batches(cost: dict[str, Any]) -> None:
    """Celery's ``task-sent`` events of a batch of sends go out as one ``task.multi``."""
    assert _per_step(cost, "publish /0.celeryev/task.sent") < 0.1


def test_a_step_the_worker_journaled_costs_the_host_no_journal_write(cost: dict[str, Any]) -> None:
    """``fleet run``'s journal on the fleet's Redis: the finish script journals the step."""
    assert _per_step(cost, "evalsha journal_record cost-*:journal:{measured}/cost") == 0.0
    assert _trips(cost, "journal") < 0.1
