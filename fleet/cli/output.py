"""``fleet watch ROOT --output``: the live text of a fleet run's steps, from its delta stream.

A thread follows the run's Redis stream of output deltas (:mod:`fleet.deltas`) beside the
event log ``fleet watch`` already follows. Every step gets one line per update, at most
every :data:`LINE_EVERY_S`, showing the end of its text; with ``--step TASK_ID`` only that
step's text is written out as it arrives, whole. A step that starts its text over (a new
model call) or is run again after its worker died says so on a line of its own, so text
is never silently doubled.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ..config import mask_url
from ..deltas import LiveText, read_deltas, start_cursor
from ..eventbus import delta_stream_key, event_stream_key
from ..events import StepDelta
from ..urls import REDIS_SCHEMES
from .progress import say

__all__ = ["LINE_EVERY_S", "LiveOutput", "OutputFollower"]

LINE_EVERY_S = 0.5
"""A step's line is printed at most this often (its text keeps growing in between)."""
TAIL = 80
"""Characters of a step's text its line shows (the newest ones)."""
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _tail(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TAIL else "…" + flat[-(TAIL - 1) :]


class OutputFollower:
    """Prints a run's live output from a thread of its own until :meth:`stop`.

    Args:
        redis_url: the fleet's Redis.
        root_id: the run's root id.
        key_prefix: the fleet's key prefix.
        start_id: the stream id of the run's ``start`` entry in its event log: deltas
            are read from :func:`~fleet.deltas.start_cursor` on (``None``: all of them).
        step: print only this step's text, whole, as it arrives.
        out: where to write (default ``sys.stdout``).
    """

    def __init__(
        self,
        redis_url: str,
        root_id: str,
        *,
        key_prefix: str = "fleet",
        start_id: str | None = None,
        step: str | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.key = delta_stream_key(root_id, key_prefix=key_prefix)
        self.events_key = event_stream_key(root_id, key_prefix=key_prefix)
        self.step = step
        self.start_id = start_id if start_id and _ENTRY_ID.fullmatch(start_id) else None
        self.cursor = "0"
        self.live = LiveText()
        self._url = redis_url
        self._out = out or sys.stdout
        self._shown: dict[str, int] = {}
        self._printed_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watch-output", daemon=True)
        self.error: Exception | None = None

    def start(self) -> OutputFollower:
        """Start following."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Print what is still pending (the run ended) and stop."""
        self._stopping.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        from ..redis.clients import sync_client

        client: Any = sync_client(self._url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            if self.start_id is not None:
                self.cursor = self._start(client, self.start_id)
            while True:
                stopping = self._stopping.is_set()
                deltas = read_deltas(client, self.key, self.cursor, block_s=0 if stopping else 0.2)
                for delta in deltas:
                    self.cursor = delta.id
                    self._show(delta)
                if not deltas:
                    self._flush_lines(force=stopping)
                    if stopping:
                        return
        except Exception as error:  # reported by the caller; the event lines go on
            self.error = error
        finally:
            client.close()

    def _start(self, client: Any, start_id: str) -> str:
        """Where the run's deltas begin: on Redis's clock, after any earlier run's entries."""
        before = client.xrevrange(self.events_key, max=f"({start_id}", min="-", count=1)
        previous = bytes(before[0][0]).decode() if before else None
        return start_cursor(start_id, previous)

    def _show(self, delta: StepDelta) -> None:
        task = delta.task_id
        if self.step is not None and task != self.step:
            return
        before = self.live.text.get(task, "")
        restarted = self.live.fold(delta)
        text = self.live.text[task]
        if self.step is None:
            if restarted:
                self._write(f"  > {task}: (run again from the start on another worker)\n")
            self._flush_lines(force=False)
            return
        if restarted:
            self._write(f"\n--- {task}: run again from the start on another worker ---\n")
        elif delta.offset < len(before):
            self._write(f"\n--- {task}: a new answer ---\n")
        self._write(text[delta.offset if not restarted else 0 :])

    def _flush_lines(self, *, force: bool) -> None:
        if self.step is not None:
            self._out.flush()
            return
        now = time.monotonic()
        for task, text in self.live.text.items():
            if self._shown.get(task) == hash(text):
                continue
            if not force and now - self._printed_at.get(task, 0.0) < LINE_EVERY_S:
                continue
            self._shown[task] = hash(text)
            self._printed_at[task] = now
            self._write(f"  > {task}: {_tail(text)}\n")

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


class LiveOutput:
    """``--output`` of ``fleet watch``: follows the run's delta stream once the run starts."""

    def __init__(
        self, key_prefix: str, root_id: str, step: str | None, *, enabled: bool = True
    ) -> None:
        self.key_prefix = key_prefix
        self.root_id = root_id
        self.step = step
        self.enabled = enabled
        self.follower: OutputFollower | None = None

    def on_entry(self, fields: Mapping[str, str], events: str | None, entry_id: str) -> None:
        """Follow the run's output from its ``start`` entry (``entry_id``) until its ``end``."""
        if not self.enabled:
            return
        control = fields.get("control")
        if control == "start":
            self.begin(events, entry_id)
        elif control == "end":
            self.end()

    def begin(self, events: str | None, start_id: str | None) -> None:
        """The run started (its ``start`` entry is ``start_id``), logging to ``events``."""
        self.end()
        if events is None or not events.startswith(REDIS_SCHEMES):
            say(
                f"no live output for workflow {self.root_id}: only a fleet run (--executor "
                "celery) publishes it, to Redis; this run logs to "
                + (mask_url(events) if events else "nowhere")
            )
            return
        self.follower = OutputFollower(
            events, self.root_id, key_prefix=self.key_prefix, start_id=start_id, step=self.step
        ).start()

    def end(self) -> None:
        """Print what is pending and stop following."""
        follower, self.follower = self.follower, None
        if follower is None:
            return
        follower.stop()
        if follower.error is not None:
            say(f"live output stopped: {type(follower.error).__name__}: {follower.error}")
