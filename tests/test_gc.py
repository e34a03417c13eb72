"""``fleet gc`` and retention against a real Redis, piece by piece.

What a run leaves for gc is written here with fleet's own parts (run registry, ledger,
retention, event stream); a race with a run that begins again is played in its bad
order on a real client, so every test is deterministic.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fleet import Workflow, WorkflowBudget
from fleet.accounts import set_account
from fleet.gc import LOOSE_NAMESPACES, NAMESPACES, collect
from fleet.ledgers import RedisLedger
from fleet.local import LocalExecutor
from fleet.redis.keys import REPLY_TTL_S, Keys, tagged
from fleet.redis.scripts import script
from fleet.retention import DEFAULT_RETENTION_S, RedisRetention, workflow_keys
from fleet.runs import RedisRunRegistry
from fleet.stores import RedisCheckpointStore


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


def _tagged_keys(prefix: str, root: str) -> dict[str, str]:
    """Every key :class:`Keys` names for ``root`` that carries ``root`` as its hash tag.

    Each public method of ``Keys`` that names keys is called with ``root`` for every
    argument: a key family added later is found here without this test naming it.
    """
    named = Keys(prefix)
    found: dict[str, str] = {}
    for name, method in inspect.getmembers(named, inspect.ismethod):
        if name.startswith("_") or name in ("head", "pattern"):
            continue
        made = method(*[root] * len(inspect.signature(method).parameters))
        for key in made if isinstance(made, tuple) else (made,):
            if tagged(root) in key:
                found[key] = name
    return found


def test_every_key_tagged_with_a_workflows_root_is_covered_by_retention_and_gc() -> None:
    """A key family Keys tags with a root id is in ``workflow_keys`` and among gc's namespaces."""
    prefix, root = "p", "wf"
    found = _tagged_keys(prefix, root)
    assert {"budget", "journal", "events", "deltas", "workflow", "asks", "steps"} <= set(
        found.values()
    )
    retained = {key for key, _kind in workflow_keys(root, key_prefix=prefix, journals=[root])}
    assert set(found) - retained == set(), "add the key to fleet.retention.workflow_keys"
    namespaces = {key.split(":")[1] for key in found}
    assert namespaces <= set(NAMESPACES) and not namespaces & set(LOOSE_NAMESPACES)


