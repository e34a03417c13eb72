"""What an agent is: ``async def agent(spec, ctx) -> AgentResult | str``.

An agent receives the :class:`~fleet.AgentStepSpec` and an :class:`AgentContext`:
the step's token hold (check before every LLM call, charge after it), its deadline
and an event emitter. It returns an :class:`AgentResult` (or a plain string, short
for ``AgentResult(output=...)``). To fail with a named kind, raise
:class:`fleet.errors.AgentError`; anything else raised fails the step as ``crashed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import Field

from .. import metrics
from ..cancel.signal import Cancellation, StepInterrupted
from ..errors import AgentError, BudgetExhaustedError
from ..events import EventSink, RateLimited, emit
from ..limiters.admission import Admission, admit
from ..limiters.base import ProviderLimit, RateLimiter
from ..pricing import ModelPrice, UnknownPrice, micros_to_usd, no_price_message
from ..spec import NO_USAGE, AgentStepSpec, FleetModel, TokenUsage

if TYPE_CHECKING:
    from ..budget import Reservation, WorkflowBudget
    from ..deltas import DeltaPublisher

__all__ = [
    "AgentContext",
    "AgentDefinition",
    "AgentFunction",
    "AgentResult",
    "CallHold",
    "ReserveRule",
    "estimate_tokens",
]


def estimate_tokens(text: str) -> int:
    """A cheap, deterministic token estimate (about four characters per token)."""
    return (len(text) + 3) // 4


class AgentResult(FleetModel):
    """What an agent returns."""

    output: str
    """Final text output."""
    structured: Any = None
    """The structured value, when the agent produced one itself (validated by the host)."""
    usage: TokenUsage = Field(default_factory=TokenUsage)
    """The step's total token usage (the host charges the larger of this and what was
    charged through the context)."""


AgentFunction = Callable[[AgentStepSpec, "AgentContext"], Awaitable["AgentResult | str"]]
"""The shape of an agent."""

ReserveRule = int | Callable[[AgentStepSpec], int] | None
"""An agent's default token reservation for a step without ``max_tokens``: a number, a
function of the spec, or ``None`` for the host's default."""


@dataclass(frozen=True)
class AgentDefinition:
    """A named agent a host can run."""

    name: str
    """The registry name (what ``AgentStepSpec.agent`` refers to)."""
    run: AgentFunction
    """The agent coroutine function."""
    reserve_tokens: ReserveRule = None
    """Default reservation for a step that sets no ``max_tokens``."""
    kind: str = "python"
    """Where it came from: ``builtin``, ``python``, ``openai`` or ``pydantic_ai``."""
    limit: ProviderLimit | None = None
    """The provider limit every model call of this agent counts against (``limit = "NAME"``
    in its ``[agents.NAME]`` table)."""
    blocking: bool = False
    """Its body blocks its thread (``blocking = true`` in the agents file): a worker runs
    its steps each on a thread and event loop of their own instead of the loop every
    other step of the process shares."""

    def reservation_for(self, spec: AgentStepSpec, default: int) -> int:
        """Tokens to reserve for ``spec``.

        Its ``max_tokens``, else this agent's rule, else ``default``.
        """
        if spec.max_tokens is not None:
            return spec.max_tokens
        if callable(self.reserve_tokens):
            return max(int(self.reserve_tokens(spec)), 0)
        if self.reserve_tokens is not None:
            return self.reserve_tokens
        return default


