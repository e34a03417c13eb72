"""The run registry: the one record of a workflow run, and where a cancel is left for it.

A run registers itself (:meth:`RunRegistry.begin`) under its root id with its run id,
the one id the run carries everywhere: its run log's start and end entries
(:mod:`fleet.runlog`), the local run index (:mod:`fleet.runs.index`), its cancel marker
and the dashboard. ``fleet cancel ROOT_ID`` (:meth:`RunRegistry.request`) finds the live
run of that root id, marks it cancelled (when and why, for ``fleet status``) and leaves a
*cancel marker* named by the run id, with a TTL. The host polls it
(:meth:`RunRegistry.check`); workers read the same marker in Redis when they claim or
run a step of that run. The cancel board of :mod:`fleet.cancel` is this registry.

A cancel is not a tombstone: the marker names one run, and running the same root id
again begins a new run with a new id, which no earlier marker touches.

A running run's host *heartbeats* its record (:meth:`RunRegistry.heartbeat`) every
:data:`HEARTBEAT_S`; a record still ``running`` whose last beat is older than
:data:`HEARTBEAT_LAPSE_S` reads as ``abandoned`` (:attr:`RunRecord.shown_status`): its
host died (SIGKILL, power loss) without recording an end. ``fleet status``, ``fleet
watch``, ``fleet cancel`` and the dashboard all read it from here.

Registries: :class:`MemoryRunRegistry` (this process), ``RedisRunRegistry`` (the fleet's
Redis, what workers read) and ``SQLiteRunRegistry`` (the embedded default's journal file,
for a local run another terminal cancels).
"""

from __future__ import annotations

import builtins
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Literal

from ..redis.keys import Keys
from ..spec import FleetModel

__all__ = [
    "CANCEL_TTL_S",
    "HEARTBEAT_LAPSE_S",
    "HEARTBEAT_S",
    "CancelNotice",
    "MemoryRunRegistry",
    "RunRecord",
    "RunRegistry",
    "RunState",
    "ShownState",
    "cancel_marker_key",
    "new_run_id",
    "newest_first",
    "run_record_key",
]

CANCEL_TTL_S = 86_400
"""How long a cancel marker lives: longer than any message of the run waits in a queue."""

HEARTBEAT_S = 2.0
"""How often a running workflow's host refreshes its run record (its heartbeat)."""

HEARTBEAT_LAPSE_S = 15.0
"""A ``running`` record not refreshed for this long reads as ``abandoned``: its host is
gone. Seven missed beats, so a host that is only busy or slow is not taken for dead."""

RunState = Literal["running", "cancelled", "finished", "failed", "closed"]
"""A run's state: ``running``; ``cancelled`` (by anyone, with when and why); ``finished``
(succeeded, journals cleared); ``failed`` (the program raised); ``closed`` (stopped
without finishing, journals kept)."""

ShownState = Literal["running", "cancelled", "finished", "failed", "closed", "abandoned"]
"""A :data:`RunState` as a reader sees it: ``abandoned`` is a ``running`` record whose
host stopped heartbeating (never written, always derived)."""


def new_run_id() -> str:
    """A fresh run id (``r-`` and 24 hex digits)."""
    return f"r-{uuid.uuid4().hex[:24]}"


def run_record_key(root_id: str, *, key_prefix: str = "fleet") -> str:
    """The Redis hash that records the latest run of ``root_id``."""
    return Keys(key_prefix).workflow(root_id)


def cancel_marker_key(marker: str, *, key_prefix: str = "fleet") -> str:
    """The Redis key whose presence cancels every step message carrying ``marker``."""
    return Keys(key_prefix).cancel(marker)


class CancelNotice(FleetModel):
    """What a cancel marker says."""

    root_id: str
    """The workflow's root id."""
    run_id: str
    """The run it cancels."""
    reason: str
    """Why (``fleet cancel --reason``, ``Workflow.cancel(reason)``)."""
    at: float
    """When, in seconds since the epoch."""


