"""A hard, reserved, workflow-wide budget in tokens and dollars, nested under accounts.

Every step's tokens go through three moves (DESIGN §4):

1. **reserve** just before dispatch, once the step has its concurrency slot: the
   request is held atomically if ``consumed + reserved + request <= limit``. A request
   that only fails to fit because of other steps' in-flight reservations waits for
   them to settle; it is refused (:class:`~fleet.errors.BudgetExhaustedError`) as soon
   as ``consumed + request > limit``, so a refused step never runs;
2. **check** before each LLM call inside the step (``AgentContext.check_tokens``
   caps each call to what the step still holds);
3. **settle** when the step ends: charge the actual usage, release the rest.

Money goes the same way per model call: before each call the agent reserves the
call's worst case in micro-dollars (:meth:`WorkflowBudget.reserve_call`, which caps
the call's ``max_tokens`` to fit) and settles its real cost from the reported usage.
A budget may name parent accounts (``parents=["team:research"]``); every reservation
is taken from the workflow and every ancestor in one atomic ledger operation.

A reservation carries a lease; :meth:`Reservation.kept_alive` hands it to the budget's
keeper (:mod:`fleet.keeper`) while the step runs, and takes it back, without waiting on
the network, when the step ends. If the holder dies, the lease lapses and the tokens
return to the budget. The
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

import uuid
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal

from .accounts import check_account_name, check_tokens_limit, resolve_ancestors, usd_limit_micros
from .budget_refusal import check_amount, exhausted_message, refusal
from .budget_snapshot import BudgetSnapshot
from .errors import BudgetError
from .keeper import Keeper, LoopKeeper
from .ledgers.base import KEEP, BudgetLedger, Keep, LedgerState, ReserveResult
from .ledgers.memory import MemoryLedger
from .perloop import PerLoop
from .pricing import ModelPrice, micros_to_usd
from .reservation import Reservation

__all__ = ["BudgetSnapshot", "Reservation", "WorkflowBudget", "exhausted_message"]

_FIRST_POLL_S = 0.002
"""First pause before asking the ledger again while in-flight reservations block."""
_MAX_POLL_S = 0.05
"""Longest pause between two asks while waiting (the ledger may wake us sooner)."""


class WorkflowBudget:
    """The budget of one workflow, shared by every step (and worker) that uses it.

    It counts tokens and dollars. Either limit or both may be set; a limit of ``None``
    is uncapped (usage is still counted), ``0`` is exhausted from the start. Limits are
    stored in the ledger on first use; when the ledger already holds one for
    ``workflow_id`` (a resumed workflow, or ``fleet budget set``), the stored limit
    wins. Use :meth:`set_limit` to change them.

    Args:
        limit_tokens: the hard token limit (positional, as before money existed).
        limit_usd: the hard dollar limit (``Decimal``, ``int``, ``str`` or ``float``);
            kept as integer micro-dollars.
        parents: shared accounts above the workflow (``["team:research"]``): every
            reservation is also taken from them and their own ancestors, atomically.
            They must exist (``fleet budget set``). Empty: the parents stored for
            ``workflow_id`` by an earlier run, if any.
        ledger: where the accounts live; ``None`` means a fresh
            :class:`~fleet.ledgers.MemoryLedger`.
        workflow_id: the account's key; ``None`` means a new random id.
        lease_s: how long a reservation outlives a silent holder.
        keeper: what renews this budget's reservations while their steps run
            (:meth:`Reservation.kept_alive`); ``None`` means one
            :class:`~fleet.keeper.LoopKeeper` per event loop. A worker passes its
            process-wide lease keeper.

    Raises:
        BudgetError: a negative, non-integer or non-finite limit, a parent name with
            forbidden characters, or a non-positive lease.
    """

    def __init__(
        self,
        limit_tokens: int | None = None,
        *,
        limit_usd: Decimal | int | float | str | None = None,
        parents: Sequence[str] = (),
        ledger: BudgetLedger | None = None,
        workflow_id: str | None = None,
        lease_s: float = 30.0,
        keeper: Keeper | None = None,
    ) -> None:
        check_tokens_limit(limit_tokens, "limit_tokens")
        self._limit_micros = usd_limit_micros(limit_usd, "limit_usd")
        if isinstance(parents, str):
            raise BudgetError(f"parents must be a list of account names, got {parents!r}")
        self.parents = tuple(check_account_name(name) for name in parents)
        if not (isinstance(lease_s, int | float) and 0 < lease_s < float("inf")):
            raise BudgetError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        self.ledger: BudgetLedger = ledger if ledger is not None else MemoryLedger()
        self.workflow_id = workflow_id or f"budget-{uuid.uuid4().hex}"
        self.lease_s = float(lease_s)
        self._limit = limit_tokens
        self._ancestors: tuple[str, ...] | None = None
        self._keeper = keeper
        self._loop_keepers: PerLoop[LoopKeeper] = PerLoop(
            LoopKeeper, close=lambda keeper: keeper.aclose()
        )

    def keeper(self) -> Keeper:
        """What renews this budget's reservations (on this event loop, by default)."""
        return self._keeper if self._keeper is not None else self._loop_keepers.get()

    @property
    def known_ancestors(self) -> tuple[str, ...] | None:
        """The accounts above the workflow once resolved (:meth:`ancestors`), else ``None``."""
        return self._ancestors

    def adopt_ancestors(self, ancestors: Sequence[str]) -> None:
        """Take the accounts above the workflow as another process resolved them.

        A worker settling the host's reservation uses the chain the host reserved in,
        instead of reading it from the ledger again.
        """
        self._ancestors = tuple(ancestors)

    def __repr__(self) -> str:
        return (
            f"WorkflowBudget({self._limit!r}, limit_usd={self.limit_usd!r}, "
            f"parents={list(self.parents)!r}, workflow_id={self.workflow_id!r}, "
            f"ledger={self.ledger!r})"
        )

    @property
    def limit_tokens(self) -> int | None:
        """The token limit as last seen in the ledger (the constructor's until then)."""
        return self._limit

    @property
    def limit_usd(self) -> Decimal | None:
        """The dollar limit as last seen in the ledger (the constructor's until then)."""
        return None if self._limit_micros is None else micros_to_usd(self._limit_micros)

    def _observe(self, state: LedgerState) -> None:
        if state.limit_set:
            self._limit = state.limit
        if state.limit_micros_set:
            self._limit_micros = state.limit_micros

    async def ancestors(self) -> tuple[str, ...]:
        """Every account above the workflow, nearest first (resolved once, then cached).

        Raises:
            BudgetError: a parent does not exist, or the parents form a cycle.
        """
        if self._ancestors is None:
            parents = self.parents
            if not parents:
                parents = (await self.ledger.state(self.workflow_id)).parents
            ancestors = await resolve_ancestors(self.ledger, self.workflow_id, parents)
            if self.parents:
                await self.ledger.configure(self.workflow_id, parents=self.parents)
            self._ancestors = ancestors
        return self._ancestors

    async def counts_dollars(self) -> bool:
        """Whether a dollar limit applies: on the workflow or on an account above it.

        Read from the ledger, so a limit another process set counts too.

        Raises:
            BudgetError: a parent does not exist, or the parents form a cycle.
        """
        state = await self.ledger.state(self.workflow_id)
        self._observe(state)
        if self._limit_micros is not None:
            return True
        for account in await self.ancestors():
            if (await self.ledger.state(account)).limit_micros is not None:
                return True
        return False

    async def reserve(
        self,
        tokens: int,
        *,
        holder: str,
        reservation_id: str | None = None,
        micros: int = 0,
    ) -> Reservation:
        """Hold ``tokens`` (and ``micros``) for one step; wait while in-flight steps block.

        Args:
            tokens: the step's request (its ``max_tokens`` or its agent's default).
            holder: who holds it, for humans (``fleet budget show``); e.g. the step id.
            reservation_id: the id to hold it under; reserving a live id again renews
                it and holds nothing more, and reserving a settled id again starts a
                new reservation (a re-run of the step). ``None`` makes a new id.
            micros: micro-dollars to hold (a model call's worst case).

        Returns:
            The reservation; settle it when the step ends.

        Raises:
            BudgetExhaustedError: ``consumed + request > limit`` in some unit, in the
                workflow or an ancestor (or one of them is spent).
            BudgetError: a negative amount, an unknown parent or a parent cycle.
        """
        check_amount(tokens, "tokens")
        check_amount(micros, "micros")
        rid = reservation_id or uuid.uuid4().hex
        delay = _FIRST_POLL_S
        while True:
            result = await self._ask(rid, tokens, micros, holder)
            if result.status == "granted":
                return Reservation(self, rid, result.tokens, holder=holder, micros=result.micros)
            if result.status == "refused":
                raise refusal(result, self.workflow_id, tokens, micros)
            await self._pause(result, delay)
            delay = min(delay * 2, _MAX_POLL_S)

    async def reserve_call(
        self,
        price: ModelPrice,
        *,
        prompt_tokens: int,
        max_tokens: int,
        holder: str,
        reservation_id: str | None = None,
    ) -> tuple[Reservation, int]:
        """Hold the worst case of one model call, capping its ``max_tokens`` to fit.

        The worst case is ``prompt_tokens`` at the input price plus ``max_tokens`` at
        the output price. When that does not fit the dollars left (in the workflow and
        every ancestor), ``max_tokens`` is lowered until it does.

        Returns:
            The reservation (settle it with the call's real cost) and the call's
            ``max_tokens``.

        Raises:
            BudgetExhaustedError: not even one completion token fits, or a token limit
                is spent.
        """
        rid = reservation_id or uuid.uuid4().hex
        cap, delay = max_tokens, _FIRST_POLL_S
        while True:
            worst = price.cost_micros(prompt_tokens, cap)
            result = await self._ask(rid, 0, worst, holder)
            if result.status == "granted":
                return Reservation(self, rid, 0, holder=holder, micros=result.micros), cap
            room = result.room_micros
            if result.blocked_unit != "usd" or room is None:
                if result.status == "refused":
                    raise refusal(result, self.workflow_id, 0, worst)
            else:
                fitted = price.most_completion(prompt_tokens, room, max_tokens)
                if fitted < 1:
                    raise refusal(result, self.workflow_id, 0, worst)
                if fitted != cap:
                    cap = fitted
                    continue
                if result.status == "refused":  # room moved between the two reads
                    continue
            await self._pause(result, delay)
            delay = min(delay * 2, _MAX_POLL_S)

    async def _ask(self, rid: str, tokens: int, micros: int, holder: str) -> ReserveResult:
        result = await self.ledger.reserve(
            self.workflow_id,
            rid,
            tokens,
            holder=holder,
            lease_s=self.lease_s,
            initial_limit=self._limit,
            micros=micros,
            initial_limit_micros=self._limit_micros,
            ancestors=await self.ancestors(),
        )
        self._observe(result.state)
        return result

    async def _pause(self, result: ReserveResult, delay: float) -> None:
        pause = delay if result.retry_after_s is None else min(delay, result.retry_after_s)
        account = result.blocked_by or self.workflow_id
        await self.ledger.wait_for_release(account, max(pause, 0.001))

    def reservation(
        self, reservation_id: str, tokens: int, *, holder: str = "", micros: int = 0
    ) -> Reservation:
        """Re-attach to a reservation made elsewhere, without a ledger call.

        For example a Celery worker settling what the host reserved before dispatch.
        """
        check_amount(tokens, "tokens")
        check_amount(micros, "micros")
        return Reservation(self, reservation_id, tokens, holder=holder, micros=micros)

    async def snapshot(self) -> BudgetSnapshot:
        """The workflow's account now (expired leases released first)."""
        state = await self.ledger.state(self.workflow_id)
        self._observe(state)
        snapshot = BudgetSnapshot.from_state(state, limit_tokens=self._limit)
        if not state.limit_micros_set and self._limit_micros is not None:
            snapshot = BudgetSnapshot.from_state(
                replace(state, limit_micros=self._limit_micros), limit_tokens=self._limit
            )
        return snapshot

    async def set_limit(
        self,
        limit_tokens: int | None | Keep = KEEP,
        *,
        limit_usd: Decimal | int | float | str | None | Keep = KEEP,
    ) -> BudgetSnapshot:
        """Change a limit for every holder of this workflow (``None``: uncapped).

        Steps already holding tokens or dollars keep them; waiting steps see the new
        limit on their next ask.
        """
        tokens = limit_tokens
        if not isinstance(tokens, Keep):
            tokens = check_tokens_limit(tokens, "limit_tokens")
        micros = limit_usd
        if not isinstance(micros, Keep):
            micros = usd_limit_micros(micros, "limit_usd")
        state = await self.ledger.configure(self.workflow_id, limit=tokens, limit_micros=micros)
        self._observe(state)
        return BudgetSnapshot.from_state(state)
