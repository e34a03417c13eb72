"""The budget ledger contract: where workflow and account budgets live.

A ledger keeps one account per id: a workflow id, or a named shared account such as
``team:research``. An account has two limits, in tokens and in micro-dollars (integer
millionths of a US dollar, so money is exact), what settled reservations consumed of
each, the live reservations with their leases, and optionally its parents: the
accounts above it. Every operation is atomic with respect to every other client of
the same ledger, so many hosts and workers can share one account.
:class:`fleet.WorkflowBudget` is the user-facing view; it drives a ledger through
this interface.

Rules every ledger follows (the contract suite in ``tests/test_budget.py`` pins them):

* a reservation whose lease has expired is released before any operation looks at
  an account, so a dead holder's tokens and money return to the budget;
* a reservation is taken from a *chain*: the workflow's account and every ancestor
  account, all or nothing, in one atomic step (``ancestors``); settling or renewing
  it acts on the whole chain;
* ``reserve`` grants when, in every account of the chain and for both tokens and
  micro-dollars, ``consumed + reserved + request <= limit``; it refuses when an
  account is exhausted in either unit (``consumed >= limit``) or
  ``consumed + request > limit``, and otherwise answers "wait" (only in-flight
  reservations stand in the way);
* ``reserve`` of a live reservation id renews it and reserves nothing more;
* ``settle`` charges the actual usage once per reservation, however often it is
  called, and releases it; each ancestor also counts the charge under the
  workflow's id (``children``). Reserving an already settled id again starts a new
  reservation under that id (a re-run of the same step, e.g. on resume), which is
  then settled (once) on its own.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "KEEP",
    "BudgetLedger",
    "ChildUsage",
    "HeldReservation",
    "Keep",
    "LedgerState",
    "ReserveResult",
    "ReserveStatus",
]

ReserveStatus = Literal["granted", "wait", "refused"]
"""What a ledger answered to ``reserve``:

* ``granted`` — the amounts are held under the reservation id (or already were);
* ``wait`` — only other steps' in-flight reservations stand in the way;
* ``refused`` — ``consumed + request > limit`` (or an account is exhausted).
"""


class Keep:
    """The type of :data:`KEEP`: "leave this setting as it is"."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = Keep()
"""Passed to :meth:`BudgetLedger.configure` for a setting to leave unchanged."""


@dataclass(frozen=True, slots=True)
class LedgerState:
    """One account as the ledger holds it."""

    consumed: int
    """Tokens charged by settled reservations."""
    reserved: int
    """Tokens held by live (unexpired, unsettled) reservations."""
    limit: int | None
    """The token limit; ``None`` when uncapped or not set yet (see ``limit_set``)."""
    limit_set: bool
    """Whether the account has a stored token-limit decision (a number or "uncapped")."""
    consumed_micros: int = 0
    """Micro-dollars charged by settled reservations."""
    reserved_micros: int = 0
    """Micro-dollars held by live reservations."""
    limit_micros: int | None = None
    """The money limit in micro-dollars; ``None`` when uncapped or not set yet."""
    limit_micros_set: bool = False
    """Whether the account has a stored money-limit decision."""
    parents: tuple[str, ...] = ()
    """The accounts directly above this one."""

    @property
    def exists(self) -> bool:
        """Whether anything created the account (a limit decision or parents)."""
        return self.limit_set or self.limit_micros_set or bool(self.parents)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """A ledger's answer to ``reserve``, with the workflow's account right after it."""

    status: ReserveStatus
    """See :data:`ReserveStatus`."""
    tokens: int
    """Tokens held under the id when granted (the earlier amount when it was renewed)."""
    state: LedgerState
    """The workflow's account after the operation."""
    retry_after_s: float | None = None
    """For ``wait``: seconds until the blocking account's next lease expires."""
    micros: int = 0
    """Micro-dollars held under the id when granted."""
    blocked_by: str | None = None
    """For ``wait``/``refused``: the account in the way (the workflow or an ancestor)."""
    blocked_unit: Literal["tokens", "usd"] | None = None
    """For ``wait``/``refused``: which limit is in the way."""
    blocked_state: LedgerState | None = None
    """For ``wait``/``refused``: the blocking account's figures."""
    room_micros: int | None = None
    """Least ``limit - consumed`` in micro-dollars over the chain (``None``: uncapped)."""