async def test_gc_removes_every_tagged_key_of_an_ended_workflow(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """Each key family of an ended workflow past its retention is removed by one gc pass."""
    root = "gone"
    board = RedisRunRegistry(redis_url, key_prefix=key_prefix)
    try:
        await board.begin(root, "r1")
        await board.end(root, "r1", "finished")
    finally:
        await board.close()
    named = Keys(key_prefix)
    # An account's `children` key marks it as one others draw from (kept): left out here.
    written = [
        key
        for key in _tagged_keys(key_prefix, root)
        if key not in (named.workflow(root), named.budget(root)[4])
    ]
    for key in written:
        if key == named.events(root):
            client.xadd(key, {"event": "{}"})
        else:
            client.set(key, "x")
    report = collect(client, key_prefix=key_prefix, retention_s=1, now=time.time() + 60)
    assert report.workflows == [root]
    assert not client.exists(*written, named.workflow(root))


class _BeginsAgainAfterJudging(redis.Redis):
    """A real client on which a new run of ``root`` begins right after gc read its record.

    gc reads a root's run record (``HGETALL``) to judge it, then acts on what it read: a
    run that begins in between is the race its scripts must refuse.
    """

    record = ""
    begin: Any = None

    def hgetall(self, name: Any) -> Any:
        fields = super().hgetall(name)
        if name == self.record and self.begin is not None:
            begin, self.begin = self.begin, None
            begin(self)
        return fields


def _begin_again(record: str, keys: list[str]) -> Any:
    """What ``Workflow._begin`` does for a new run: record it running, keep its records."""

    def begin(connection: redis.Redis) -> None:
        script("run_begin")(connection, [record], ["r2", time.time()])
        for key in keys:
            connection.persist(key)

    return begin


async def _ended_run(redis_url: str, prefix: str, root: str) -> list[str]:
    """A run of ``root`` that spent from its budget, logged an event, ended and got its expiry."""
    board = RedisRunRegistry(redis_url, key_prefix=prefix)
    ledger = RedisLedger(redis_url, key_prefix=prefix)
    retention = RedisRetention(redis_url, key_prefix=prefix, retention_s=3600)
    try:
        await board.begin(root, "r1")
        held = await WorkflowBudget(100, ledger=ledger, workflow_id=root).reserve(5, holder="h")
        await held.settle(5)
        await board.end(root, "r1", "finished")
        await retention.expire(root, run_id="r1")
    finally:
        for part in (board, ledger, retention):
            await part.close()
    named = Keys(prefix)
    return [named.budget(root)[0], named.budget(root)[3]]


async def test_gc_restores_a_lost_expiry_of_an_ended_run(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """An ended run's key that lost its expiry (a late write) gets what its retention has left."""
    account, settled = await _ended_run(redis_url, key_prefix, "late")
    client.persist(settled)  # a late settle rewrote it without an expiry
    report = collect(client, key_prefix=key_prefix, retention_s=3600)
    assert report.expiry_set == 1 and report.workflows == []
    assert 0 < client.ttl(settled) <= 3600 and 0 < client.ttl(account) <= 3600


async def test_gc_never_sets_an_expiry_on_a_run_that_began_again_after_it_judged(
    redis_url: str, key_prefix: str
) -> None:
    """gc judged the ended run; a new run began before gc acted: its records keep no expiry."""
    root = "again"
    account, settled = await _ended_run(redis_url, key_prefix, root)
    record = Keys(key_prefix).workflow(root)
    with _BeginsAgainAfterJudging.from_url(redis_url) as racing:
        racing.record, racing.begin = record, _begin_again(record, [account])
        racing.persist(settled)  # gc would restore this one
        report = collect(racing, key_prefix=key_prefix, retention_s=3600)
        assert racing.begin is None  # the new run began between gc's read and its write
        assert report.expiry_set == 0
        assert (racing.ttl(account), racing.ttl(settled)) == (-1, -1)
        assert racing.hget(record, "status") == b"running"


async def test_gc_never_prunes_a_run_that_began_again_after_it_judged(
    redis_url: str, key_prefix: str
) -> None:
    """Past its retention, the ended run is judged prunable; a new run begins: nothing goes."""
    root = "pruned-again"
    account, settled = await _ended_run(redis_url, key_prefix, root)
    record = Keys(key_prefix).workflow(root)
    with _BeginsAgainAfterJudging.from_url(redis_url) as racing:
        racing.record, racing.begin = record, _begin_again(record, [account, settled])
        report = collect(racing, key_prefix=key_prefix, retention_s=1, now=time.time() + 60)
        assert report.workflows == [] and racing.exists(account, settled) == 2


class _GcAtBegin(RedisRunRegistry):
    """A real run registry; a ``fleet gc`` pass runs right when a run registers on it."""

    gc: Any = None

    async def begin(self, root_id: str, run_id: str) -> None:
        self.gc()
        await super().begin(root_id, run_id)


async def test_a_run_that_begins_again_keeps_its_records_when_gc_runs_as_it_registers(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """The records of a resumed run have no expiry after it began, whenever gc ran meanwhile.

    The run keeps its records (``PERSIST``) only once its record says running: were it
    the other way round, a gc pass between the two would see the ended record and give the
    live run's records back their expiry.
    """
    root = "resumed"
    await _ended_run(redis_url, key_prefix, root)
    named = Keys(key_prefix)
    events = named.events(root)
    client.xadd(events, {"control": "end", "status": "finished", "at": str(time.time())})
    client.expire(events, 3600)
    board = _GcAtBegin(redis_url, key_prefix=key_prefix)
    board.gc = lambda: collect(client, key_prefix=key_prefix, retention_s=3600)
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    retention = RedisRetention(redis_url, key_prefix=key_prefix, retention_s=3600)
    budget = WorkflowBudget(100, ledger=ledger, workflow_id=root)
    workflow = (
        Workflow.builder(LocalExecutor(budget=budget))
        .with_root_id(root)
        .with_budget(budget)
        .with_cancel_board(board)
        .with_retention(retention)
        .build()
    )
    try:
        async with workflow:
            assert client.hget(named.workflow(root), "status") == b"running"
            account, settled = named.budget(root)[0], named.budget(root)[3]
            ttls = {key: client.ttl(key) for key in (events, account, settled)}
            assert set(ttls.values()) == {-1}, ttls
    finally:
        for part in (board, ledger, retention):
            await part.close()
    assert 0 < client.ttl(events) <= 3600  # its end gave them their expiry again


def test_gc_removes_budget_parts_whose_account_is_gone_and_keeps_live_accounts(
    client: redis.Redis, key_prefix: str
) -> None:
    """Parts a late settle wrote after the account hash went are removed; an account stays."""
    named = Keys(key_prefix)
    _account, held, _leases, settled, _children = named.budget("orphan")
    client.hset(settled, "late-1", "5|0")
    client.hset(held, "late-2", "5|0|h")
    team = named.budget("team:live")
    client.hset(team[0], mapping={"limit": 1000, "consumed": 5})
    client.hset(team[3], "r1", "5|0")
    report = collect(client, key_prefix=key_prefix, retention_s=3600)
    assert report.workflows == ["orphan"] and report.keys == 2 and report.bytes > 0
    assert not client.exists(settled, held)
    assert client.exists(team[0], team[3]) == 2


def test_gc_gives_reply_lists_and_pipeline_hashes_without_an_expiry_one(
    client: redis.Redis, key_prefix: str
) -> None:
    """A reply list a late worker pushed to after its host left gets an expiry; others stay."""
    named = Keys(key_prefix)
    stray, live, pipe = named.reply("host-gone"), named.reply("host-live"), named.pipe("p1")
    foreign = f"{key_prefix}-other:reply:host-gone"
    client.rpush(stray, "notice")
    client.rpush(live, "notice")
    client.expire(live, 50)
    client.hset(pipe, "ctx", "{}")
    client.rpush(foreign, "notice")
    try:
        report = collect(client, key_prefix=key_prefix, retention_s=3600)
        assert report.loose_expired == 2
        assert 0 < client.ttl(stray) <= REPLY_TTL_S and 0 < client.ttl(pipe) <= REPLY_TTL_S
        assert 0 < client.ttl(live) <= 50
        assert client.ttl(foreign) == -1
    finally:
        client.delete(foreign)


async def test_gc_drops_the_breakdown_of_gone_workflows_from_a_team_account(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """Fields of children whose account is gone leave ``children``; the team's totals stay."""
    ledger = RedisLedger(redis_url, key_prefix=key_prefix)
    board = RedisRunRegistry(redis_url, key_prefix=key_prefix)
    named = Keys(key_prefix)
    try:
        await set_account(ledger, "team:t", limit_tokens=1_000)
        for child, tokens in (("expired", 7), ("pruned", 11), ("live", 13)):
            budget = WorkflowBudget(100, ledger=ledger, workflow_id=child, parents=["team:t"])
            await (await budget.reserve(tokens, holder="h")).settle(tokens)
        await board.begin("pruned", "r1")
        await board.end("pruned", "r1", "finished")
        await board.begin("live", "r2")
        client.delete(*named.budget("expired"))  # what its retention does
        before = await ledger.state("team:t")
        report = collect(client, key_prefix=key_prefix, retention_s=1, now=time.time() + 60)
        assert report.workflows == ["pruned"] and report.children_pruned == 2
        assert [c.workflow_id for c in await ledger.children("team:t")] == ["live"]
        after = await ledger.state("team:t")
        assert (after.consumed, after.limit) == (before.consumed, before.limit) == (31, 1_000)
        assert client.exists(named.budget("live")[0])
    finally:
        await ledger.close()
        await board.close()


async def test_a_workflow_built_with_redis_places_gets_retention_by_default(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """No ``with_retention``: the ended run's records still expire; ``None`` opts out."""
    ttls: dict[str, int] = {}
    for root, opt_out in (("default", False), ("opted-out", True)):
        store = RedisCheckpointStore(redis_url, key_prefix=key_prefix)
        board = RedisRunRegistry(redis_url, key_prefix=key_prefix)
        builder = (
            Workflow.builder(LocalExecutor())
            .with_root_id(root)
            .with_store(store)
            .with_cancel_board(board)
            .with_event_stream(redis_url, key_prefix=key_prefix)
        )
        if opt_out:
            builder = builder.with_retention(None)
        try:
            async with builder.build():
                pass
        finally:
            await store.close()
            await board.close()
        ttls[root] = client.ttl(Keys(key_prefix).events(root))
    assert 0 < ttls["default"] <= DEFAULT_RETENTION_S and ttls["opted-out"] == -1