class RunRecord(FleetModel):
    """The latest run of a root id, as ``fleet status`` shows it."""

    root_id: str
    run_id: str
    status: RunState
    started_at: float
    """When the run began (seconds since the epoch)."""
    ended_at: float | None = None
    """When it ended or was cancelled."""
    reason: str | None = None
    """Why it was cancelled."""
    beat_at: float | None = None
    """The host's last heartbeat, on the board's clock (``None``: none recorded)."""
    read_at: float | None = None
    """The board's clock when the record was read (``None``: this machine's clock then)."""

    @property
    def silent_s(self) -> float:
        """Seconds since the host's last heartbeat (since the start when it never beat)."""
        now = self.read_at if self.read_at is not None else time.time()
        return max(now - (self.beat_at or self.started_at), 0.0)

    @property
    def abandoned(self) -> bool:
        """Whether the record says ``running`` but its host stopped heartbeating."""
        return self.status == "running" and self.silent_s > HEARTBEAT_LAPSE_S

    @property
    def shown_status(self) -> ShownState:
        """The status to show: :attr:`status`, or ``abandoned``."""
        return "abandoned" if self.abandoned else self.status

    def describe(self) -> str:
        """One line: ``cancelled at 12:00:01 (reason)``, ``running since ...``, ..."""

        def clock(at: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

        if self.abandoned:
            return (
                f"abandoned: its host stopped heartbeating {self.silent_s:.0f} s ago (a "
                f"running host beats every {HEARTBEAT_S:g} s; silent for more than "
                f"{HEARTBEAT_LAPSE_S:g} s means it is gone); started {clock(self.started_at)} "
                f"(run {self.run_id})"
            )
        if self.status == "running":
            return f"running since {clock(self.started_at)} (run {self.run_id})"
        text = f"{self.status} at {clock(self.ended_at or self.started_at)}"
        if self.status == "cancelled":
            text += f": {self.reason or 'no reason given'}"
        return text + f" (run {self.run_id})"


class RunRegistry(ABC):
    """Records workflow runs (one record per root id: its latest run) and carries cancels."""

    @abstractmethod
    async def begin(self, root_id: str, run_id: str) -> None:
        """Register ``run_id`` as the live run of ``root_id`` (superseding any earlier run)."""

    @abstractmethod
    async def heartbeat(self, root_id: str, run_id: str) -> None:
        """Refresh the heartbeat of the live run ``run_id`` (nothing if it is not live)."""

    @abstractmethod
    async def request(
        self, root_id: str, reason: str, *, run_id: str | None = None
    ) -> CancelNotice | None:
        """Cancel the live run of ``root_id`` and leave its marker.

        Args:
            root_id: the workflow.
            reason: why; shown by ``fleet status`` and in the ``workflow_cancelled`` event.
            run_id: cancel only this run (``None``: whichever run is live).

        Returns:
            The notice left, or ``None`` when no such run is live (unknown root id,
            finished, already cancelled): nothing is changed then.
        """

    @abstractmethod
    async def check(self, run_id: str) -> CancelNotice | None:
        """The cancel marker of ``run_id``, if one was left."""

    @abstractmethod
    async def end(self, root_id: str, run_id: str, status: RunState) -> None:
        """Record how the run ended; a cancelled run stays ``cancelled`` (when and why kept)."""

    @abstractmethod
    async def latest(self, root_id: str) -> RunRecord | None:
        """The latest run of ``root_id``, if any is recorded."""

    @abstractmethod
    async def list(self, *, limit: int = 100) -> builtins.list[RunRecord]:
        """The latest run of each recorded root id, newest start first, at most ``limit``."""

    async def beat(self, root_id: str, run_id: str) -> None:
        """:meth:`heartbeat` under the cancel board's name for it."""
        await self.heartbeat(root_id, run_id)

    async def record(self, root_id: str) -> RunRecord | None:
        """:meth:`latest` under the cancel board's name for it."""
        return await self.latest(root_id)

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections (the registry stays usable)."""


def newest_first(records: Iterable[RunRecord], limit: int) -> list[RunRecord]:
    """``records`` by start, newest first, at most ``limit`` of them."""
    return sorted(records, key=lambda record: record.started_at, reverse=True)[: max(limit, 0)]


class MemoryRunRegistry(RunRegistry):
    """A registry in this process's memory: cancels reach only this process's runs."""

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._markers: dict[str, CancelNotice] = {}

    def __repr__(self) -> str:
        return f"MemoryRunRegistry(runs={len(self._runs)})"

    async def begin(self, root_id: str, run_id: str) -> None:
        """Register the live run."""
        now = time.time()
        self._runs[root_id] = RunRecord(
            root_id=root_id, run_id=run_id, status="running", started_at=now, beat_at=now
        )

    async def heartbeat(self, root_id: str, run_id: str) -> None:
        """Refresh the live run's heartbeat."""
        record = self._runs.get(root_id)
        if record is not None and record.run_id == run_id and record.status == "running":
            self._runs[root_id] = record.model_copy(update={"beat_at": time.time()})

    async def request(
        self, root_id: str, reason: str, *, run_id: str | None = None
    ) -> CancelNotice | None:
        """Cancel the live run; ``None`` when there is none."""
        record = self._runs.get(root_id)
        if record is None or record.status != "running":
            return None
        if run_id is not None and record.run_id != run_id:
            return None
        notice = CancelNotice(root_id=root_id, run_id=record.run_id, reason=reason, at=time.time())
        self._runs[root_id] = record.model_copy(
            update={"status": "cancelled", "ended_at": notice.at, "reason": reason}
        )
        self._markers[record.run_id] = notice
        return notice

    async def check(self, run_id: str) -> CancelNotice | None:
        """The marker of ``run_id``."""
        return self._markers.get(run_id)

    async def end(self, root_id: str, run_id: str, status: RunState) -> None:
        """Record the end of the run (a cancelled one stays cancelled)."""
        record = self._runs.get(root_id)
        if record is None or record.run_id != run_id or record.status != "running":
            return
        self._runs[root_id] = record.model_copy(update={"status": status, "ended_at": time.time()})

    async def latest(self, root_id: str) -> RunRecord | None:
        """The latest run."""
        return self._runs.get(root_id)

    async def list(self, *, limit: int = 100) -> builtins.list[RunRecord]:
        """The latest run of each root id, newest first."""
        return newest_first(self._runs.values(), limit)
