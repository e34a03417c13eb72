"""A round's part of its owner's step record: what exactly-once needs once results are read.

A worker records each outcome under ``result(tid, nonce)`` (one key per step) for the host
to read. Once the host has read it, the key is only kept :data:`RESULT_GRACE_S` more; a
late duplicate of the dispatch is refused by a field of the owner's step record
(:meth:`~fleet.redis.keys.Keys.steps`, one hash per workflow) instead:

* ``ran:{tid}`` = nonce, as soon as the host has the step's outcome;
* at the round's end, ``over:{nonce}`` replaces the round's ``ran:`` and ``done:`` fields,
  so an ended round costs one field, however many steps it had.

The owner is the workflow's root id (its record expires with the workflow's retention,
:mod:`fleet.retention`), or the round's nonce outside a workflow (that record expires
``result_expires_s`` after the round's last word).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..redis.keys import Keys
from .protocol import RESULT_GRACE_S

if TYPE_CHECKING:
    from ..cancel.signal import Cancellation

__all__ = ["StepRecord", "record_owner", "result_grace_s"]

_CHUNK = 1000
"""Fields per ``HDEL`` at a round's end."""


def result_grace_s(retention_s: int) -> int:
    """How long a read result stays.

    :data:`RESULT_GRACE_S`, never longer than the retention of the workflow it belongs to.
    """
    return max(min(RESULT_GRACE_S, retention_s), 1)


def record_owner(
    cancellation: Cancellation | None, workflow_id: str | None, nonce: str
) -> tuple[str, bool]:
    """Whose step record a round uses, and whether that owner is the round itself.

    The workflow run's root id when the round runs inside one, else the root of its
    journal's workflow id, else the round's own nonce.
    """
    if cancellation is not None and cancellation.root_id:
        return cancellation.root_id, False
    if workflow_id is not None:
        return workflow_id.partition("/")[0], False
    return nonce, True


class StepRecord:
    """One round's fields in its owner's step record, written in batches."""

    def __init__(
        self, keys: Keys, owner: str, nonce: str, *, bare: bool, keep_s: int, grace_s: int
    ) -> None:
        self.keys = keys
        self.owner = owner
        self.key = keys.steps(owner)
        self.nonce = nonce
        self.bare = bare
        """The record belongs to this round alone: it expires ``keep_s`` after its last word."""
        self.keep_s = keep_s
        self.grace_s = grace_s
        """How long a read result stays (see :func:`result_grace_s`)."""
        self._read: list[str] = []

    def read(self, tid: str) -> None:
        """The host has the outcome of step ``tid`` (noted on the next :meth:`flush`)."""
        self._read.append(tid)

    async def flush(self, client: Any) -> None:
        """Mark the steps read since the last flush; let their results go."""
        if not self._read:
            return
        read, self._read = self._read, []
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping={f"ran:{tid}": self.nonce for tid in read})
            for tid in read:
                pipe.expire(self.keys.result(tid, self.nonce), self.grace_s)
            if self.bare:
                pipe.expire(self.key, self.keep_s)
            await pipe.execute()

    async def close(self, client: Any, tids: Sequence[str]) -> None:
        """The round ended: one ``over`` field answers for all of ``tids`` from now on."""
        read, self._read = self._read, []
        fields = [f"{kind}:{tid}" for tid in tids for kind in ("ran", "done")]
        async with client.pipeline(transaction=False) as pipe:
            for tid in read:
                pipe.expire(self.keys.result(tid, self.nonce), self.grace_s)
            pipe.hset(self.key, f"over:{self.nonce}", "1")
            for start in range(0, len(fields), _CHUNK):
                pipe.hdel(self.key, *fields[start : start + _CHUNK])
            if self.bare:
                pipe.expire(self.key, self.keep_s)
            await pipe.execute()
