"""Redis Cluster hash tags: every key a workflow's round writes carries ``{root id}``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis as redis_sync

from fleet import AgentStepSpec, Workflow, WorkflowBudget
from fleet.celery import CeleryExecutor
from fleet.ledgers import RedisLedger
from fleet.redis.keys import tagged, untagged
from fleet.runs import RedisRunRegistry
from fleet.stores.redis import RedisCheckpointStore
from tests.celery_support import fleet_settings, running_workers

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    ("workflow_id", "key_part"),
    [
        ("nightly", "{nightly}"),
        ("nightly/review#2", "{nightly}/review#2"),
        ("a}b/c", "{a}b}/c"),
        ("", "{}"),
    ],
)
def test_tag_is_the_root_in_braces_and_reads_back(workflow_id: str, key_part: str) -> None:
    """A workflow id's key part wraps its root in braces and reads back to the same id."""
    assert tagged(workflow_id) == key_part
    assert untagged(key_part) == workflow_id


def test_untagged_text_reads_as_is() -> None:
    """A key part without a tag (an older layout) reads back unchanged."""
    assert untagged("plain/review") == "plain/review"
    assert untagged("{open/review") == "{open/review"


@pytest.mark.redis
@pytest.mark.celery
async def test_every_key_of_a_celery_round_carries_the_workflow_tag(
    redis_url: str, tmp_path: Path
) -> None:
    """After a journaled, budgeted, logged Celery round every key naming the workflow is tagged.

    The round writes the ledger account, the phase journal, the event stream and the run
    record; each must exist (so the check cannot pass on an empty Redis) and every key
    under the prefix that names the root id must hold ``{root}``.
    """
    settings = fleet_settings(redis_url)
    prefix = settings.key_prefix
    root = f"tagged-{uuid.uuid4().hex[:8]}"
    ledger = RedisLedger(redis_url, key_prefix=prefix)
    budget = WorkflowBudget(100_000, ledger=ledger, workflow_id=root)
    store = RedisCheckpointStore(redis_url, key_prefix=prefix)
    board = RedisRunRegistry(redis_url, key_prefix=prefix)
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="slow_echo", description="d", prompt=f"p{i}")
        for i in range(6)
    ]
    with running_workers(settings, tmp_path, "w1", concurrency=2):
        async with CeleryExecutor(settings=settings, budget=budget) as executor:
            workflow = (
                Workflow.builder(executor)
                .with_root_id(root)
                .with_store(store)
                .with_budget(budget)
                .with_event_stream(redis_url, key_prefix=prefix)
                .with_cancel_board(board)
                .build()
            )
            async with workflow:
                outcomes = await workflow.phase("review", specs)
                during = _keys(redis_url, prefix)  # the phase journal lives until the end
    await store.close()
    await board.close()
    await ledger.close()
    assert all(outcome.success for outcome in outcomes)
    mine = sorted(key for key in during | _keys(redis_url, prefix) if root in key)
    untagged_keys = [key for key in mine if f"{{{root}}}" not in key]
    assert untagged_keys == []
    assert f"{prefix}:budget:{{{root}}}:account" in mine
    assert f"{prefix}:journal:{{{root}}}/review" in mine
    assert f"{prefix}:events:{{{root}}}" in mine
    assert f"{prefix}:workflow:{{{root}}}" in mine


def _keys(redis_url: str, prefix: str) -> set[str]:
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        return set(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()
