"""A hard, reserved, workflow-wide token budget.

Every step's tokens go through three moves (DESIGN §4):

1. **reserve** just before dispatch, once the step has its concurrency slot: the
   request is held atomically if ``consumed + reserved + request <= limit``. A request
   that only fails to fit because of other steps' in-flight reservations waits for
   them to settle; it is refused (:class:`~fleet.errors.BudgetExhaustedError`) as soon
   as ``consumed + request > limit``, so a refused step never runs;
2. **check** before each LLM call inside the step (``AgentContext.check_tokens``
   caps each call to what the step still holds);
3. **settle** when the step ends: charge the actual usage, release the rest.

A reservation carries a lease; :meth:`Reservation.kept_alive` renews it while the step
runs. If the holder dies, the lease lapses and the tokens return to the budget. The
account lives in a :class:`~fleet.ledgers.BudgetLedger`: in memory by default, or in
Redis (:class:`~fleet.ledgers.RedisLedger`) to be shared by a whole fleet and to
outlive the host process, so a resumed workflow continues the same account.

Example::

    budget = WorkflowBudget(50_000, ledger=RedisLedger(url), workflow_id="nightly-42")
    executor = LocalExecutor(budget=budget)
    ...
    print(await budget.snapshot())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, model_validator

from . import metrics
from .errors import BrokerError, BudgetExhaustedError, SpecError
from .ledgers.base import BudgetLedger, LedgerState
from .ledgers.memory import MemoryLedger
from .spec import FleetModel

__all__ = ["BudgetSnapshot", "Reservation", "WorkflowBudget", "exhausted_message"]

logger = logging.getLogger(__name__)

_FIRST_POLL_S = 0.002
"""First pause before asking the ledger again while in-flight reservations block."""
_MAX_POLL_S = 0.05
"""Longest pause between two asks while waiting (the ledger may wake us sooner)."""


def exhausted_message(consumed: int, limit: int | None, requested: int | None = None) -> str:
    """The refusal text: ``workflow token budget exhausted (<consumed> / <limit> tokens)``.

    When the account is not spent yet but the request is larger than what is left,
    the request size is added, so the user sees why a step was refused.
    """
    message = f"workflow token budget exhausted ({consumed} / {limit or 0} tokens)"
    if requested is not None and limit is not None and consumed < limit:
        message += (
            f"; the step asks for {requested} tokens and only {limit - consumed} are left "
            "(lower its max_tokens or raise the budget)"
        )
    return message


class BudgetSnapshot(FleetModel):
    """A workflow budget at one moment.

    ``remaining_tokens`` and ``is_exhausted`` are derived from the other three fields
    when not given.
    """

    consumed_tokens: int = Field(ge=0)
    """Tokens charged by settled steps."""
    reserved_tokens: int = Field(default=0, ge=0)
    """Tokens held by steps in flight (live reservations)."""
    limit_tokens: int | None = Field(default=None, ge=0)
    """The limit; ``None`` means uncapped."""
    remaining_tokens: int | None = None
    """``limit - consumed - reserved`` (never below 0); ``None`` when uncapped."""
    is_exhausted: bool = False
    """A limit is set and ``consumed >= limit`` (a limit of 0 is exhausted from the start)."""

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        limit = data.get("limit_tokens")
        consumed = data.get("consumed_tokens", 0)
        reserved = data.get("reserved_tokens", 0)
        if isinstance(consumed, int) and isinstance(reserved, int):
            if data.get("remaining_tokens") is None and isinstance(limit, int):
                data["remaining_tokens"] = max(limit - consumed - reserved, 0)
            if "is_exhausted" not in data:
                data["is_exhausted"] = isinstance(limit, int) and consumed >= limit
        return data

    def __str__(self) -> str:
        limit = "uncapped" if self.limit_tokens is None else f"{self.limit_tokens}"
        return (
            f"{self.consumed_tokens} consumed + {self.reserved_tokens} reserved of {limit} tokens"
            + ("" if self.remaining_tokens is None else f" ({self.remaining_tokens} left)")
            + (" — exhausted" if self.is_exhausted else "")
        )


def _check_tokens(value: int | None, what: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(f"{what} must be a non-negative integer, got {value!r}")


class WorkflowBudget:
    """The token budget of one workflow, shared by every step (and worker) that uses it.

    Args:
        limit_tokens: the hard limit; ``None`` is uncapped (usage is still counted),
            ``0`` is exhausted from the start. It is stored in the ledger on first use;
            when the ledger already holds a limit for ``workflow_id`` (a resumed
            workflow, or ``fleet budget set``), the stored limit wins. Use
            :meth:`set_limit` to change it.
        ledger: where the account lives; ``None`` means a fresh
            :class:`~fleet.ledgers.MemoryLedger`.
        workflow_id: the account's key; ``None`` means a new random id.
        lease_s: how long a reservation outlives a silent holder.

    Raises:
        SpecError: a negative limit or a non-positive lease.
    """

    def __init__(
        self,
        limit_tokens: int | None,
        *,
        ledger: BudgetLedger | None = None,
        workflow_id: str | None = None,
        lease_s: float = 30.0,
    ) -> None:
        _check_tokens(limit_tokens, "limit_tokens", allow_none=True)
        if not lease_s > 0:
            raise SpecError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        self.ledger: BudgetLedger = ledger if ledger is not None else MemoryLedger()
        self.workflow_id = workflow_id or f"budget-{uuid.uuid4().hex}"
        self.lease_s = float(lease_s)
        self._limit = limit_tokens

    def __repr__(self) -> str:
        return (
            f"WorkflowBudget({self._limit!r}, workflow_id={self.workflow_id!r}, "
            f"ledger={self.ledger!r})"
        )

    @property
    def limit_tokens(self) -> int | None:
        """The limit as last seen in the ledger (the constructor's until then)."""
        return self._limit

    def _observe(self, state: LedgerState) -> None:
        if state.limit_set:
            self._limit = state.limit

    async def reserve(
        self, tokens: int, *, holder: str, reservation_id: str | None = None
    ) -> Reservation:
        """Hold ``tokens`` for one step, waiting while only in-flight steps block it.

        Args:
            tokens: the step's request (its ``max_tokens`` or its agent's default).
            holder: who holds it, for humans (``fleet budget show``); e.g. the step id.
            reservation_id: the id to hold it under; reserving a live id again renews
                it and holds nothing more, and reserving a settled id again starts a
                new reservation (a re-run of the step). ``None`` makes a new id.

        Returns:
            The reservation; settle it when the step ends.

        Raises:
            BudgetExhaustedError: ``consumed + tokens > limit`` (or the budget is spent).
            SpecError: ``tokens`` is negative.
        """
        _check_tokens(tokens, "tokens")
        rid = reservation_id or uuid.uuid4().hex
        delay = _FIRST_POLL_S
        while True:
            result = await self.ledger.reserve(
                self.workflow_id,
                rid,
                tokens,
                holder=holder,
                lease_s=self.lease_s,
                initial_limit=self._limit,
            )
            self._observe(result.state)
            if result.status == "granted":
                return Reservation(self, rid, result.tokens, holder=holder)
            if result.status == "refused":
                metrics.budget_refused()
                state = result.state
                raise BudgetExhaustedError(
                    exhausted_message(state.consumed, state.limit, tokens),
                    consumed=state.consumed,
                    limit=state.limit,
                    requested=tokens,
                )
            pause = delay if result.retry_after_s is None else min(delay, result.retry_after_s)
            await self.ledger.wait_for_release(self.workflow_id, max(pause, 0.001))
            delay = min(delay * 2, _MAX_POLL_S)

    def reservation(self, reservation_id: str, tokens: int, *, holder: str = "") -> Reservation:
        """Re-attach to a reservation made elsewhere, without a ledger call.

        For example a Celery worker settling what the host reserved before dispatch.
        """
        _check_tokens(tokens, "tokens")
        return Reservation(self, reservation_id, tokens, holder=holder)

    async def snapshot(self) -> BudgetSnapshot:
        """The account now (expired leases released first)."""
        state = await self.ledger.state(self.workflow_id)
        self._observe(state)
        limit = state.limit if state.limit_set else self._limit
        return BudgetSnapshot(
            consumed_tokens=state.consumed, reserved_tokens=state.reserved, limit_tokens=limit
        )

    async def set_limit(self, limit_tokens: int | None) -> BudgetSnapshot:
        """Change the limit for every holder of this workflow (``None``: uncapped).

        Steps already holding tokens keep them; waiting steps see the new limit on
        their next ask.
        """
        _check_tokens(limit_tokens, "limit_tokens", allow_none=True)
        state = await self.ledger.set_limit(self.workflow_id, limit_tokens)
        self._observe(state)
        return BudgetSnapshot(
            consumed_tokens=state.consumed, reserved_tokens=state.reserved, limit_tokens=state.limit
        )


class Reservation:
    """Tokens one step holds from a :class:`WorkflowBudget` until it settles.

    Attributes:
        id: the reservation id (unique within the workflow).
        tokens: tokens held; the step may spend up to this many.
        holder: who holds it (for humans).
        budget: the budget it was taken from.
    """

    __slots__ = ("_settled", "budget", "holder", "id", "tokens")

    def __init__(self, budget: WorkflowBudget, id: str, tokens: int, *, holder: str = "") -> None:
        self.budget = budget
        self.id = id
        self.tokens = tokens
        self.holder = holder
        self._settled = False

    def __repr__(self) -> str:
        return (
            f"Reservation(id={self.id!r}, tokens={self.tokens}, holder={self.holder!r}, "
            f"workflow_id={self.budget.workflow_id!r}, settled={self._settled})"
        )

    @property
    def settled(self) -> bool:
        """Whether :meth:`settle` completed through this object."""
        return self._settled

    async def settle(self, used_tokens: int) -> None:
        """Charge the step's actual usage and release the rest of the hold.

        Idempotent: the ledger charges each reservation id once, however many times
        (and from however many processes) it is settled. Usage above the hold is still
        charged in full: tokens spent are spent.

        Raises:
            SpecError: ``used_tokens`` is negative.
        """
        _check_tokens(used_tokens, "used_tokens")
        if self._settled:
            return
        budget = self.budget
        budget._observe(await budget.ledger.settle(budget.workflow_id, self.id, used_tokens))
        self._settled = True

    async def renew(self) -> bool:
        """Extend the lease by the budget's ``lease_s`` from now.

        Returns:
            ``False`` when the reservation is no longer held (settled, or its lease
            already lapsed and the tokens went back to the budget).
        """
        if self._settled:
            return False
        budget = self.budget
        return await budget.ledger.renew(budget.workflow_id, self.id, lease_s=budget.lease_s)

    @contextlib.asynccontextmanager
    async def kept_alive(self, *, every_s: float | None = None) -> AsyncIterator[Reservation]:
        """Renew the lease in the background while the block runs.

        Args:
            every_s: renewal interval; a third of the lease by default.
        """
        interval = every_s if every_s is not None else self.budget.lease_s / 3
        renewer = asyncio.create_task(self._renew_every(interval))
        try:
            yield self
        finally:
            renewer.cancel()
            await asyncio.wait({renewer})

    async def _renew_every(self, interval: float) -> None:
        while not self._settled:
            await asyncio.sleep(interval)
            try:
                alive = await self.renew()
            except BrokerError as error:
                logger.warning("cannot renew reservation %s (will retry): %s", self.id, error)
                continue
            if not alive:
                if not self._settled:
                    logger.warning(
                        "reservation %s of workflow %s lapsed before the step ended; its "
                        "tokens went back to the budget (raise lease_s?)",
                        self.id,
                        self.budget.workflow_id,
                    )
                return
