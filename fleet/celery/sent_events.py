"""Celery's ``task-sent`` events for one batch of sends, published as one message.

Celery publishes a ``task-sent`` event per message it sends (monitoring, e.g. Flower, shows a
task as *sent* from it): one more broker write per step on the host. The host sends a round's
steps in batches, so it hands Celery a :class:`SentEvents` as the send's event dispatcher,
which keeps each event, and publishes the batch as one ``task.multi`` message afterwards: the
batched form Celery's own workers use for their task events, which every event receiver
(Flower, ``celery events``) reads as the same events one by one.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset

__all__ = ["SentEvents", "sent_dispatcher"]


def sent_dispatcher(app: Celery) -> Any:
    """The dispatcher Celery itself uses for sends (never enabled; no socket opened).

    Kept for its exchange, serializer, clock and identity.
    """
    return app.events.Dispatcher(enabled=False)


class SentEvents:
    """The ``task-sent`` events of one batch of sends (pass it as ``event_dispatcher``)."""

    def __init__(self, dispatcher: Any) -> None:
        """``dispatcher``: from :func:`sent_dispatcher`, kept for the sender's life."""
        self._dispatcher = dispatcher
        self.events: list[dict[str, Any]] = []

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        """Keep one event (called by Celery for each message it sends)."""
        dispatcher = self._dispatcher
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
