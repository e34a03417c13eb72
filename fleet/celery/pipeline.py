"""One pipeline on the Celery host: per-item Celery chains of registered stages.

The host writes the items and a :class:`~fleet.celery.protocol.PipelineContext` into
one Redis hash and sends one chain per item (a window of ``max_in_flight`` chains)
through the executor's shared :class:`~fleet.celery.dispatch.Dispatcher`. Then it only
watches: the workers move each item stage to stage and tell the host about every link;
a chain whose due link was lost is sent again from that link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import chain
from redis.exceptions import RedisError

from ..cancel.markers import leave_markers
from ..cancel.signal import CANCELLED
from ..events import EventSink, StepFinished, StepStarted, emit
from ..spec import StepOutcome
from .protocol import (
    PROTOCOL_VERSION,
    STAGE_TASK,
    Finished,
    Limited,
    PipelineContext,
    StageMessage,
    Started,
    Stopped,
    stage_link_id,
)
from .records import result_grace_s
from .round import SEND_BATCH
from .track import Flight, Notice, Track

if TYPE_CHECKING:
    from .executor import CeleryExecutor

__all__ = ["Pipeline"]


@dataclass(eq=False, kw_only=True)
class _Chain(Flight):
    """One item's chain as the host tracks it: which link is due, and what came of it."""

    index: int
    stage: int = 0
    finished: bool = False
    final: StepOutcome | None = None


