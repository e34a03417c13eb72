"""The verbs a workflow program is written in: agent, parallel, phase, pipeline, loop, ask.

:class:`WorkflowVerbs` runs each verb under the run's cancellation and output deltas
(``_verb``) and, after the steps of one settle, records the budget and reports a
``budget_exhausted`` event once per workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .. import telemetry
from ..cancel.signal import use_cancellation
from ..combinators import LoopPredicate, execute_loop, execute_pipeline, execute_steps_parallel
from ..deltas import use_deltas
from ..errors import AskError, WorkflowCancelledError
from ..events import BudgetExhausted, PhaseEnd, PhaseStart
from ..executor import PipelineStage
from ..resumable import execute_steps_parallel_resumable
from ..spec import AgentStepSpec, StepOutcome
from .lifecycle import WorkflowLifecycle

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["WorkflowVerbs"]

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")
D = TypeVar("D")
_NO_DEFAULT: Any = object()
"""``Workflow.ask`` without a ``default``: a timeout raises ``AskTimeout``."""


class WorkflowVerbs(WorkflowLifecycle):
    """The verbs of :class:`fleet.Workflow`; each runs only while the workflow is open."""

    async def _verb(self, verb: str, body: Callable[[], Awaitable[T]]) -> T:
        """Run a verb under the workflow's cancellation; a cancel of its caller cancels it."""
        self._check_open()
        run = self._run
        if run.cancellation.cancelled:
            raise WorkflowCancelledError(run.root_id, run.cancellation.reason or "cancelled")
        if not run.begun:
            await self._begin()
        reader = run.read_deltas()
        if reader is not None and not reader.done():
            # No delta is sent before the reader is in place; a failed one is logged at the end.
            with contextlib.suppress(Exception):
                await asyncio.shield(reader)
        run.running_verbs += 1
        try:
            with use_cancellation(run.cancellation), use_deltas(run.deltas):
                result = await body()
        except asyncio.CancelledError:
            await self._cancel(f"the task awaiting Workflow.{verb} was cancelled")
            raise
        finally:
            run.running_verbs -= 1
        if run.board is not None and not run.cancellation.cancelled:
            # The workers read the board too, and may stop their steps before the
            # watcher's next look: without this, a cancelled run could end 'finished'.
            with contextlib.suppress(Exception):  # the watcher warns about an unreadable board
                await self._heed(run.board)
        return result

    async def agent(self, spec: AgentStepSpec) -> StepOutcome:
        """Run one step (not journaled); a failure comes back as a failed outcome."""
        outcomes = await self.parallel([spec])
        if not outcomes:
            return StepOutcome.failed(spec.task_id, spec.agent, "step produced no outcome")
        return outcomes[0]

    async def parallel(self, specs: Sequence[AgentStepSpec]) -> list[StepOutcome]:
        """A barrier fan-out (:func:`fleet.execute_steps_parallel`); not journaled."""

        async def body() -> list[StepOutcome]:
            run = self._run
            if telemetry.active() is None:
                outcomes = await execute_steps_parallel(
                    run.executor, specs, events=run.on_step_event
                )
            else:
                attributes = {"fleet.workflow.id": run.root_id}
                with telemetry.span("parallel", attributes, parent=self._trace()):
                    outcomes = await execute_steps_parallel(
                        run.executor, specs, events=run.on_step_event
                    )
            await self._observe_budget(outcomes)
            return outcomes

        return await self._verb("parallel", body)

    async def phase(self, name: str, specs: Sequence[AgentStepSpec]) -> list[StepOutcome]:
        """A named barrier fan-out: the workflow's milestone and resume boundary.

        Emits ``phase_start`` before any step runs and ``phase_end`` (counts of
        succeeded / failed outcomes, journaled ones counted as succeeded) after, then
        ``budget_exhausted`` if the budget ran out (once per workflow). With a store,
        the phase is journaled under ``"{root_id}/{name}"`` (``#2``, ``#3``… when the
        name repeats in one run); completed steps found there are not run again. With
        tracing on it is a ``phase`` span, a child of the workflow's span.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a phase needs a non-empty name, got {name!r}")
        return await self._verb("phase", lambda: self._traced_phase(name, list(specs)))

    async def _traced_phase(self, name: str, specs: list[AgentStepSpec]) -> list[StepOutcome]:
        if telemetry.active() is None:
            return await self._phase(name, specs)
        attributes = {"fleet.workflow.id": self._run.root_id, "fleet.phase.name": name}
        with telemetry.span("phase", attributes, parent=self._trace()):
            return await self._phase(name, specs)

    async def _phase(self, name: str, specs: list[AgentStepSpec]) -> list[StepOutcome]:
        run = self._run
        index = run.phase_count
        run.phase_count += 1
        journal = run.journal_id(name) if run.store is not None else None
        if journal is not None:
            await self._retain("keep", journals=[journal])  # an ended run's journal, resumed
        run.publish(PhaseStart(name=name, index=index, step_count=len(specs)))
        if run.store is not None and journal is not None:
            outcomes = await execute_steps_parallel_resumable(
                run.executor,
                specs,
                journal,
                run.store,
                events=run.on_step_event,
                keep_journal=True,
            )
        else:
            outcomes = await execute_steps_parallel(run.executor, specs, events=run.on_step_event)
        succeeded = sum(1 for outcome in outcomes if outcome.success)
        run.publish(
            PhaseEnd(name=name, index=index, succeeded=succeeded, failed=len(outcomes) - succeeded)
        )
        await self._observe_budget(outcomes)
        return outcomes

    async def pipeline(
        self, items: Sequence[Any], stages: Sequence[PipelineStage]
    ) -> list[StepOutcome | None]:
        """Per-item chains with no barrier between stages (:func:`fleet.execute_pipeline`)."""

        async def body() -> list[StepOutcome | None]:
            run = self._run
            results = await execute_pipeline(run.executor, items, stages, events=run.on_step_event)
            await self._observe_budget([result for result in results if result is not None])
            return results

        return await self._verb("pipeline", body)

    async def loop(
        self, initial: Sequence[AgentStepSpec], max_iterations: int, next: LoopPredicate
    ) -> list[StepOutcome]:
        """Barrier rounds until ``next`` stops them (:func:`fleet.execute_loop`)."""

        async def body() -> list[StepOutcome]:
            run = self._run
            outcomes = await execute_loop(
                run.executor, initial, max_iterations, next, events=run.on_step_event
            )
            await self._observe_budget(outcomes)
            return outcomes

        return await self._verb("loop", body)

    @overload
    async def ask(
        self, name: str, *, question: str, schema: type[M], timeout_s: float | None = None
    ) -> M: ...

    @overload
    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: type[M],
        timeout_s: float | None = None,
        default: D,
    ) -> M | D: ...

    @overload
    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        default: Any = ...,
    ) -> Any: ...

    async def ask(
        self,
        name: str,
        *,
        question: str,
        schema: Any = None,
        timeout_s: float | None = None,
        default: Any = _NO_DEFAULT,
    ) -> Any:
        """Ask a person (or a system) and wait for the answer; a durable wait.

        The question, its schema and an absolute deadline are journaled in the run's
        store; an ``asked`` event is published; the program then waits, holding no step
        reservation, until ``fleet answer ROOT NAME``, the dashboard or
        :func:`fleet.asks.give_answer` gives an answer that fits (the first one wins; an
        ``answered`` event says who). A re-run of the program returns a journaled answer
        at once, and an answer given before the program got here is kept.

        Args:
            name: unique within the workflow: 1 to 100 letters, digits or ``_ . : -``.
            question: what to ask, shown by ``fleet asks``, ``fleet status`` and the page.
            schema: a pydantic model class (the answer comes back as an instance), a JSON
                Schema dict, or ``None`` (any JSON value).
            timeout_s: seconds from when the workflow first asked (an absolute deadline,
                kept across re-runs); ``None`` waits for ever.
            default: returned when the deadline passes unanswered.

        Raises:
            AskTimeout: the deadline passed unanswered and no ``default`` was given.
            AskError: the name was already asked in this run, is malformed, the schema is
                not usable, or the workflow has no store to journal in.
            WorkflowCancelledError: the workflow was cancelled while waiting.
        """
        from ..asks import NO_DEFAULT, ask_book_for, wait_for_answer

        run = self._run
        if name in run.asked or run.store is None:
            raise AskError(
                f"workflow {run.root_id!r} already asked {name!r}; give each ask its own name"
                if run.store is not None
                else f"ask {name!r} needs a journal to wait durably: build the workflow "
                "with .with_store(...) (fleet run always gives it one)",
                name=name,
            )
        run.asked.add(name)
        book = run.ask_book = run.ask_book or ask_book_for(run.store)

        async def body() -> Any:
            return await wait_for_answer(
                book,
                run.root_id,
                name,
                question=question,
                schema=schema,
                timeout_s=timeout_s,
                default=NO_DEFAULT if default is _NO_DEFAULT else default,
                publish=run.publish,
                cancellation=run.cancellation,
            )

        return await self._verb("ask", body)

    async def _observe_budget(self, outcomes: Sequence[StepOutcome]) -> None:
        run = self._run
        if run.exhausted_reported and run.stream is None:
            return
        refused = any(outcome.error == "budget_exhausted" for outcome in outcomes)
        snapshot = await run.record_budget(flush=True)
        exhausted = snapshot is not None and snapshot.is_exhausted
        if run.exhausted_reported or not (exhausted or refused):
            return
        run.exhausted_reported = True
        resource, reason = "workflow_tokens", "workflow token budget exhausted"
        if snapshot is not None:
            if snapshot.limit_usd is not None and snapshot.consumed_usd >= snapshot.limit_usd:
                resource, reason = "workflow_usd", "workflow dollar budget exhausted"
                reason += f" (${snapshot.consumed_usd} / ${snapshot.limit_usd})"
            else:
                limit = "unlimited" if snapshot.limit_tokens is None else snapshot.limit_tokens
                reason += f" ({snapshot.consumed_tokens} / {limit} tokens)"
        if not exhausted:
            refusal = next(o for o in outcomes if o.error == "budget_exhausted")
            if "dollar budget" in refusal.output:
                resource = "workflow_usd"
            reason += "; a step was refused its " + (
                "dollar reservation" if resource == "workflow_usd" else "token reservation"
            )
        run.publish(BudgetExhausted(resource=resource, reason=reason))
