"""Retention: what Redis keeps of a workflow once it has ended, and for how long.

Every key fleet writes for one workflow is named in **one list**, :func:`workflow_keys`
(add a new per-workflow key there and both the end-of-run expiry and ``fleet gc`` cover
it: gc scans the namespaces of that list, :data:`OWNED_NAMESPACES`;
``tests/test_gc.py`` fails when :class:`~fleet.redis.keys.Keys` names a key tagged
with a workflow's root that the list misses). ``P`` is the key prefix, ``{R}`` the
workflow's root id as its hash tag (:mod:`fleet.redis.keys`):

=============================================  =============================================
``P:events:{R}``                                the run's event stream
``P:deltas:{R}``                                its live output deltas (they expire a day after
                                                the last; retention only ever shortens that)
``P:budget:{R}:account|held|leases|settled|``   the workflow's own budget account (a shared
``children``                                    account, one others draw from, is never
                                                expired: it is not the workflow's)
``P:workflow:{R}``                              the run record (``fleet status``, cancel)
``P:asks:{R}``                                  its durable waits (``Workflow.ask``)
``P:steps:{R}``                                 the Celery host's step record: done-markers,
                                                which dispatches ended (exactly-once)
``P:journal:{R}/PHASE``                         the phase journals the run wrote
``P:cancel:{RUN}``                              the run's cancel marker (only ever lengthened:
                                                it must outlive the run's queued messages)
=============================================  =============================================

A workflow that **ended** (finished, failed or cancelled) gets ``retention_s`` on all of
them in one script (:meth:`RedisRetention.expire`); a **running** one has none (its
budget must survive a crash and a resume), and a run that begins again clears the expiry
its predecessor left (:meth:`RedisRetention.keep`). A run that stopped without ending
(``closed``: its host went away, journals kept) keeps everything until ``fleet gc
--older-than`` says otherwise (:mod:`fleet.gc`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import mask_url
from .redis.clients import broker_call, per_loop
from .redis.keys import Keys
from .redis.scripts import script

__all__ = [
    "DEFAULT_RETENTION_S",
    "ENDED",
    "OWNED_NAMESPACES",
    "RedisRetention",
    "workflow_keys",
]

DEFAULT_RETENTION_S = 7 * 86_400
"""Seven days: Temporal's default namespace retention, long enough to inspect and resume a
run after a weekend, short enough that a fleet's Redis holds a week of history."""

ENDED = frozenset({"finished", "failed", "cancelled"})
"""The run states after which retention applies (``closed`` is not one: it may resume)."""

RECORD, ACCOUNT, MARKER, LIVE = "r", "a", "m", "l"
"""How the retention script treats a key: expire it; the first of an account's five keys
(skipped when the account is shared); a cancel marker (never shortened); live data with an
expiry of its own (never lengthened, never kept)."""


def workflow_keys(
    root_id: str,
    *,
    key_prefix: str = "fleet",
    journals: Sequence[str] = (),
    accounts: Sequence[str] = (),
    run_id: str | None = None,
) -> list[tuple[str, str]]:
    """Every key fleet writes for the workflow ``root_id``, each with how retention treats it.

    Args:
        root_id: the workflow's root id.
        key_prefix: the fleet's key prefix.
        journals: the phase journal ids the run wrote (``ROOT/PHASE``).
        accounts: budget accounts of the run besides ``root_id``'s own (a budget whose
            ``workflow_id`` is not the root id).
        run_id: the run whose cancel marker to include.

    Returns:
        ``(key, kind)`` pairs, kind one of ``"r"`` (a record), ``"a"`` (the first of an
        account's five keys), ``"m"`` (a cancel marker) or ``"l"`` (live data).
    """
    named = Keys(key_prefix)
    keys = [
        (named.events(root_id), RECORD),
        (named.workflow(root_id), RECORD),
        (named.asks(root_id), RECORD),
        (named.deltas(root_id), LIVE),
        (named.steps(root_id), RECORD),
    ]
    kinds = [ACCOUNT, RECORD, RECORD, RECORD, RECORD]
    for account in dict.fromkeys([root_id, *accounts]):
        keys.extend(zip(named.budget(account), kinds, strict=True))
    keys.extend((named.journal(journal), RECORD) for journal in journals)
    if run_id is not None:
        keys.append((named.cancel(run_id), MARKER))
    return keys


OWNED_NAMESPACES = tuple(
    dict.fromkeys(key.split(":")[1] for key, _kind in workflow_keys("root", journals=["root"]))
)
"""The key namespaces of :func:`workflow_keys`: the ones ``fleet gc`` groups by root id."""


class RedisRetention:
    """Sets (and clears) the expiry of everything a workflow wrote to the fleet's Redis.

    Args:
        url: the Redis URL (``FLEET_REDIS_URL``; Sentinel URLs too).
        key_prefix: the fleet's key prefix.
        retention_s: how long an ended workflow's records are kept
            (``FleetSettings.retention_s``).

    Works from any event loop (a client per loop, made on first use).
    """

    def __init__(
        self, url: str, *, key_prefix: str = "fleet", retention_s: int = DEFAULT_RETENTION_S
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.retention_s = int(retention_s)
        self._clients = per_loop(url)

    def __repr__(self) -> str:
        return (
            f"RedisRetention({mask_url(self.url)!r}, key_prefix={self.key_prefix!r}, "
            f"retention_s={self.retention_s})"
        )

    async def expire(
        self,
        root_id: str,
        *,
        run_id: str | None = None,
        journals: Sequence[str] = (),
        accounts: Sequence[str] = (),
    ) -> int:
        """The run ended: keep its records :attr:`retention_s` more, then Redis drops them.

        Returns:
            How many keys got the expiry.

        Raises:
            BrokerError: Redis could not be reached.
        """
        keys = workflow_keys(
            root_id, key_prefix=self.key_prefix, journals=journals, accounts=accounts, run_id=run_id
        )
        return await self._retain(keys, max(self.retention_s, 1))

    async def keep(
        self, root_id: str, *, journals: Sequence[str] = (), accounts: Sequence[str] = ()
    ) -> int:
        """The workflow runs (again): its records keep no expiry an earlier end left.

        Raises:
            BrokerError: Redis could not be reached.
        """
        keys = workflow_keys(
            root_id, key_prefix=self.key_prefix, journals=journals, accounts=accounts
        )
        return await self._retain(keys, 0)

    async def _retain(self, keys: list[tuple[str, str]], ttl_s: int) -> int:
        client = self._clients.get()
        retain = script("retain").run(
            client, [key for key, _kind in keys], [ttl_s, *(kind for _key, kind in keys)]
        )
        touched = await broker_call(self.url, "set the retention of workflow records", retain)
        return int(touched)

    async def aclose(self) -> None:
        """Close this loop's connection (the object stays usable)."""
        await self._clients.aclose()

    close = aclose
