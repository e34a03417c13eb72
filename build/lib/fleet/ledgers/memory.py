"""An in-process ledger: the default for the local host, and the reference semantics."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .base import (
    KEEP,
    BudgetLedger,
    ChildUsage,
    HeldReservation,
    Keep,
    LedgerState,
    ReserveResult,
    ReserveStatus,
)

__all__ = ["MemoryLedger"]


@dataclass
class _Held:
    tokens: int
    micros: int
    holder: str
    expires: float


@dataclass
class _Account:
    limit: int | None = None
    limit_set: bool = False
    limit_micros: int | None = None
    limit_micros_set: bool = False
    consumed: int = 0
    reserved: int = 0
    consumed_micros: int = 0
    reserved_micros: int = 0
    parents: tuple[str, ...] = ()
    held: dict[str, _Held] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    children: dict[str, list[int]] = field(default_factory=dict)

    def state(self) -> LedgerState:
        return LedgerState(
            self.consumed,
            self.reserved,
            self.limit,
            self.limit_set,
            self.consumed_micros,
            self.reserved_micros,
            self.limit_micros,
            self.limit_micros_set,
            self.parents,
        )

    def expire(self, now: float) -> bool:
        """Release every reservation whose lease ran out; True if any was."""
        dead = [rid for rid, held in self.held.items() if held.expires <= now]
        for rid in dead:
            self.release(rid)
        return bool(dead)

    def release(self, rid: str) -> None:
        held = self.held.pop(rid, None)
        if held is not None:
            self.reserved -= held.tokens
            self.reserved_micros -= held.micros

    def verdict(self, tokens: int, micros: int) -> tuple[ReserveStatus, str | None]:
        """Whether ``tokens`` and ``micros`` fit, and which unit is in the way."""
        worst: tuple[ReserveStatus, str | None] = ("granted", None)
        for unit, limit, consumed, reserved, request in (
            ("tokens", self.limit, self.consumed, self.reserved, tokens),
            ("usd", self.limit_micros, self.consumed_micros, self.reserved_micros, micros),
        ):
            if limit is None:
                continue
            if consumed >= limit or consumed + request > limit:
                return "refused", unit
            if consumed + reserved + request > limit and worst[0] == "granted":
                worst = ("wait", unit)
        return worst


def _qualified(workflow_id: str, reservation_id: str, index: int) -> str:
    """A reservation's id in account ``index`` of the chain (0 is the workflow)."""
    return reservation_id if index == 0 else f"{workflow_id}/{reservation_id}"


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
        return f"MemoryLedger(accounts={len(self._accounts)})"

    def _clock(self) -> float:
        """Now, in the seconds leases are kept in (monotonic: they live in this process)."""
        return time.monotonic()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic operation on the accounts (a subclass may load and save them here)."""
        with self._lock:
            yield

    def _forget(self, account_id: str) -> None:
        self._accounts.pop(account_id, None)

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account()
        if account.expire(self._clock()):
            self._wake(account_id)
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
        micros: int = 0,
        initial_limit_micros: int | None = None,
        ancestors: Sequence[str] = (),
    ) -> ReserveResult:
        """Try to hold ``tokens`` and ``micros``; see :meth:`BudgetLedger.reserve`."""
        now = self._clock()
        with self._transaction():
            chain = [workflow_id, *ancestors]
            accounts = [self._account(account_id) for account_id in chain]
            own = accounts[0]
            if not own.limit_set:
                own.limit, own.limit_set = initial_limit, True
            if not own.limit_micros_set:
                own.limit_micros, own.limit_micros_set = initial_limit_micros, True
            room = [
                a.limit_micros - a.consumed_micros for a in accounts if a.limit_micros is not None
            ]
            least = max(min(room), 0) if room else None
            held = own.held.get(reservation_id)
            if held is not None:
                for index, account in enumerate(accounts):
                    renewed = account.held.get(_qualified(workflow_id, reservation_id, index))
                    if renewed is not None:
                        renewed.expires = now + lease_s
                return ReserveResult(
                    "granted", held.tokens, own.state(), micros=held.micros, room_micros=least
                )
            for account_id, account in zip(chain, accounts, strict=True):
                status, unit = account.verdict(tokens, micros)
                if status == "granted":
                    continue
                retry = None
                if status == "wait":
                    retry = max(min(h.expires for h in account.held.values()) - now, 0.0)
                return ReserveResult(
                    status,
                    0,
                    own.state(),
                    retry,
                    blocked_by=account_id,
                    blocked_unit=unit,  # type: ignore[arg-type]
                    blocked_state=account.state(),
                    room_micros=least,
                )
            # A settled id reserved again is a new attempt of the same step: settle anew.
            own.settled.discard(reservation_id)
            for index, account in enumerate(accounts):
                rid = _qualified(workflow_id, reservation_id, index)
                account.held[rid] = _Held(tokens, micros, holder, now + lease_s)
                account.reserved += tokens
                account.reserved_micros += micros
            return ReserveResult("granted", tokens, own.state(), micros=micros, room_micros=least)

    async def renew(
        self,
        workflow_id: str,
        reservation_id: str,
        *,
        lease_s: float,
        ancestors: Sequence[str] = (),
    ) -> bool:
        """Extend a live lease; see :meth:`BudgetLedger.renew`."""
        expires = self._clock() + lease_s
        with self._transaction():
            if reservation_id not in self._account(workflow_id).held:
                return False
            for index, account_id in enumerate([workflow_id, *ancestors]):
                rid = _qualified(workflow_id, reservation_id, index)
                held = self._account(account_id).held.get(rid)
                if held is not None:
                    held.expires = expires
            return True

    async def settle(
        self,
        workflow_id: str,
        reservation_id: str,
        used_tokens: int,
        *,
        used_micros: int = 0,
        ancestors: Sequence[str] = (),
    ) -> LedgerState:
        """Charge once and release, in the whole chain; see :meth:`BudgetLedger.settle`."""
        with self._transaction():
            own = self._account(workflow_id)
            if reservation_id not in own.settled:
                own.settled.add(reservation_id)
                for index, account_id in enumerate([workflow_id, *ancestors]):
                    account = self._account(account_id)
                    account.release(_qualified(workflow_id, reservation_id, index))
                    account.consumed += used_tokens
                    account.consumed_micros += used_micros
                    if index > 0:
                        child = account.children.setdefault(workflow_id, [0, 0])
                        child[0] += used_tokens
                        child[1] += used_micros
                    self._wake(account_id)
            return own.state()

    async def state(self, account_id: str) -> LedgerState:
        """The account now; see :meth:`BudgetLedger.state`."""
        with self._transaction():
            return self._account(account_id).state()

    async def configure(
        self,
        account_id: str,
        *,
        limit: int | None | Keep = KEEP,
        limit_micros: int | None | Keep = KEEP,
        parents: Sequence[str] | Keep = KEEP,
    ) -> LedgerState:
        """Create or change an account; see :meth:`BudgetLedger.configure`."""
        with self._transaction():
            account = self._account(account_id)
            if not isinstance(limit, Keep):
                account.limit, account.limit_set = limit, True
            if not isinstance(limit_micros, Keep):
                account.limit_micros, account.limit_micros_set = limit_micros, True
            if not isinstance(parents, Keep):
                account.parents = tuple(parents)
            self._wake(account_id)
            return account.state()

    async def reservations(self, account_id: str) -> list[HeldReservation]:
        """Live reservations; see :meth:`BudgetLedger.reservations`."""
        now = self._clock()
        with self._transaction():
            held = self._account(account_id).held
            rows = [
                HeldReservation(rid, h.tokens, h.holder, h.expires - now, h.micros)
                for rid, h in held.items()
            ]
        return sorted(rows, key=lambda row: row.expires_in_s)

    async def children(self, account_id: str) -> list[ChildUsage]:
        """Consumption per workflow; see :meth:`BudgetLedger.children`."""
        with self._transaction():
            rows = [
                ChildUsage(wid, tokens, micros)
                for wid, (tokens, micros) in self._account(account_id).children.items()
            ]
        return sorted(rows, key=lambda row: (-row.micros, -row.tokens, row.workflow_id))

    async def delete(self, account_id: str) -> None:
        """Forget the account; see :meth:`BudgetLedger.delete`."""
        with self._transaction():
            self._forget(account_id)
            self._wake(account_id)

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

    def _wake(self, account_id: str) -> None:
        """Resolve every waiter of ``account_id`` (called with the lock held)."""
        for waiter in self._waiters.pop(account_id, ()):
            try:
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # its event loop is closed; nobody is waiting any more
                pass


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
