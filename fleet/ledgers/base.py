"""The budget ledger contract: where a workflow's token account lives.

A ledger keeps one account per workflow id: the limit, the tokens consumed (charged
by settled steps), and the live reservations, each with a lease. Every operation is
atomic with respect to every other client of the same ledger, so many hosts and
workers can share one account. :class:`fleet.WorkflowBudget` is the user-facing
view; it drives a ledger through this interface.

Rules every ledger follows (the contract suite in ``tests/test_budget.py`` pins them):

* a reservation whose lease has expired is released before any operation looks at
  the account, so a dead holder's tokens return to the budget;
* ``reserve`` grants when ``consumed + reserved + tokens <= limit``, refuses when the
  account is exhausted (``consumed >= limit``) or ``consumed + tokens > limit``, and
  otherwise answers "wait" (only in-flight reservations stand in the way);
* ``reserve`` of a live reservation id renews it and reserves nothing more;
* ``settle`` charges the actual usage once per reservation, however often it is
  called, and releases it. Reserving an already settled id again starts a new
  reservation under that id (a re-run of the same step, e.g. on resume), which is
  then settled (once) on its own.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

__all__ = ["BudgetLedger", "HeldReservation", "LedgerState", "ReserveResult", "ReserveStatus"]

ReserveStatus = Literal["granted", "wait", "refused"]
"""What a ledger answered to ``reserve``:

* ``granted`` — the tokens are held under the reservation id (or already were);
* ``wait`` — only other steps' in-flight reservations stand in the way;
* ``refused`` — ``consumed + tokens > limit`` (or the account is exhausted).
"""


@dataclass(frozen=True, slots=True)
class LedgerState:
    """One workflow's account as the ledger holds it."""

    consumed: int
    """Tokens charged by settled reservations."""
    reserved: int
    """Tokens held by live (unexpired, unsettled) reservations."""
    limit: int | None
    """The limit; ``None`` when uncapped or not set yet (see ``limit_set``)."""
    limit_set: bool
    """Whether the account has a stored limit decision (a number or "uncapped")."""


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """A ledger's answer to ``reserve``, with the account right after it."""

    status: ReserveStatus
    """See :data:`ReserveStatus`."""
    tokens: int
    """Tokens held under the id when granted (the earlier amount when it was renewed)."""
    state: LedgerState
    """The account after the operation."""
    retry_after_s: float | None = None
    """For ``wait``: seconds until the next lease expires (a hint for polling)."""


@dataclass(frozen=True, slots=True)
class HeldReservation:
    """A live reservation, for display (``fleet budget show``)."""

    id: str
    """The reservation id."""
    tokens: int
    """Tokens it holds."""
    holder: str
    """Who holds it (host / step), for humans."""
    expires_in_s: float
    """Seconds until its lease expires unless renewed."""


class BudgetLedger(ABC):
    """Storage for workflow token accounts; see the module docstring for the contract.

    Token amounts are non-negative integers; a limit of ``None`` means uncapped.
    """

    @abstractmethod
    async def reserve(
        self,
        workflow_id: str,
        reservation_id: str,
        tokens: int,
        *,
        holder: str,
        lease_s: float,
        initial_limit: int | None,
    ) -> ReserveResult:
        """Try to hold ``tokens`` under ``reservation_id`` for ``lease_s`` seconds.

        Args:
            workflow_id: the account.
            reservation_id: the reservation's id (re-reserving a live id renews it; a
                settled id starts a new reservation).
            tokens: tokens to hold.
            holder: who holds it (for display only).
            lease_s: the lease; the tokens return to the budget after it unless renewed.
            initial_limit: the limit to store if the account has none yet.
        """

    @abstractmethod
    async def renew(self, workflow_id: str, reservation_id: str, *, lease_s: float) -> bool:
        """Extend a live reservation's lease to ``lease_s`` from now.

        Returns:
            ``False`` when the reservation is no longer live (settled or expired).
        """

    @abstractmethod
    async def settle(self, workflow_id: str, reservation_id: str, used_tokens: int) -> LedgerState:
        """Charge ``used_tokens`` and release the reservation; idempotent per id.

        A reservation whose lease already expired is still charged (tokens spent are
        spent); a second settle of the same id changes nothing.
        """

    @abstractmethod
    async def state(self, workflow_id: str) -> LedgerState:
        """The account now (expired reservations released first)."""

    @abstractmethod
    async def set_limit(self, workflow_id: str, limit: int | None) -> LedgerState:
        """Store a new limit (``None``: uncapped); running holders see it at once."""

    @abstractmethod
    async def reservations(self, workflow_id: str) -> list[HeldReservation]:
        """The live reservations, soonest expiry first."""

    @abstractmethod
    async def delete(self, workflow_id: str) -> None:
        """Forget the account entirely (limit, consumption, reservations)."""

    async def wait_for_release(self, workflow_id: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for tokens to be released (a settle or an expiry).

        The default just sleeps: callers poll ``reserve`` again afterwards.
        """
        await asyncio.sleep(timeout_s)

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the account itself stays."""
