"""How a workflow run begins, watches for a cancel, is cancelled, and ends.

:class:`WorkflowLifecycle` is the part of :class:`fleet.Workflow` that registers the run
on its cancel board and heartbeats it, cancels it (here and on every worker), and ends
it: ``finish`` (journals deleted), ``close`` (journals kept for a resume) or ``async
with``; the run's Redis records get their expiry then (:mod:`fleet.retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .. import telemetry
from ..errors import WorkflowClosedError
from ..events import WorkflowCancelled
from ..keeper import stop_task
from ..runs import HEARTBEAT_S, RunRegistry, RunState
from .run import WorkflowRun

if TYPE_CHECKING:
    from ..stores import CheckpointStore

__all__ = ["CANCEL_POLL_S", "WorkflowLifecycle"]

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.25
"""How often a running workflow looks at its cancel board for a ``fleet cancel``."""


class WorkflowLifecycle:
    """A handle on one run: its cancel state, its start, its cancel and its end."""

    def __init__(self, run: WorkflowRun) -> None:
        self._run = run

    @property
    def cancelled(self) -> bool:
        """Whether the workflow was cancelled (by this program, ``fleet cancel`` or its caller)."""
        return self._run.cancellation.cancelled

    @property
    def cancel_reason(self) -> str | None:
        """Why the workflow was cancelled (``None`` while it is not)."""
        return self._run.cancellation.reason

    def _check_open(self) -> None:
        if self._run.closed:
            raise WorkflowClosedError(self._run.root_id)

    def _trace(self) -> Any:
        """The workflow's span (opened on first use; ``None`` when tracing is off)."""
        run = self._run
        if run.span is None and not run.closed:
            run.span = telemetry.open_span(
                "workflow", {"fleet.workflow.id": run.root_id, "gen_ai.operation.name": "workflow"}
            )
        return run.span

    # ------------------------------------------------------------------ cancel

    async def cancel(self, reason: str = "cancelled by the workflow program") -> None:
        """Cancel the workflow, here and on every worker.

        Nothing new is dispatched; running steps are interrupted (within about 2 s on a
        Celery fleet) and come back ``error="cancelled"`` from the verbs awaiting them;
        their reservations are settled at what they used; completed steps stay
        journaled; a ``workflow_cancelled`` event is sent; any later verb raises
        :class:`~fleet.errors.WorkflowCancelledError`. Running the same root id again
        resumes. Idempotent.
        """
        await self._cancel(str(reason) or "cancelled")

    async def _cancel(self, reason: str, *, record: bool = True) -> None:
        run = self._run
        if run.closed or not run.cancellation.cancel(reason):
            return
        run.publish(WorkflowCancelled(reason=reason))
        if record and run.board is not None and run.begun:
            try:
                await asyncio.shield(run.board.request(run.root_id, reason, run_id=run.run_id))
            except Exception as error:
                logger.warning(
                    "workflow %r: cannot record the cancel on %r (%s: %s)",
                    run.root_id,
                    run.board,
                    type(error).__name__,
                    error,
                )

    async def _begin(self) -> None:
        """Register the run on its cancel board and start watching it for a cancel."""
        run = self._run
        run.begun = True
        registered = run.board is not None and await self._register(run.board)
        # Only once the record says running: a `fleet gc` that read the ended record
        # would otherwise restore (or prune) what an earlier end left on records just kept.
        await self._retain("keep")
        if registered and run.board is not None:
            run.watcher = asyncio.create_task(
                self._watch(run.board), name=f"fleet-cancel:{run.root_id}"
            )

    async def _register(self, board: RunRegistry) -> bool:
        """Record the run as running on ``board``; ``False`` (and a warning) when it cannot."""
        run = self._run
        try:
            await board.begin(run.root_id, run.run_id)
        except Exception as error:
            logger.warning(
                "workflow %r: cannot register on %r, so `fleet cancel` cannot reach it (%s: %s)",
                run.root_id,
                board,
                type(error).__name__,
                error,
            )
            return False
        return True

    async def _watch(self, board: RunRegistry) -> None:
        """Poll the board for a cancel, and heartbeat the run record every HEARTBEAT_S."""
        run = self._run
        warned = False
        beat_due = time.monotonic() + HEARTBEAT_S
        while not run.closed and not run.cancellation.cancelled:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                if time.monotonic() >= beat_due:
                    beat_due = time.monotonic() + HEARTBEAT_S
                    await board.heartbeat(run.root_id, run.run_id)
                    await run.record_live_budget()
                await self._heed(board)
            except Exception as error:
                if not warned:
                    warned = True
                    logger.warning(
                        "workflow %r: cannot read its cancel board: %s", run.root_id, error
                    )

    async def _heed(self, board: RunRegistry) -> None:
        """Look at the board once; cancel the run if a cancel is waiting there."""
        notice = await board.check(self._run.run_id)
        if notice is not None:
            await self._cancel(notice.reason, record=False)

    async def finish(self) -> None:
        """End the workflow successfully: delete this run's phase journals, then close.

        A cancelled workflow keeps its journals (a later run resumes it) and closes as
        ``cancelled``. Idempotent. After it, a run with the same root id starts from scratch.
        """
        run = self._run
        if run.closed:
            return
        if run.cancellation.cancelled:
            await self._shutdown("cancelled")
            return
        try:
            if run.store is not None:
                for journal in run.phase_journals:
                    await run.store.delete(journal)
                await self._clear_asks(run.store)
        finally:
            await self._shutdown("finished")

    async def _clear_asks(self, store: CheckpointStore) -> None:
        """Forget the run's asks and any early answer: a new run starts from scratch."""
        from ..asks import ask_book_for

        book = self._run.ask_book or ask_book_for(store)
        try:
            await book.clear(self._run.root_id)
        finally:
            await book.close()

    async def close(self) -> None:
        """End this process's part without finishing: journals are kept for a resume.

        Ends every subscription (after its waiting events) and flushes the event stream.
        Idempotent.
        """
        await self._shutdown("cancelled" if self.cancelled else "closed")

    async def _shutdown(self, status: RunState) -> None:
        run = self._run
        if run.closed:
            return
        run.closed = True
        if run.span is not None:
            run.span.set_attribute("fleet.workflow.status", status)
            run.span.end()
        if run.watcher is not None:
            # It polls the board and stops once the run is closed; a cancel swallowed
            # inside a Redis call must not keep the workflow from closing.
            await stop_task(run.watcher)
        if run.ask_book is not None:
            with contextlib.suppress(Exception):  # closing only releases a connection
                await run.ask_book.close()
        if run.board is not None and run.begun:
            try:
                await run.board.end(run.root_id, run.run_id, status)
            except Exception as error:
                logger.warning("workflow %r: cannot record its end: %s", run.root_id, error)
        await run.stop_deltas()
        run.bus.close()
        if run.stream is not None:
            await run.record_budget()
            await run.stream.close(status)
        if status in ("finished", "failed", "cancelled"):
            await self._retain("expire", journals=run.phase_journals, run_id=run.run_id)
        if run.owns_retention and run.retention is not None:
            with contextlib.suppress(Exception):  # closing only releases a connection
                await run.retention.aclose()

    async def _retain(self, action: str, **keys: Any) -> None:
        """Keep (``"keep"``) or expire (``"expire"``) the run's Redis records; never fails."""
        run = self._run
        if run.retention is None:
            return
        budget = run.budget
        accounts = [budget.workflow_id] if budget is not None and budget.workflow_id else []
        try:
            await getattr(run.retention, action)(run.root_id, accounts=accounts, **keys)
        except Exception as error:  # `fleet gc` prunes what this leaves
            logger.warning(
                "workflow %r: cannot %s its Redis records: %s", run.root_id, action, error
            )

    async def __aenter__(self) -> Self:
        self._check_open()
        self._trace()
        if self._run.stream is not None:
            await self._run.record_budget()  # where a resumed run starts from
        if not self._run.begun:
            await self._begin()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.finish()
        elif exc_type is asyncio.CancelledError:
            await self._cancel("the workflow program was cancelled")
            await self._shutdown("cancelled")
        else:
            await self._shutdown("cancelled" if self.cancelled else "failed")
