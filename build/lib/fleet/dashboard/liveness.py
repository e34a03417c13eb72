"""Which running workflows on the dashboard lost their host: the run records' heartbeats.

A run's log says ``running`` until its host writes the end; a host that died (SIGKILL,
power loss) never does. Its run record on the cancel board stops heartbeating instead
(:data:`fleet.cancel.HEARTBEAT_S`, lapsed after :data:`fleet.cancel.HEARTBEAT_LAPSE_S`),
and :class:`Liveness` reads it for every view the log calls running.
"""

from __future__ import annotations

import time

from ..cancel import HEARTBEAT_S, CancelBoard, RunRecord, open_cancel_board
from ..errors import FleetError
from .views import WorkflowView

__all__ = ["Liveness", "board_for"]


def board_for(url: str, key_prefix: str) -> CancelBoard:
    """The cancel board beside a log place (``sqlite:PATH`` or the fleet's Redis)."""
    if url.startswith("sqlite:"):
        return open_cancel_board(url, key_prefix=key_prefix)
    return open_cancel_board("memory", redis_url=url, key_prefix=key_prefix)


class Liveness:
    """Marks running views ``abandoned`` when their run record's heartbeat lapsed.

    Each root id's record is read at most once per :data:`~fleet.cancel.HEARTBEAT_S`.

    Args:
        key_prefix: the fleet's key prefix.
    """

    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix
        self._checked: dict[str, float] = {}

    async def mark(self, view: WorkflowView, url: str) -> None:
        """Set ``view.abandoned`` from the run record at ``url`` (a log place)."""
        if view.ended_as is not None:
            view.abandoned = None
            return
        now = time.monotonic()
        if now - self._checked.get(view.root_id, float("-inf")) < HEARTBEAT_S:
            return
        self._checked[view.root_id] = now
        record = await self._record(url, view.root_id)
        started = view.started_at or 0.0
        # A record older than the log's run belongs to an earlier run: it proves nothing.
        same_run = record is not None and record.started_at >= started - 60.0
        abandoned = record.describe() if same_run and record and record.abandoned else None
        if abandoned != view.abandoned:
            view.abandoned = abandoned
            view.version += 1  # the live page sends the change

    async def _record(self, url: str, root_id: str) -> RunRecord | None:
        board = board_for(url, self.key_prefix)
        try:
            return await board.record(root_id)
        except FleetError:
            return None  # an unreadable board proves nothing
        finally:
            await board.close()