class Pipeline(Track):
    """Per-item Celery chains of registered stages; the host only watches and recovers."""

    def __init__(
        self,
        executor: CeleryExecutor,
        items: list[Any],
        stages: list[str],
        events: EventSink | None,
    ) -> None:
        super().__init__(executor, events)
        self.items = items
        self.stages = stages
        self.pipe = uuid.uuid4().hex[:20]
        self.chains = [
            _Chain(tid=stage_link_id(self.pipe, i, 0), nonce=self.pipe, owner=self, index=i)
            for i in range(len(items))
        ]
        self.open = len(items)
        run_markers = self.cancellation.markers if self.cancellation is not None else ()
        self.markers = [*run_markers, self.pipe]
        """What a worker checks before and while running a link of this pipeline."""

    async def run(self) -> list[StepOutcome | None]:
        """Run every chain to its end; each item's last outcome (``None``: declined)."""
        client = await self.dispatcher.ready()
        context = PipelineContext(
            stages=self.stages,
            reply=self.dispatcher.reply,
            nonce=self.pipe,
            # Nobody listens for step_started: the host watches leases instead.
            announce=self.events is not None,
            cancel=self.markers,
            deltas=self.deltas_route,
        ).to_json()
        key = self.keys.pipe(self.pipe)
        try:
            for start in range(0, len(self.items), 500):
                fields: dict[str | bytes, str | bytes] = {"ctx": context}
                for i in range(start, min(start + 500, len(self.items))):
                    fields[f"item:{i}"] = json.dumps(self.items[i])
                # One MULTI/EXEC: the hash never exists without its expiry (a crash between
                # two round trips would leave it forever).
                async with client.pipeline(transaction=True) as write:
                    write.hset(key, mapping=fields)  # type: ignore[arg-type]
                    write.expire(key, self.x.settings.result_expires_s)
                    await write.execute()
            try:
                await self.drive(self.chains)
            except asyncio.CancelledError:
                # The caller was cancelled: stop this pipeline's links on the workers.
                markers = self.markers if self.cancel.reason is not None else [self.pipe]
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.shield(
                        leave_markers(
                            client, markers, "the caller was cancelled", key_prefix=self.keys.prefix
                        )
                    )
                raise
        finally:
            with contextlib.suppress(RedisError):
                await self._forget(client, key)
        return [chain_.final for chain_ in self.chains]

    async def _forget(self, client: Any, key: str) -> None:
        """Drop the pipeline's hash (a late link then finds it expired) and let its results go."""
        grace_s = result_grace_s(self.x.settings.retention_s)
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete(key)
            for chain_ in self.chains:
                for stage in range(min(chain_.stage + 1, len(self.stages))):
                    link = stage_link_id(self.pipe, chain_.index, stage)
                    pipe.expire(self.keys.result(link, self.pipe), grace_s)
            await pipe.execute()

    def _signatures(self, chain_: _Chain) -> Any:
        """The chain from its due link on (whose later links' notices route to it too)."""
        chain_.routes = tuple(
            stage_link_id(self.pipe, chain_.index, stage)
            for stage in range(chain_.stage + 1, len(self.stages))
        )
        links = []
        for stage in range(chain_.stage, len(self.stages)):
            pointer = StageMessage(
                v=PROTOCOL_VERSION, pipe=self.pipe, item=chain_.index, stage=stage
            )
            links.append(
                self.x.app.signature(
                    STAGE_TASK,
                    args=(pointer.to_json(),) if stage == chain_.stage else (),
                    task_id=stage_link_id(self.pipe, chain_.index, stage),
                    queue=self.x.settings.queue,
                    argsrepr=f"{self.pipe} item {chain_.index} stage {stage}",
                    kwargsrepr="{}",
                )
            )
        return chain(*links)

    async def dispatch(self) -> None:
        """Send one chain per item, each once it holds a slot."""
        async for batch in self.dispatcher.batches(self.chains, SEND_BATCH):
            if self.cancel.reason is not None:
                return  # cancelled: the task's cancel may have been swallowed by a Redis call
            await self.dispatcher.send(batch, [self._signatures(c) for c in batch])

    async def resend(self, flights: list[Flight]) -> None:
        """Send lost chains again from their due link (after a cancel: they end cancelled)."""
        batch = [f for f in flights if isinstance(f, _Chain) and not f.finished]
        if self.cancel.started:
            for chain_ in batch:
                self._finish(chain_, self._cancelled(chain_))
            return
        if batch:
            await self.dispatcher.send(batch, [self._signatures(c) for c in batch])

    async def handle(self, flight: Flight, notice: Notice) -> None:
        """A link started, ran (the chain moves on or ends), or its stage stopped the chain."""
        chain_ = flight
        if not isinstance(chain_, _Chain) or chain_.finished or notice.id != chain_.tid:
            return  # a finished chain, or a duplicate's late word about an earlier link
        if isinstance(notice, Started):
            chain_.started = True
            started = StepStarted(
                task_id=notice.task_id,
                agent=notice.agent,
                host_task_id=chain_.tid,
                worker=notice.worker,
            )
            emit(self.events, started)
        elif isinstance(notice, Finished):
            outcome = notice.outcome
            emit(self.events, StepFinished.of(outcome, host_task_id=chain_.tid))
            chain_.stage += 1
            if not outcome.success or chain_.stage == len(self.stages):
                self._finish(chain_, outcome)
            else:
                self.dispatcher.rekey(chain_, stage_link_id(self.pipe, chain_.index, chain_.stage))
        elif isinstance(notice, Stopped):
            self._finish(chain_, notice.outcome)
        elif isinstance(notice, Limited):
            emit(self.events, notice.event)

    async def tick(self) -> None:
        """After a cancel: mark it for the workers, end the chains that no worker runs."""
        if self.cancel.due():
            reason = self.cancel.begin()
            client = self.dispatcher.client()
            await leave_markers(client, self.markers, reason, key_prefix=self.keys.prefix)
            for chain_ in self.chains:
                if not chain_.finished and not chain_.sent_at:
                    self._finish(chain_, self._cancelled(chain_))
        elif self.cancel.expired():
            for chain_ in self.chains:
                if not chain_.finished:
                    self._finish(chain_, self._cancelled(chain_))

    def _cancelled(self, chain_: _Chain) -> StepOutcome:
        """The final outcome of a chain the cancel stopped before its due link ran."""
        stage = min(chain_.stage, len(self.stages) - 1)
        return StepOutcome.failed(
            stage_link_id(self.pipe, chain_.index, chain_.stage),
            self.stages[stage],
            f"pipeline item #{chain_.index} was cancelled before stage {chain_.stage} ran: "
            f"{self.cancel.reason or CANCELLED}",
            error=CANCELLED,
        )

    def _finish(self, chain_: _Chain, final: StepOutcome | None) -> None:
        chain_.final, chain_.finished = final, True
        self.open -= 1
        self.dispatcher.release(chain_)
        if self.open == 0:
            self.closed()
