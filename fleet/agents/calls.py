"""One model call's share of its step: the token cap, the dollar hold, the charge, the span.

Every model agent fleet runs makes each model call inside :func:`model_call`, whatever
speaks to the server (the OpenAI-compatible agent's own transport, a pydantic-ai model):

1. *before the call* the step's token hold is checked and the call's ``max_tokens``
   capped to what it still covers after an estimate of the prompt (nothing left →
   ``budget_exhausted``, before any request);
2. the call's worst case in dollars is held in the workflow budget, its ``max_tokens``
   capped further to fit (an unpriced model is refused ``no_price`` where dollars are
   counted); the hold's lease is kept alive while the call runs;
3. the caller sends the request and :meth:`ModelCall.charge` s the usage it reports;
4. *after the call*, also when it failed or was cancelled, the real cost is settled and
   the rest of the dollar hold released; the call is a ``chat {model}`` span (GenAI
   conventions, no text) and counted in the metrics with its outcome (``ok``,
   ``failed`` or ``cancelled``). A call refused before it was sent (the token hold, the
   dollars) is no call: the budget's refusal is counted instead.

Admission under a provider limit stays with the caller, around each HTTP attempt
(:meth:`fleet.agents.AgentContext.admit_call`), since retries happen inside a call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .. import metrics, telemetry
from ..cancel import StepInterrupted
from ..pricing import ModelPrice, UnknownPrice
from ..spec import TokenUsage
from .base import AgentContext, CallHold

__all__ = ["ModelCall", "model_call"]


@dataclass
class ModelCall:
    """One model call in progress, from :func:`model_call` until its block ends."""

    ctx: AgentContext
    """The step's context (its hold, its usage so far)."""
    max_tokens: int | None
    """The call's completion-token cap after the step's tokens and dollars (``None``:
    nothing caps it: no budget and no wish of the caller's)."""
    capped: bool
    """Whether fleet lowered ``max_tokens`` below what the caller wanted."""
    prompt_estimate: int
    """Tokens the prompt is expected to take."""
    span: Any
    """The call's ``chat`` span (``None`` with tracing off)."""
    charged: TokenUsage | None = None
    """What :meth:`charge` recorded (``None``: no usage known, nothing billed)."""

    def charge(self, usage: TokenUsage) -> None:
        """Charge the usage the server reported for this call to the step."""
        self.ctx.charge(usage)
        self.charged = usage if self.charged is None else self.charged + usage

    def finished(self, reason: object) -> None:
        """Note the call's finish reason on its span (if there is one)."""
        if self.span is not None and reason is not None:
            self.span.set_attribute("gen_ai.response.finish_reasons", [str(reason)])


@contextlib.asynccontextmanager
async def model_call(
    ctx: AgentContext,
    *,
    agent: str,
    model: str,
    system: str,
    price: ModelPrice | None,
    unknown_price: UnknownPrice,
    wanted: int | None,
    prompt_estimate: int,
    attributes: dict[str, Any] | None = None,
) -> AsyncIterator[ModelCall]:
    """Hold one model call against its step for the block (see the module's docstring).

    Args:
        ctx: the step's context.
        agent: the agent's name (for messages and metrics).
        model: the model the call goes to.
        system: the provider, for the span (``gen_ai.system``).
        price: the model's price (``None``: unpriced).
        unknown_price: what to do with an unpriced model under a budget.
        wanted: the completion tokens the caller would allow (``None``: no wish).
        prompt_estimate: tokens the prompt is expected to take.
        attributes: more span attributes (never prompt or answer text).

    Raises:
        BudgetExhaustedError: the step's hold (or the dollars left) cannot cover the call.
        AgentError: ``no_price`` for an unpriced model where dollars are counted.
    """
    cap = ctx.check_tokens(wanted, prompt_estimate=prompt_estimate)
    names = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": system,
        "gen_ai.request.model": model,
        "fleet.step.task_id": ctx.spec.task_id,
        "fleet.step.agent": ctx.spec.agent,
    }
    with telemetry.span(f"chat {model}", {**names, **(attributes or {})}) as span:
        before = ctx.used
        hold = await ctx.hold_call(
            price,
            model=model,
            agent=agent,
            prompt_tokens=prompt_estimate,
            max_tokens=cap if cap is not None else wanted or 0,
            unknown_price=unknown_price,
        )
        if hold.reservation is not None:
            cap = hold.max_tokens
        call = ModelCall(
            ctx,
            max_tokens=cap,
            capped=cap is not None and (wanted is None or cap < wanted),
            prompt_estimate=prompt_estimate,
            span=span,
        )
        outcome: metrics.CallOutcome = "failed"
        try:
            async with _kept(hold):
                yield call
            outcome = "ok"
        except (asyncio.CancelledError, StepInterrupted):
            outcome = "cancelled"
            raise
        finally:
            await hold.settle(call.charged)
            if span is not None:
                used = ctx.used
                span.set_attribute(
                    "gen_ai.usage.input_tokens", used.prompt_tokens - before.prompt_tokens
                )
                span.set_attribute(
                    "gen_ai.usage.output_tokens", used.completion_tokens - before.completion_tokens
                )
            ctx.model = model
            metrics.model_call(ctx.spec.agent, model, outcome)


@contextlib.asynccontextmanager
async def _kept(hold: CallHold) -> AsyncIterator[None]:
    """Renew the call's dollar hold while it runs (nothing to renew without one)."""
    if hold.reservation is None:
        yield
        return
    async with hold.reservation.kept_alive():
        yield