@dataclass
class AgentContext:
    """What an agent receives beside its spec.

    ``held_tokens`` is what the step reserved from the workflow budget (``None`` when
    there is no cap). Before each LLM call an agent calls :meth:`check_tokens` (which
    refuses when the hold is spent and caps the call), and after it :meth:`charge`.
    Under a provider limit it also waits for :meth:`admit_call` before each request,
    settles the admission with the call's real usage, and reports a 429 with
    :meth:`pause_limit`.
    """

    spec: AgentStepSpec
    """The step being run."""
    held_tokens: int | None = None
    """Tokens this step holds from the budget; ``None`` means uncapped."""
    deadline: float | None = None
    """``time.monotonic()`` value past which the step times out, if it has a timeout."""
    worker: str = "local"
    """Where the step runs (for humans)."""
    events: EventSink | None = None
    """The sink step events go to."""
    workflow_id: str | None = None
    """The workflow (journal / budget key) the step belongs to, when known."""
    used: TokenUsage = NO_USAGE
    """Tokens charged so far by this step."""
    budget: WorkflowBudget | None = None
    """The workflow budget the step draws from; model calls reserve their dollars in it."""
    cost_micros: int = 0
    """Micro-dollars this step's priced model calls cost so far."""
    priced_calls: int = 0
    """Model calls of this step that had a price (``cost_usd`` is ``None`` without any)."""
    cancellation: Cancellation | None = None
    """The step's cancel signal, when it can be cancelled (see :meth:`check_cancelled`)."""

    def check_cancelled(self) -> None:
        """Raise :class:`~fleet.cancel.StepInterrupted` if the step was cancelled.

        A cancel interrupts the step's task at its current ``await``; a library that
        swallows that ``CancelledError`` (redis-py's asyncio client can, mid-command)
        would let the agent go on to its model request. The context checks here after
        its own Redis calls (a call's dollar hold, its provider-limit admission).
        """
        cancellation = self.cancellation
        if cancellation is not None and cancellation.cancelled:
            raise StepInterrupted(cancellation.reason or "cancelled")

    @property
    def cost_usd(self) -> Decimal | None:
        """Dollars this step's model calls cost (``None`` when none was priced)."""
        return micros_to_usd(self.cost_micros) if self.priced_calls else None

    async def hold_call(
        self,
        price: ModelPrice | None,
        *,
        model: str,
        agent: str,
        prompt_tokens: int,
        max_tokens: int,
        unknown_price: UnknownPrice = "refuse",
    ) -> CallHold:
        """Before a model call: reserve its worst case in dollars, capping ``max_tokens``.

        Without a budget nothing is reserved (the cost is still counted). An unpriced
        model is refused only where dollars are counted (the workflow or an account
        above it has a dollar limit) unless ``unknown_price`` is ``"allow"``: its cost
        could not be counted, and a silent zero would overspend that limit. Under a
        token-only budget it runs (its tokens are still held and charged).

        Raises:
            AgentError: ``no_price`` — the model has no price (before any request).
            BudgetExhaustedError: not even one completion token fits the dollars left.
        """
        if price is None:
            if (
                self.budget is not None
                and unknown_price != "allow"
                and await self.budget.counts_dollars()
            ):
                raise AgentError(no_price_message(model, agent), kind="no_price")
            return CallHold(self, None, None, max_tokens)
        if self.budget is None:
            return CallHold(self, price, None, max_tokens)
        reservation, cap = await self.budget.reserve_call(
            price,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            holder=self.spec.task_id,
            reservation_id=f"{self.spec.task_id}:call:{uuid.uuid4().hex[:12]}",
        )
        try:
            self.check_cancelled()
        except StepInterrupted:
            await asyncio.shield(reservation.settle(0))
            raise
        return CallHold(self, price, reservation, cap)

    limit: ProviderLimit | None = None
    """The provider limit the agent's calls count against (``None``: none)."""
    limiter: RateLimiter | None = None
    """Where the host keeps provider limits (in memory locally, Redis on a fleet)."""
    model: str = ""
    """The model of the step's last model call (``""`` before any): a metrics label."""
    traceparent: str | None = None
    """The W3C trace context the step's span descends from (its round on another process);
    ``None``: the current span, if any."""
    deltas: DeltaPublisher | None = None
    """Where :meth:`emit_delta` sends text (``None``: nobody can read it; nothing is sent)."""
    attempt: str = ""
    """This run's fencing token on a fleet worker: the value of the worker's lease on the
    step, different for every attempt (``""`` in-process). An agent that writes outside
    fleet can store it with what it writes, so a stale attempt's write can be told apart."""
    fence: Callable[[], None] | None = None
    """Called by :meth:`check_tokens` before every LLM call: raises ``AgentError``
    (``cancelled``) once the worker's lease on the step has lapsed, so a worker cut off
    from Redis spends nothing more (``None`` in-process)."""

    def emit_delta(self, text: str, *, replace: bool = False) -> None:
        """Publish a piece of the step's output as it is produced (``step_delta`` events).

        Deltas go to the workflow's delta channel, never to the journal: in process to
        ``Workflow.subscribe(deltas=True)`` subscribers, on a fleet to a capped Redis stream
        (``fleet watch ROOT --output``, the dashboard). Pieces are coalesced, so calling
        this per token is fine. Never blocks, never raises.

        Args:
            text: the new text.
            replace: start the step's text over (a new model call whose answer replaces
                what was shown).
        """
        if self.deltas is None or not isinstance(text, str):
            return
        try:
            self.deltas.emit(text, replace=replace)
        except Exception:
            logging.getLogger("fleet.deltas").exception(
                "step %r: could not publish an output delta", self.spec.task_id
            )

    def tokens_left(self) -> int | None:
        """Tokens the step may still spend (``None`` when uncapped)."""
        if self.held_tokens is None:
            return None
        return max(self.held_tokens - self.used.total_tokens, 0)

    def check_tokens(self, wanted: int | None = None, *, prompt_estimate: int = 0) -> int | None:
        """Check the hold before an LLM call and return the call's token cap.

        Args:
            wanted: the completion tokens the call would like (``None``: no preference).
            prompt_estimate: tokens the prompt is expected to take out of the hold.

        Returns:
            ``min(wanted, left - prompt_estimate)``; ``wanted`` itself when uncapped.

        Raises:
            BudgetExhaustedError: nothing is left for a completion.
            AgentError: ``cancelled`` — the worker's lease on the step lapsed (:attr:`fence`).
        """
        if self.fence is not None:
            self.fence()
        left = self.tokens_left()
        if left is None:
            return wanted
        room = left - prompt_estimate
        if room <= 0:
            metrics.budget_refused()
            raise BudgetExhaustedError(
                f"step {self.spec.task_id!r} has spent its token hold "
                f"({self.used.total_tokens} / {self.held_tokens} tokens"
                + (f", next prompt needs about {prompt_estimate}" if prompt_estimate else "")
                + "); raise the step's max_tokens or the workflow budget",
                consumed=self.used.total_tokens,
                limit=self.held_tokens,
                requested=prompt_estimate,
            )
        return room if wanted is None else min(wanted, room)

    def charge(self, usage: TokenUsage) -> None:
        """Record one call's actual usage against the step."""
        self.used = self.used + usage

    def remaining_s(self) -> float | None:
        """Seconds until the step's deadline (``None`` without a timeout)."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    async def admit_call(self, tokens: int, *, lease_s: float = 60.0) -> Admission:
        """Wait until one model call of ``tokens`` fits under the agent's provider limit.

        Args:
            tokens: the call's estimate: prompt estimate plus its ``max_tokens``.
            lease_s: the longest the call can take (its in-flight slot lapses after it).

        Returns:
            The admission; settle it with the call's real usage. Without a limit (or a
            limiter) nothing is counted and the admission settles to nothing.

        Raises:
            AgentError: ``timeout`` when no room opens before the step's deadline,
                ``rate_limit`` when one call needs more tokens than the whole window.
        """
        if self.limit is None or self.limiter is None:
            return Admission(None, None)
        limit = self.limit

        def waited(seconds: float) -> None:
            metrics.rate_limit_wait(limit.name, seconds)
            self.emit(
                RateLimited(
                    limit=limit.name,
                    wait_s=round(seconds, 3),
                    task_id=self.spec.task_id,
                    agent=self.spec.agent,
                )
            )

        admission = await admit(
            self.limiter,
            limit,
            tokens,
            deadline=self.deadline,
            lease_s=lease_s,
            label=f"step {self.spec.task_id!r} (agent {self.spec.agent!r})",
            on_wait=waited,
        )
        try:
            self.check_cancelled()
        except StepInterrupted:
            await asyncio.shield(admission.settle(0))
            raise
        return admission

    async def pause_limit(self, seconds: float) -> None:
        """The provider answered 429: admit no call under the limit, fleet-wide, for ``seconds``."""
        if self.limit is None or self.limiter is None:
            return
        log = logging.getLogger("fleet.limits")
        try:
            left = await self.limiter.pause(self.limit, seconds)
        except Exception as error:  # the call's own retry still honours the wait
            log.warning(
                "limit %r: could not record the provider's pause (%s)", self.limit.name, error
            )
        else:
            log.warning(
                "limit %r: the provider answered 429 to step %r; every call under it waits "
                "%.2f s, fleet-wide",
                self.limit.name,
                self.spec.task_id,
                left,
            )

    def emit(self, event: Any) -> None:
        """Send an event to the step's sink (never blocks, never raises)."""
        emit(self.events, event)


@dataclass
class CallHold:
    """One model call's dollars, from :meth:`AgentContext.hold_call` until :meth:`settle`."""

    ctx: AgentContext
    """The step's context (its cost is added up there)."""
    price: ModelPrice | None
    """The model's price; ``None`` for an unpriced model run with ``unknown_price = "allow"``."""
    reservation: Reservation | None
    """The call's worst case held in the budget (``None`` without a budget or a price)."""
    max_tokens: int
    """The call's ``max_tokens``, capped so that its worst case fits the dollars left."""

    async def settle(self, usage: TokenUsage | None) -> None:
        """After the call: charge its real cost (``None``: no usage known, nothing billed).

        Runs to the end even when the caller is being cancelled: money spent is spent.
        """
        cost = 0
        if self.price is not None and usage is not None:
            cost = self.price.cost_micros(usage.prompt_tokens, usage.completion_tokens)
            self.ctx.cost_micros += cost
            self.ctx.priced_calls += 1
        if self.reservation is not None:
            await asyncio.shield(self.reservation.settle(0, used_micros=cost))
