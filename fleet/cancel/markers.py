"""Cancel markers in the fleet's Redis, as the Celery host writes and the workers read them.

Every step message names its *cancel markers*: the run id of the workflow it belongs to
(left by ``fleet cancel`` or ``Workflow.cancel``) and the id of its round or pipeline
(left by the host when the caller of that round is cancelled). A marker is the key
``{prefix}:cancel:{marker}`` holding JSON with at least ``reason``; any one present
cancels the step:

* when a worker takes the message, it drops it without running the agent;
* while the step runs, the worker's lease thread (:class:`MarkerWatch`) sees it within
  :data:`WATCH_INTERVAL_S` and cancels the step's asyncio task, which closes its model
  request; the step ends ``error="cancelled"`` and settles what it used.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..runs.base import CANCEL_TTL_S, cancel_marker_key
from .signal import CANCELLED

__all__ = ["WATCH_INTERVAL_S", "MarkerWatch", "leave_markers", "marker_reason", "read_markers"]

logger = logging.getLogger("fleet.cancel")

WATCH_INTERVAL_S = 0.25
"""How often a worker looks at the markers of the steps it runs."""


def marker_reason(raw: bytes | str | None) -> str | None:
    """The ``reason`` a marker value holds (``None`` when there is no marker)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return CANCELLED
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason) if reason else CANCELLED


def read_markers(client: Any, markers: Sequence[str], *, key_prefix: str) -> str | None:
    """The reason of the first marker present among ``markers`` (one ``MGET``), else ``None``.

    ``client`` is a blocking ``redis.Redis`` (a worker's).
    """
    if not markers:
        return None
    keys = [cancel_marker_key(m, key_prefix=key_prefix) for m in markers]
    for raw in client.mget(keys):
        if raw is not None:
            return marker_reason(raw)
    return None


async def leave_markers(
    client: Any, markers: Sequence[str], reason: str, *, key_prefix: str, ttl_s: int = CANCEL_TTL_S
) -> None:
    """Leave a marker for each of ``markers`` (an existing one, e.g. ``fleet cancel``'s, is kept).

    ``client`` is a ``redis.asyncio.Redis`` (the host's).
    """
    value = json.dumps({"reason": reason, "at": time.time()})
    async with client.pipeline(transaction=False) as pipe:
        for marker in markers:
            pipe.set(cancel_marker_key(marker, key_prefix=key_prefix), value, ex=ttl_s, nx=True)
        await pipe.execute()


class MarkerWatch:
    """The cancel markers of the steps running in one worker process.

    Steps register with a thread-safe ``cancel(reason)`` callable (for a step on an
    event loop: ``functools.partial(loop.call_soon_threadsafe, cancellation.cancel)``);
    :meth:`poll`, called from one background thread, reads every marker in one ``MGET``
    and calls ``cancel`` once for each step whose marker appeared.
    """

    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix
        self._steps: dict[str, tuple[tuple[str, ...], Callable[[str], object]]] = {}
        self._lock = threading.Lock()

    def watch(self, step: str, markers: Sequence[str], cancel: Callable[[str], object]) -> None:
        """Cancel ``step`` through ``cancel(reason)`` when one of ``markers`` appears."""
        if markers:
            with self._lock:
                self._steps[step] = (tuple(markers), cancel)

    def unwatch(self, step: str) -> None:
        """Stop watching ``step`` (it ended)."""
        with self._lock:
            self._steps.pop(step, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._steps)

    def poll(self, client: Any) -> int:
        """Read the markers once and cancel the steps they name; returns how many."""
        with self._lock:
            steps = list(self._steps.items())
        if not steps:
            return 0
        markers = sorted({marker for _step, (names, _cancel) in steps for marker in names})
        keys = [cancel_marker_key(m, key_prefix=self.key_prefix) for m in markers]
        present = {m: raw for m, raw in zip(markers, client.mget(keys), strict=True) if raw}
        if not present:
            return 0
        cancelled = 0
        for step, (names, cancel) in steps:
            hit = next((name for name in names if name in present), None)
            if hit is None:
                continue
            self.unwatch(step)
            try:
                cancel(marker_reason(present[hit]) or CANCELLED)
            except Exception:  # e.g. its loop closed as it ended: the other steps still stop
                logger.exception("could not stop step %s for its cancel marker", step)
                continue
            cancelled += 1
        return cancelled
