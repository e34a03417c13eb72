"""Celery task events sent in batches, on a timer, instead of after each loop turn.

Celery's consumer buffers the task events (``task-received``, ``task-started``,
``task-succeeded``...) and publishes what it holds after every turn of its event loop in
which one was sent. At hundreds of steps a second that is one publish (a Redis
``PUBLISH`` through kombu's producer) for every step or two, more of the worker's CPU
than a step's own claim. :class:`BatchTaskEvents`, a consumer bootstep, publishes them
every :data:`FLUSH_INTERVAL_S` instead (at once when :data:`BUFFER_LIMIT` wait), so
Flower and other event listeners see each event at most that much later, in the same
order. What is still buffered when the consumer stops is published then.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ["BUFFER_LIMIT", "FLUSH_INTERVAL_S", "BatchTaskEvents"]

FLUSH_INTERVAL_S = 0.1
"""How often the buffered task events are published."""
BUFFER_LIMIT = 256
"""Events buffered that are published at once, without waiting for the timer."""


def _flush(consumer: Any) -> None:
    dispatcher = consumer.event_dispatcher
    if dispatcher is not None:
        dispatcher.flush()


class BatchTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no type hints
    """Publishes the consumer's buffered task events every :data:`FLUSH_INTERVAL_S`.

    Runs after Celery's ``Events`` step, which makes a new event dispatcher each time
    the consumer (re)connects; this step's start takes that dispatcher's per-event
    publish hook away and starts the timer.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self._entry: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        """Take over the flushing of ``c``'s event dispatcher (event loop consumers only)."""
        dispatcher = c.event_dispatcher
        if c.hub is None or dispatcher is None or dispatcher.on_send_buffered is None:
            return  # no buffering here: Celery publishes each event as it is sent
        dispatcher.on_send_buffered = None
        dispatcher.buffer_limit = BUFFER_LIMIT
        self._entry = c.timer.call_repeatedly(FLUSH_INTERVAL_S, _flush, (c,))

    def stop(self, c: Any) -> None:
        """Stop the timer and publish what is buffered."""
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
            _flush(c)

    def shutdown(self, c: Any) -> None:
        """As :meth:`stop` (the worker is going away)."""
        self.stop(c)