@dataclass(frozen=True, slots=True)
class HeldReservation:
    """A live reservation, for display (``fleet budget show``)."""

    id: str
    """The reservation id (``WORKFLOW/ID`` in an ancestor account)."""
    tokens: int
    """Tokens it holds."""
    holder: str
    """Who holds it (host / step), for humans."""
    expires_in_s: float
    """Seconds until its lease expires unless renewed."""
    micros: int = 0
    """Micro-dollars it holds."""


@dataclass(frozen=True, slots=True)
class ChildUsage:
    """What one workflow under an account has consumed (``fleet budget show ACCOUNT``)."""

    workflow_id: str
    """The workflow that settled the charges."""
    tokens: int
    """Tokens it consumed."""
    micros: int
    """Micro-dollars it consumed."""


class BudgetLedger(ABC):
    """Storage for budget accounts; see the module docstring for the contract.

    Amounts are non-negative integers (tokens, micro-dollars); a limit of ``None``
    means uncapped. ``ancestors`` is the chain above the workflow, already resolved
    and checked for cycles by :class:`fleet.WorkflowBudget`.
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
        micros: int = 0,
        initial_limit_micros: int | None = None,
        ancestors: Sequence[str] = (),
    ) -> ReserveResult:
        """Try to hold ``tokens`` and ``micros`` under ``reservation_id`` for ``lease_s``.

        Args:
            workflow_id: the workflow's account.
            reservation_id: the reservation's id (re-reserving a live id renews it; a
                settled id starts a new reservation).
            tokens: tokens to hold.
            holder: who holds it (for display only).
            lease_s: the lease; the amounts return to the budget after it unless renewed.
            initial_limit: the token limit to store if the workflow has none yet.
            micros: micro-dollars to hold.
            initial_limit_micros: the money limit to store if the workflow has none yet.
            ancestors: the accounts above the workflow; each must fit the request too.
        """

    @abstractmethod
    async def renew(
        self,
        workflow_id: str,
        reservation_id: str,
        *,
        lease_s: float,
        ancestors: Sequence[str] = (),
    ) -> bool:
        """Extend a live reservation's lease to ``lease_s`` from now, in the whole chain.

        Returns:
            ``False`` when the reservation is no longer live (settled or expired).
        """

    @abstractmethod
    async def settle(
        self,
        workflow_id: str,
        reservation_id: str,
        used_tokens: int,
        *,
        used_micros: int = 0,
        ancestors: Sequence[str] = (),
    ) -> LedgerState:
        """Charge the usage to the whole chain and release the reservation; once per id.

        A reservation whose lease already expired is still charged (what was spent is
        spent); a second settle of the same id changes nothing.
        """

    @abstractmethod
    async def state(self, account_id: str) -> LedgerState:
        """The account now (expired reservations released first)."""

    @abstractmethod
    async def configure(
        self,
        account_id: str,
        *,
        limit: int | None | Keep = KEEP,
        limit_micros: int | None | Keep = KEEP,
        parents: Sequence[str] | Keep = KEEP,
    ) -> LedgerState:
        """Create or change an account: its limits (``None``: uncapped) and parents.

        Running holders see new limits at once. Cycle checks are the caller's.
        """

    async def set_limit(self, account_id: str, limit: int | None) -> LedgerState:
        """Store a new token limit (``None``: uncapped); running holders see it at once."""
        return await self.configure(account_id, limit=limit)

    @abstractmethod
    async def reservations(self, account_id: str) -> list[HeldReservation]:
        """The live reservations, soonest expiry first."""

    @abstractmethod
    async def children(self, account_id: str) -> list[ChildUsage]:
        """What each workflow under the account consumed, largest money first."""

    @abstractmethod
    async def delete(self, account_id: str) -> None:
        """Forget the account entirely (limits, consumption, reservations, parents)."""

    async def wait_for_release(self, workflow_id: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for amounts to be released (a settle or an expiry).

        The default just sleeps: callers poll ``reserve`` again afterwards.
        """
        await asyncio.sleep(timeout_s)

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the accounts themselves stay."""
