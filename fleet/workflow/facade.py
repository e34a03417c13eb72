"""The :class:`Workflow` facade and its :class:`WorkflowBuilder`.

The builder configures a run (store, budget, root id, run id, cancel board, retention,
event stream) and builds its :class:`~fleet.workflow.run.WorkflowRun`; :class:`Workflow`
is the handle a program holds: the verbs (:mod:`fleet.workflow.verbs`), the lifecycle
(:mod:`fleet.workflow.lifecycle`), and here its properties, ``subscribe`` and ``log``.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..eventbus import (
    DEFAULT_DELTA_SUBSCRIBER_CAPACITY,
    DEFAULT_SUBSCRIBER_CAPACITY,
    BufferedLog,
    EventStream,
    Subscription,
    event_stream_key,
)
from ..events import EventSink, LogEvent
from ..executor import AgentExecutor
from ..runs import RunRegistry, new_run_id
from .run import WorkflowRun
from .verbs import WorkflowVerbs

if TYPE_CHECKING:
    from ..budget import BudgetSnapshot, WorkflowBudget
    from ..retention import RedisRetention
    from ..stores import CheckpointStore

__all__ = ["Workflow", "WorkflowBuilder"]

logger = logging.getLogger(__name__)


def _json_safe(fields: dict[str, Any]) -> dict[str, Any]:
    try:
        safe = json.loads(json.dumps(fields, default=str))
    except (TypeError, ValueError):
        safe = {str(key): repr(value) for key, value in fields.items()}
    return safe if isinstance(safe, dict) else {}


@dataclass(frozen=True)
class WorkflowBuilder:
    """Configures a :class:`Workflow`; each ``with_*`` returns a new builder.

    Args:
        executor: the host every step runs on.
    """

    executor: AgentExecutor
    store: CheckpointStore | None = None
    budget: WorkflowBudget | None = None
    root_id: str | None = None
    step_events: EventSink | None = None
    event_stream_url: str | None = None
    event_stream_prefix: str = "fleet"
    event_stream_maxlen: int = 10_000
    cancel_board: RunRegistry | None = None
    retention: RedisRetention | None = None
    retention_default: bool = True
    """Without :meth:`with_retention`, set one up on the Redis the run writes to."""
    run_id: str | None = None

    def with_store(self, store: CheckpointStore) -> WorkflowBuilder:
        """Journal every phase in ``store``, making phases resume boundaries."""
        return replace(self, store=store)

    def with_budget(self, budget: WorkflowBudget) -> WorkflowBuilder:
        """Report on ``budget`` (snapshots, the ``budget_exhausted`` event).

        The workflow only reads it: enforcement is the executor's, so give the
        executor the same budget (``LocalExecutor(budget=...)``).
        """
        return replace(self, budget=budget)

    def with_root_id(self, root_id: str) -> WorkflowBuilder:
        """Name the workflow; the same root id on a later run resumes its journals."""
        if not isinstance(root_id, str) or not root_id.strip():
            raise ValueError(f"root_id must be a non-empty string, got {root_id!r}")
        return replace(self, root_id=root_id)

    def with_step_events(self, sink: EventSink) -> WorkflowBuilder:
        """Also hand every step event the executor emits to ``sink``."""
        return replace(self, step_events=sink)

    def with_cancel_board(self, board: RunRegistry) -> WorkflowBuilder:
        """Register the run on ``board`` so ``fleet cancel ROOT_ID`` reaches it.

        The run registers when its first verb starts, polls the board for a cancel every
        :data:`~fleet.workflow.lifecycle.CANCEL_POLL_S` while it is open, and records how it
        ended (``fleet status``). Use a ``RedisRunRegistry`` (:mod:`fleet.runs`) on the
        fleet's Redis for a Celery run.
        """
        return replace(self, cancel_board=board)

    def with_run_id(self, run_id: str) -> WorkflowBuilder:
        """Give the run this id (default: a fresh :func:`fleet.runs.new_run_id` per build).

        The id names the run everywhere: its run registry record and cancel marker, its
        run log's start and end entries. ``fleet run`` mints it so its run index notes it
        too. Build one workflow per id: a second build would be a second run under it.
        """
        if not isinstance(run_id, str) or not run_id.strip():
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        return replace(self, run_id=run_id)

    def with_retention(self, retention: RedisRetention | None) -> WorkflowBuilder:
        """Keep the run's Redis records only ``retention.retention_s`` once it has ended.

        When the run ends (finished, failed or cancelled) its events, budget account,
        run record, phase journals and step record get that expiry in one script; while
        it runs (and when it begins again) they have none; see :mod:`fleet.retention`.

        Without this call, a run given a Redis journal, cancel board, ledger or event
        stream gets one on that Redis (its key prefix), keeping ended runs the executor's
        ``retention_s`` (a ``CeleryExecutor``'s settings), else seven days.
        ``with_retention(None)`` keeps everything until ``fleet gc`` removes it.
        """
        return replace(self, retention=retention, retention_default=False)

    def with_event_stream(
        self, url: str, *, key_prefix: str = "fleet", maxlen: int = 10_000
    ) -> WorkflowBuilder:
        """Also log events where another process can follow them (see :mod:`fleet.runlog`).

        ``url`` is a Redis URL (the stream ``{key_prefix}:events:{root_id}``) or
        ``sqlite:PATH`` (the ``fleet_events`` table of that file, e.g. the run's journal).
        The log keeps about ``maxlen`` entries per root id (``FleetSettings.
        event_stream_maxlen``) and a budget snapshot after each phase and at the end.
        Close the workflow (``async with`` / ``finish()`` / ``close()``) so the last
        events are flushed.
        """
        return replace(
            self,
            event_stream_url=url,
            event_stream_prefix=key_prefix,
            event_stream_maxlen=max(int(maxlen), 1),
        )

    def build(self) -> Workflow:
        """The workflow.

        Without :meth:`with_root_id`, a random ``wf-<uuid>`` root id is used, so a later
        run can never find this run's journals: resuming after a crash is impossible.
        """
        root_id = self.root_id or f"wf-{uuid.uuid4().hex}"
        run_id = self.run_id or new_run_id()
        stream: BufferedLog | None = None
        url = self.event_stream_url
        if url is not None and url.startswith("sqlite:"):
            from ..runlog import SQLiteEventLog

            stream = SQLiteEventLog(
                url.removeprefix("sqlite:"),
                root_id,
                maxlen=self.event_stream_maxlen,
                run_id=run_id,
            )
        elif url is not None:
            stream = EventStream(
                url,
                event_stream_key(root_id, key_prefix=self.event_stream_prefix),
                maxlen=self.event_stream_maxlen,
                run_id=run_id,
            )
        return Workflow(
            WorkflowRun(
                deltas=self.executor.delta_channel(root_id),
                executor=self.executor,
                store=self.store,
                budget=self.budget,
                root_id=root_id,
                step_events=self.step_events,
                stream=stream,
                board=self.cancel_board,
                run_id=run_id,
                **self._retention(),
            )
        )

    def _retention(self) -> dict[str, Any]:
        """The run's retention: the one given, else one on the Redis it writes to (owned)."""
        if self.retention is not None or not self.retention_default:
            return {"retention": self.retention}
        ledger = getattr(self.budget, "ledger", None)
        places = [
            found
            for found in map(_redis_place, (self.store, self.cancel_board, ledger))
            if found is not None
        ]
        stream = self.event_stream_url
        if stream is not None and not stream.startswith("sqlite:"):
            places.append((stream, self.event_stream_prefix))
        if not places:
            return {"retention": None}
        from ..retention import DEFAULT_RETENTION_S, RedisRetention

        url, prefix = places[0]
        settings = getattr(self.executor, "settings", None)
        keep_s = getattr(settings, "retention_s", DEFAULT_RETENTION_S)
        retention = RedisRetention(url, key_prefix=prefix, retention_s=keep_s)
        return {"retention": retention, "owns_retention": True}


_REDIS_PLACES = (
    ("fleet.stores.redis", "RedisCheckpointStore"),
    ("fleet.runs.redis", "RedisRunRegistry"),
    ("fleet.ledgers.redis", "RedisLedger"),
)


def _redis_place(place: object) -> tuple[str, str] | None:
    """``(url, key_prefix)`` of a Redis journal, run registry or ledger, else ``None``.

    Without importing them (nor redis-py, which imports OpenTelemetry when it finds it): a
    class whose module is not loaded has no instance.
    """
    for module, name in _REDIS_PLACES:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(place, getattr(loaded, name)):
            found: Any = place
            return str(found.url), str(found.key_prefix)
    return None


class Workflow(WorkflowVerbs):
    """The facade a workflow program is written against.

    Build one with :meth:`builder`. Copies (:meth:`copy`) are cheap handles on the same
    run: they share the event bus, store, budget and phase numbering, so a helper that
    runs its own phases keeps the numbering consistent. Use ``async with workflow:``
    (or call :meth:`finish`) so journals are cleared once the program succeeded.
    """

    @staticmethod
    def builder(executor: AgentExecutor) -> WorkflowBuilder:
        """Start configuring a workflow over ``executor``."""
        return WorkflowBuilder(executor)

    def copy(self) -> Workflow:
        """Another handle on the same run (shared bus, store, budget, numbering)."""
        return Workflow(self._run)

    __copy__ = copy

    def __repr__(self) -> str:
        return f"Workflow(root_id={self._run.root_id!r}, phases={self._run.phase_count})"

    @property
    def root_id(self) -> str:
        """The workflow's stable id (journal keys, budget, event stream)."""
        return self._run.root_id

    @property
    def executor(self) -> AgentExecutor:
        """The host steps run on."""
        return self._run.executor

    @property
    def store(self) -> CheckpointStore | None:
        """The journal phases are kept in, if any."""
        return self._run.store

    @property
    def budget(self) -> WorkflowBudget | None:
        """The budget this workflow reports on, if any."""
        return self._run.budget

    @property
    def closed(self) -> bool:
        """Whether :meth:`finish` or :meth:`close` ran."""
        return self._run.closed

    def subscribe(self, *, capacity: int | None = None, deltas: bool = False) -> Subscription:
        """Receive every event sent from now on (see :class:`Subscription`).

        With ``deltas``, also the ``step_delta`` events of running steps: the text their
        agents produce as they produce it (:meth:`fleet.AgentContext.emit_delta`, an
        OpenAI-compatible agent with ``stream = true``). Every delta of a step is
        delivered before the subscription ends, unless the subscriber fell behind (a
        ``lagged`` marker names the steps that lost some); fold them, markers included,
        with :class:`fleet.deltas.LiveText`, which marks such a step's text incomplete.

        Args:
            capacity: events that may wait before the oldest are dropped (default
                :data:`~fleet.eventbus.DEFAULT_SUBSCRIBER_CAPACITY`, with ``deltas``
                :data:`~fleet.eventbus.DEFAULT_DELTA_SUBSCRIBER_CAPACITY`).
            deltas: also receive ``step_delta`` events.
        """
        if capacity is None:
            capacity = DEFAULT_DELTA_SUBSCRIBER_CAPACITY if deltas else DEFAULT_SUBSCRIBER_CAPACITY
        subscription = self._run.bus.subscribe(capacity, deltas=deltas)
        if deltas:
            self._run.read_deltas()
        return subscription

    async def budget_snapshot(self) -> BudgetSnapshot | None:
        """The budget's current figures, or ``None`` when no budget is attached."""
        if self._run.budget is None:
            return None
        return await self._run.budget.snapshot()

    @property
    def run_id(self) -> str:
        """This run's id: what a cancel marker names (a new run of the root id gets a new one)."""
        return self._run.run_id

    def log(self, level: str, message: str, **fields: Any) -> None:
        """Send a ``log`` event; never fails and never blocks.

        ``fields`` are made JSON-safe (values that JSON cannot hold become strings).
        """
        try:
            self._run.publish(
                LogEvent(level=str(level), message=str(message), fields=_json_safe(fields))
            )
        except Exception:
            logger.exception("Workflow.log could not send its event")
