"""The budget of a workflow from its ledger, so the page agrees with ``fleet status``.

The run log holds the budget readings a run logged while it ran; a run whose host died
never logs what happened to its reservations after. Where the run's shared ledger can be
read (found the way ``fleet status`` finds it: :func:`fleet.runstatus.locate_run`),
:class:`LedgerBudgets` puts its current figures on the view instead.
"""

from __future__ import annotations

import asyncio
import json
import time

from ..budget_snapshot import BudgetSnapshot
from ..config import FleetSettings
from ..errors import FleetError
from ..runs import HEARTBEAT_S
from ..runstatus import locate_run
from .views import WorkflowView

__all__ = ["LedgerBudgets"]

_TIMEOUT_S = 5.0


class LedgerBudgets:
    """Sets :attr:`WorkflowView.ledger_budget` from the run's ledger, when it has one.

    A running root id's ledger is read at most once per :data:`~fleet.runs.HEARTBEAT_S`.

    Args:
        settings: the dashboard's fleet settings (where ``fleet status`` would look).
    """

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self._ledgers: dict[str, str | None] = {}
        self._checked: dict[str, float] = {}

    async def mark(self, view: WorkflowView) -> None:
        """Read the ledger of ``view``'s run (if any) and keep its figures on the view."""
        now = time.monotonic()
        recent = now - self._checked.get(view.root_id, float("-inf")) < HEARTBEAT_S
        if recent and view.status == "running":
            return  # a stopped run is read every time: its last figures must not lag its end
        self._checked[view.root_id] = now
        url = await self._ledger_url(view.root_id)
        if url is None:
            return
        budget = await self._read(url, view.root_id)
        if budget is not None and budget != view.ledger_budget:
            view.ledger_budget = budget
            view.version += 1  # the live page sends the change

    async def _ledger_url(self, root_id: str) -> str | None:
        if root_id not in self._ledgers:
            try:
                located = await asyncio.to_thread(locate_run, self.settings, root_id)
            except FleetError:
                return None  # e.g. a place with a password the index does not keep
            if not located.found:
                return None  # looked for again at the next reading
            self._ledgers[root_id] = located.places.ledger
        return self._ledgers[root_id]

    async def _read(self, url: str, root_id: str) -> dict[str, object] | None:
        from ..ledgers import RedisLedger

        ledger = RedisLedger(url, key_prefix=self.settings.key_prefix)
        try:
            state = await asyncio.wait_for(ledger.state(root_id), _TIMEOUT_S)
        except Exception:  # an unreadable ledger: the logged reading stays, marked as such
            return None
        finally:
            await ledger.close()
        if not (state.exists or state.consumed or state.reserved or state.consumed_micros):
            return None
        parsed: dict[str, object] = json.loads(BudgetSnapshot.from_state(state).to_json())
        return parsed
