"""The Celery fleet host's executor: each step is a Celery task on a Redis broker.

:class:`CeleryExecutor` is an :class:`~fleet.AgentExecutor`; combinators never learn
that a step ran on another machine. How it places work:

* **Steps** become one generic named task, ``fleet.run_step``; the spec travels as JSON
  text. A round is sent as Celery groups (a sliding window of at most ``max_in_flight``
  steps); a pipeline whose stages are all registered by name on the workers is sent as
  Celery chains (``fleet.run_stage``), otherwise the combinator drives it from here.
* **Results** come back on the host's Redis reply list that the workers push to, so
  the host waits on one ``BLPOP`` instead of polling each task. The barrier is this
  host collecting one outcome per step: duplicates are ignored, so it fires exactly once.
* **Exactly-once effect**: every step has a task id derived from (workflow id, step
  task id, step identity) when its round is journaled, else a fresh one. Before running,
  a worker atomically checks the step's done-marker and takes a lease
  (``SET NX PX``, renewed while it runs); a duplicated or redelivered message finds one
  of them and does not run the agent again.
* **Recovery**: on Redis a message a worker took is lost if the worker is SIGKILLed
  (celery#4354). The host re-sends, under the same task id, a step no worker claimed
  within ``claim_timeout_s``, and a claimed step whose lease lapsed (its worker died)
  as soon as it notices; see ``docs/CELERY.md`` for the time bound.
* **Budget guard**: the host reserves a step's tokens before the task is sent; a
  refused step is never sent and fails with ``budget_exhausted``.
* **Backpressure**: at most ``max_in_flight`` steps per executor are queued or
  running, and sending pauses while the broker queue is longer than
  ``queue_high_water`` (``LLEN`` of the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from celery import Celery, group
from kombu.pools import ProducerPool
from pydantic import ValidationError

from ..agents.registry import AgentRegistry, load_agents
from ..config import FleetSettings, load_settings
from ..deltas import DeltaChannel, RedisDeltaChannel
from ..errors import ConfigError
from ..events import EventSink
from ..executor import AgentExecutor, OutcomeCallback, PipelineStage
from ..perloop import PerLoop
from ..redis.keys import Keys
from ..spec import AgentStepSpec, StepOutcome
from .app import configure_app, load_stages
from .dispatch import Dispatcher
from .pipeline import Pipeline
from .round import Round
from .sent_events import SENT_LINGER_S, SentEvents, sent_dispatcher

if TYPE_CHECKING:
    from ..budget import WorkflowBudget

__all__ = ["CeleryExecutor"]

logger = logging.getLogger("fleet.celery")


def _json_roundtrips(value: Any) -> bool:
    try:
        return bool(json.loads(json.dumps(value)) == value)
    except (TypeError, ValueError):
        return False


class CeleryExecutor(AgentExecutor):
    """Runs every step as a Celery task on a Redis-backed worker fleet.

    Args:
        redis_url: broker, result backend, journal and budget store; default from settings
            (``FLEET_REDIS_URL``).
        max_in_flight: steps (or pipeline chains) of this executor queued or running at
            once; also its concurrency hint.
        budget: a :class:`~fleet.WorkflowBudget`; each step's tokens are reserved before
            its task is sent. With a Redis ledger the worker settles what it used.
        settings: the settings to start from (default: :func:`fleet.config.load_settings`).
        queue: the Celery queue steps go to.
        claim_timeout_s: a sent step nobody has claimed within this is re-sent.
        step_lease_s: a worker's claim on a step; a lapsed lease marks its worker dead.
        queue_high_water: sending pauses while the queue holds more messages than this.
        key_prefix: prefix of the Redis keys fleet writes (must match the workers').
        default_reserve_tokens: reservation for a step with no ``max_tokens`` whose agent
            names no default.
        worker_journal: workers write each successful step of a journaled round into the
            fleet's Redis journal (``{key_prefix}:journal:{workflow_id}``) at the step
            boundary, before the host hears of it. Use it when the workflow's store is a
            :class:`~fleet.stores.RedisCheckpointStore` on the same Redis and prefix.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        max_in_flight: int | None = None,
        budget: WorkflowBudget | None = None,
        settings: FleetSettings | None = None,
        queue: str | None = None,
        claim_timeout_s: float | None = None,
        step_lease_s: float | None = None,
        queue_high_water: int | None = None,
        key_prefix: str | None = None,
        default_reserve_tokens: int | None = None,
        worker_journal: bool = False,
    ) -> None:
        overrides = {
            name: value
            for name, value in {
                "redis_url": redis_url,
                "max_in_flight": max_in_flight,
                "queue": queue,
                "claim_timeout_s": claim_timeout_s,
                "step_lease_s": step_lease_s,
                "queue_high_water": queue_high_water,
                "key_prefix": key_prefix,
                "default_reserve_tokens": default_reserve_tokens,
            }.items()
            if value is not None
        }
        if settings is None:
            self.settings = load_settings(**overrides)
        else:
            try:
                self.settings = FleetSettings(**{**settings.model_dump(), **overrides})
            except ValidationError as error:
                raise ConfigError(f"invalid CeleryExecutor options: {error}") from None
        self.budget = budget
        self.worker_journal = worker_journal
        self.keys = Keys(self.settings.key_prefix)
        self._app: Celery | None = None
        self._producers: Any = None
        """This executor's own broker connections and producers (kombu pools, untyped)."""
        self._sender: ThreadPoolExecutor | None = None
        self._sent: SentEvents | None = None
        """The ``task-sent`` events kept for one publish (used on the sender thread)."""
        self._flush_due = False
        # One dispatcher per event loop (an executor may outlive an asyncio.run()); its
        # collector and Redis connections are closed when that loop ends, if not before.
        self._dispatchers: PerLoop[Dispatcher] = PerLoop(
            lambda: Dispatcher(self), close=lambda dispatcher: dispatcher.aclose()
        )
        self._registry: AgentRegistry | None = None
        self._stage_names: dict[int, str] | None = None
        lease, claim = self.settings.step_lease_s, self.settings.claim_timeout_s
        self.check_interval_s = min(max(min(lease, claim) / 4, 0.05), 1.0)
        """How often in-flight steps are checked for a lost message or a dead worker."""

    def __repr__(self) -> str:
        return (
            f"CeleryExecutor(redis_url={self.settings.masked_redis_url()!r}, "
            f"queue={self.settings.queue!r}, max_in_flight={self.settings.max_in_flight})"
        )

    def delta_channel(self, root_id: str) -> DeltaChannel:
        """The workflow's delta stream on the fleet's Redis, which workers append to."""
        return RedisDeltaChannel(self.settings.redis_url, self.keys.deltas(root_id))

    def concurrency_hint(self) -> int:
        """The configured per-workflow ``max_in_flight``."""
        return self.settings.max_in_flight

    # ------------------------------------------------------------------ lifecycle

    @property
    def app(self) -> Celery:
        """The Celery app used to send tasks (created on first use)."""
        if self._app is None:
            app = configure_app(self.settings)
            # Outcomes come back on the reply lists, never through Celery's result backend.
            # With one, sending a group subscribes a Redis channel per step (the group's
            # barrier), and each AsyncResult.__del__ unsubscribes: Redis I/O from the
            # garbage collector, which raises while Redis restarts.
            app.conf.result_backend = "disabled"
            self._app = app
        return self._app

    def close(self) -> None:
        """Release the broker connections and the sender thread (the executor stays usable)."""
        if self._sender is not None:
            self._sender.submit(self._flush_sent)
            self._sender.shutdown(wait=True)
            self._sender = None
        self._sent = None
        if self._producers is not None:
            self._producers.force_close_all()
            self._producers.connections.force_close_all()
            self._producers = None
        if self._app is not None:
            self._app.close()
            self._app = None

    async def aclose(self) -> None:
        """Like :meth:`close`, and close this event loop's Redis connections too."""
        await self._dispatchers.aclose()
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> CeleryExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _dispatcher(self) -> Dispatcher:
        """This event loop's dispatcher (slots, reply list, collector, Redis client)."""
        return self._dispatchers.get()

    def _client(self) -> aioredis.Redis:
        """This event loop's Redis client (built without I/O; closed by :meth:`aclose`).

        It retries through a Redis restart (see :mod:`fleet.redis.clients`) instead of
        failing the steps in flight, and waits for one of its
        :data:`~fleet.celery.dispatch.HOST_CONNECTIONS` connections instead of failing.
        """
        return self._dispatcher().client()

    def registry(self) -> AgentRegistry:
        """The agents this host knows (to size reservations); built-ins if no agents file."""
        if self._registry is None:
            path = self.settings.agents_file
            self._registry = AgentRegistry(load_agents(path) if Path(path).is_file() else None)
        return self._registry

    def _stages(self) -> dict[int, str]:
        if self._stage_names is None:
            path = self.settings.agents_file
            found = load_stages(path) if Path(path).is_file() else {}
            self._stage_names = {id(func): name for name, func in found.items()}
        return self._stage_names

    async def _send(self, signatures: list[Any], *, as_group: bool) -> None:
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="fleet-celery-send")

        def send() -> bool:
            if self._producers is None:
                # Pools of this executor's own, closed with it: Celery's default producers
                # come from kombu's process-wide pools for the broker URL, which nothing
                # closes (app.close() only forgets them), so every executor left its
                # broker connections open (on Sentinel, its sentinel connections too).
                limit = self.app.conf.broker_pool_limit
                connections = self.app.connection_for_write().Pool(limit=limit)
                producer_pool: Any = ProducerPool
                self._producers = producer_pool(connections, limit=limit)
            with self._producers.acquire(block=True) as producer:
                # Celery's task-sent events are kept, to go out together (sent_events.py).
                sent = self._sent_events()
                # A group of one costs a group id and result bookkeeping for nothing.
                if as_group and len(signatures) > 1:
                    group(signatures).apply_async(producer=producer, event_dispatcher=sent)
                else:
                    for signature in signatures:
                        signature.apply_async(producer=producer, event_dispatcher=sent)
                if sent.due():
                    self._publish_sent(producer)
                return bool(sent.events)

        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._sender, send) and not self._flush_due:
            # The task-sent events kept go out with the next send, or at the latest now.
            self._flush_due = True
            loop.call_later(SENT_LINGER_S, self._flush_sent_later)

    def _sent_events(self) -> SentEvents:
        if self._sent is None:
            self._sent = SentEvents(sent_dispatcher(self.app))
        return self._sent

    def _flush_sent_later(self) -> None:
        self._flush_due = False
        if self._sender is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: close() flushed
                self._sender.submit(self._flush_sent)

    def _flush_sent(self) -> None:
        """Publish the ``task-sent`` events kept (on the sender thread, as every send)."""
        if self._sent is None or not self._sent.events or self._producers is None:
            return
        with self._producers.acquire(block=True) as producer:
            self._publish_sent(producer)

    def _publish_sent(self, producer: Any) -> None:
        assert self._sent is not None
        try:
            self._sent.flush(producer, self.app.conf.task_publish_retry_policy)
        except Exception as error:  # monitoring only: the steps themselves went out
            logger.warning("could not publish the task-sent events of sent steps: %s", error)

    # ------------------------------------------------------------------ the seam

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        """Send ``spec`` as one task and wait for its outcome; never raises."""
        return (await Round(self, [spec], events, None, None).run())[0]

    async def native_round(
        self,
        specs: Sequence[AgentStepSpec],
        *,
        events: EventSink | None = None,
        on_outcome: OutcomeCallback | None = None,
        workflow_id: str | None = None,
    ) -> list[StepOutcome] | None:
        """Send the round as Celery groups (a window of ``max_in_flight``), barrier here."""
        return await Round(self, list(specs), events, on_outcome, workflow_id).run()

    async def native_pipeline(
        self,
        items: Sequence[Any],
        stages: Sequence[PipelineStage],
        *,
        events: EventSink | None = None,
    ) -> list[StepOutcome | None] | None:
        """Send one Celery chain per item when every stage is registered on the workers.

        Declines (``None``: the combinator drives the chains from here, with identical
        results) when a stage is not registered by name, an item does not survive a
        JSON round trip unchanged, or a budget guards the workflow (each step must be
        reserved before it is sent, and only the worker knows a chain's next step).
        """
        if self.budget is not None or not stages:
            return None
        try:
            known = self._stages()
        except ConfigError:
            logger.warning(
                "cannot read the stages of %s; pipelines run host-driven", self.settings.agents_file
            )
            return None
        names = [known.get(id(stage)) for stage in stages]
        if None in names or not all(_json_roundtrips(item) for item in items):
            return None
        return await Pipeline(self, list(items), [str(n) for n in names], events).run()
