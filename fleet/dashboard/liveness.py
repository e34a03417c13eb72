"""Which running workflows on the dashboard lost their host: the run records' heartbeats.

A run's log says ``running`` until its host writes the end; a host that died (SIGKILL,
power loss) never does. Its record in the run registry stops heartbeating instead
(:data:`fleet.runs.HEARTBEAT_S`, lapsed after :data:`fleet.runs.HEARTBEAT_LAPSE_S`),
and :class:`Liveness` reads it for every view the log calls running.
"""

from __future__ import annotations

import time

from ..errors import FleetError
from ..runs import HEARTBEAT_S, RunRecord, RunRegistry, open_run_registry
from .views import WorkflowView

__all__ = ["Liveness", "board_for"]


def board_for(url: str, key_prefix: str) -> RunRegistry:
    """The run registry beside a log place (``sqlite:PATH`` or the fleet's Redis)."""
    if url.startswith("sqlite:"):
        return open_run_registry(url, key_prefix=key_prefix)
    return open_run_registry("memory", redis_url=url, key_prefix=key_prefix)


class Liveness:
    """Marks running views ``abandoned`` when their run record's heartbeat lapsed.

    Each root id's record is read at most once per :data:`~fleet.runs.HEARTBEAT_S`.

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
        same_run = record is not None and _same_run(view, record)
        abandoned = record.describe() if same_run and record and record.abandoned else None
        if abandoned != view.abandoned:
            view.abandoned = abandoned
            view.version += 1  # the live page sends the change

    async def _record(self, url: str, root_id: str) -> RunRecord | None:
        board = board_for(url, self.key_prefix)
        try:
            return await board.latest(root_id)
        except FleetError:
            return None  # an unreadable board proves nothing
        finally:
            await board.close()


def _same_run(view: WorkflowView, record: RunRecord) -> bool:
    """Whether the record is of the run the view shows (another run's proves nothing)."""
    if view.run_id is not None and view.run_id.startswith("r-"):
        return record.run_id == view.run_id  # the log and the registry share the run's id
    # A log written before runs had one id: a record older than the log's run is another's.
    return record.started_at >= (view.started_at or 0.0) - 60.0
