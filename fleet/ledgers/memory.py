"""An in-process ledger: the default for the local host, and the reference semantics."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from .base import BudgetLedger, HeldReservation, LedgerState, ReserveResult

__all__ = ["MemoryLedger"]


@dataclass
class _Held:
    tokens: int
    holder: str
    expires: float


@dataclass
class _Account:
    limit: int | None = None
    limit_set: bool = False
    consumed: int = 0
    reserved: int = 0
    held: dict[str, _Held] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)

    def state(self) -> LedgerState:
        return LedgerState(self.consumed, self.reserved, self.limit, self.limit_set)

    def expire(self, now: float) -> bool:
        """Release every reservation whose lease ran out; True if any was."""
        dead = [rid for rid, held in self.held.items() if held.expires <= now]
        for rid in dead:
            self.reserved -= self.held.pop(rid).tokens
        return bool(dead)


class MemoryLedger(BudgetLedger):
    """Accounts kept in this process (shared by every budget object given this ledger).

    Safe to use from several event loops and threads of one process. Accounts last as
    long as the ledger object: share one ledger to continue a workflow's account
    across :class:`~fleet.WorkflowBudget` objects; use
    :class:`~fleet.ledgers.RedisLedger` to survive the process.
    """

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def __repr__(self) -> str:
        return f"MemoryLedger(workflows={len(self._accounts)})"

    def _account(self, workflow_id: str) -> _Account:
        account = self._accounts.get(workflow_id)
        if account is None:
            account = self._accounts[workflow_id] = _Account()
        if account.expire(time.monotonic()):
            self._wake(workflow_id)
        return account

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
        """Try to hold ``tokens``; see :meth:`BudgetLedger.reserve`."""
        now = time.monotonic()
        with self._lock:
            account = self._account(workflow_id)
            if not account.limit_set:
                account.limit, account.limit_set = initial_limit, True
            held = account.held.get(reservation_id)
            if held is not None:
                held.expires = now + lease_s
                return ReserveResult("granted", held.tokens, account.state())
            limit = account.limit
            if limit is not None:
                if account.consumed >= limit or account.consumed + tokens > limit:
                    return ReserveResult("refused", 0, account.state())
                if account.consumed + account.reserved + tokens > limit:
                    soonest = min(h.expires for h in account.held.values())
                    return ReserveResult("wait", 0, account.state(), max(soonest - now, 0.0))
            # A settled id reserved again is a new attempt of the same step: settle anew.
            account.settled.pop(reservation_id, None)
            account.held[reservation_id] = _Held(tokens, holder, now + lease_s)
            account.reserved += tokens
            return ReserveResult("granted", tokens, account.state())

    async def renew(self, workflow_id: str, reservation_id: str, *, lease_s: float) -> bool:
        """Extend a live lease; see :meth:`BudgetLedger.renew`."""
        with self._lock:
            held = self._account(workflow_id).held.get(reservation_id)
            if held is None:
                return False
            held.expires = time.monotonic() + lease_s
            return True

    async def settle(self, workflow_id: str, reservation_id: str, used_tokens: int) -> LedgerState:
        """Charge once and release; see :meth:`BudgetLedger.settle`."""
        with self._lock:
            account = self._account(workflow_id)
            if reservation_id not in account.settled:
                held = account.held.pop(reservation_id, None)
                if held is not None:
                    account.reserved -= held.tokens
                account.consumed += used_tokens
                account.settled[reservation_id] = used_tokens
                self._wake(workflow_id)
            return account.state()

    async def state(self, workflow_id: str) -> LedgerState:
        """The account now; see :meth:`BudgetLedger.state`."""
        with self._lock:
            return self._account(workflow_id).state()

    async def set_limit(self, workflow_id: str, limit: int | None) -> LedgerState:
        """Store a new limit; see :meth:`BudgetLedger.set_limit`."""
        with self._lock:
            account = self._account(workflow_id)
            account.limit, account.limit_set = limit, True
            self._wake(workflow_id)
            return account.state()

    async def reservations(self, workflow_id: str) -> list[HeldReservation]:
        """Live reservations; see :meth:`BudgetLedger.reservations`."""
        now = time.monotonic()
        with self._lock:
            held = self._account(workflow_id).held
            rows = [
                HeldReservation(rid, h.tokens, h.holder, h.expires - now) for rid, h in held.items()
            ]
        return sorted(rows, key=lambda row: row.expires_in_s)

    async def delete(self, workflow_id: str) -> None:
        """Forget the account; see :meth:`BudgetLedger.delete`."""
        with self._lock:
            self._accounts.pop(workflow_id, None)
            self._wake(workflow_id)

    async def wait_for_release(self, workflow_id: str, timeout_s: float) -> None:
        """Wait until a settle, an expiry or a new limit, or ``timeout_s``."""
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiters.setdefault(workflow_id, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.get(workflow_id, set()).discard(waiter)

    def _wake(self, workflow_id: str) -> None:
        """Resolve every waiter of ``workflow_id`` (called with the lock held)."""
        for waiter in self._waiters.pop(workflow_id, ()):
            try:
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # its event loop is closed; nobody is waiting any more
                pass


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
