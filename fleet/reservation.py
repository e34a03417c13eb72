"""A reservation: what one step (or one model call) holds from a budget until it settles.

A :class:`Reservation` is made by :meth:`fleet.budget.WorkflowBudget.reserve` (or
re-attached with :meth:`~fleet.budget.WorkflowBudget.reservation`); it settles the actual
usage, renews its lease, and hands the lease to the budget's keeper while its step runs
(:meth:`Reservation.kept_alive`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .budget_refusal import check_amount
from .errors import BrokerError
from .keeper import Held, LapseHook, Renewable

if TYPE_CHECKING:
    from .budget import WorkflowBudget

__all__ = ["Reservation"]

logger = logging.getLogger(__name__)


class Reservation(Renewable):
    """What one step (or one model call) holds from a :class:`WorkflowBudget` until it settles.

    Attributes:
        id: the reservation id (unique within the workflow).
        tokens: tokens held; the step may spend up to this many.
        micros: micro-dollars held (a model call's worst case).
        holder: who holds it (for humans).
        budget: the budget it was taken from.
    """

    __slots__ = ("_settled", "budget", "holder", "id", "micros", "tokens")

    def __init__(
        self, budget: WorkflowBudget, id: str, tokens: int, *, holder: str = "", micros: int = 0
    ) -> None:
        self.budget = budget
        self.id = id
        self.tokens = tokens
        self.micros = micros
        self.holder = holder
        self._settled = False

    def __repr__(self) -> str:
        return (
            f"Reservation(id={self.id!r}, tokens={self.tokens}, micros={self.micros}, "
            f"holder={self.holder!r}, workflow_id={self.budget.workflow_id!r}, "
            f"settled={self._settled})"
        )

    @property
    def settled(self) -> bool:
        """Whether :meth:`settle` completed through this object."""
        return self._settled

    async def settle(self, used_tokens: int, *, used_micros: int = 0) -> None:
        """Charge the actual usage and release the rest of the hold, in every account.

        Idempotent: the ledger charges each reservation id once, however many times
        (and from however many processes) it is settled. Usage above the hold is still
        charged in full: what was spent is spent.

        Raises:
            BudgetError: a negative amount.
        """
        check_amount(used_tokens, "used_tokens")
        check_amount(used_micros, "used_micros")
        if self._settled:
            return
        budget = self.budget
        state = await budget.ledger.settle(
            budget.workflow_id,
            self.id,
            used_tokens,
            used_micros=used_micros,
            ancestors=await budget.ancestors(),
        )
        budget._observe(state)
        self._settled = True

    async def renew(self) -> bool:
        """Extend the lease by the budget's ``lease_s`` from now (in every account).

        Returns:
            ``False`` when the reservation is no longer held (settled, or its lease
            already lapsed and the amounts went back to the budget).
        """
        if self._settled:
            return False
        budget = self.budget
        return await budget.ledger.renew(
            budget.workflow_id, self.id, lease_s=budget.lease_s, ancestors=await budget.ancestors()
        )

    def finished(self) -> bool:
        """Whether it was settled through this object (no lease left to renew)."""
        return self._settled

    @property
    def lease_s(self) -> float:
        """The lease a renewal gives (the budget's ``lease_s``)."""
        return self.budget.lease_s

    @property
    def lease_name(self) -> str:
        """Names the reservation in log lines."""
        return f"reservation {self.id} of workflow {self.budget.workflow_id}"

    @contextlib.asynccontextmanager
    async def kept_alive(
        self, *, every_s: float | None = None, on_lapse: LapseHook | None = None
    ) -> AsyncIterator[Held]:
        """Keep the lease alive while the block runs: the budget's keeper renews it.

        Leaving the block hands the lease back to the keeper and waits on nothing, so
        it is immediate whatever Redis is doing. If the keeper could not renew the lease
        before it lapsed (or the ledger no longer holds it), the yielded
        :class:`~fleet.keeper.Held` says so (``lapsed``) and ``on_lapse(held)`` is called.

        Args:
            every_s: renewal interval; a third of the lease by default.
            on_lapse: called once, from the keeper, if the lease lapses while kept.
        """
        if self.budget.known_ancestors is None:
            try:  # resolved once per budget; a keeper without an event loop needs them
                await self.budget.ancestors()
            except BrokerError as error:
                logger.warning("cannot read the accounts above %s yet: %s", self.lease_name, error)
        keeper = self.budget.keeper()
        held = keeper.keep(self, every_s=every_s, on_lapse=on_lapse)
        try:
            yield held
        finally:
            keeper.drop(held)
