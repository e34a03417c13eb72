"""Celery's ``task-sent`` events, published in batches rather than one message each.

Celery publishes a ``task-sent`` event per message it sends (monitoring, e.g. Flower, shows a
task as *sent* from it): one more broker write per step on the host. The host hands Celery a
:class:`SentEvents` as its sends' event dispatcher, which keeps each event, and publishes
what it kept as one ``task.multi`` message at most :data:`SENT_LINGER_S` later: the batched
form Celery's own workers use for their task events (they linger too), which every event
receiver (Flower, ``celery events``) reads as the same events one by one.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset

__all__ = ["SENT_LINGER_S", "SentEvents", "sent_dispatcher"]

SENT_LINGER_S = 0.05
"""How long a ``task-sent`` event may wait for others to go out with it."""


def sent_dispatcher(app: Celery) -> Any:
    """The dispatcher Celery itself uses for sends (never enabled; no socket opened).

    Kept for its exchange, serializer, clock and identity.
    """
    return app.events.Dispatcher(enabled=False)


class SentEvents:
    """``task-sent`` events kept for one publish (pass it as ``event_dispatcher``).

    Used from one thread (the executor's sender).
    """

    def __init__(self, dispatcher: Any) -> None:
        """``dispatcher``: from :func:`sent_dispatcher`, kept for the sender's life."""
        self._dispatcher = dispatcher
        self.events: list[dict[str, Any]] = []
        self._first_at = 0.0

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        """Keep one event (called by Celery for each message it sends)."""
        dispatcher = self._dispatcher
        if not self.events:
            self._first_at = time.monotonic()
        self.events.append(
            Event(
                type,
                hostname=dispatcher.hostname,
                utcoffset=utcoffset(),
                pid=dispatcher.pid,
                clock=dispatcher.clock.forward(),
                **fields,
            )
        )

    def due(self) -> bool:
        """Whether the oldest kept event has waited :data:`SENT_LINGER_S`."""
        return bool(self.events) and time.monotonic() - self._first_at >= SENT_LINGER_S

    def flush(self, producer: Any, retry_policy: dict[str, Any] | None = None) -> None:
        """Publish the kept events in one message (one event: as Celery would have)."""
        if not self.events:
            return
        batch, self.events = self.events, []
        exchange = self._dispatcher.exchange
        producer.publish(
            batch[0] if len(batch) == 1 else batch,
            routing_key=batch[0]["type"].replace("-", ".") if len(batch) == 1 else "task.multi",
            exchange=exchange.name,
            declare=[exchange],
            serializer=self._dispatcher.serializer,
            headers=self._dispatcher.headers,
            delivery_mode=self._dispatcher.delivery_mode,
            retry=retry_policy is not None,
            retry_policy=retry_policy,
        )
