"""The delta stream's entries and their readers: where to start, how to fold them.

A fleet's workers append a workflow's output deltas to a Redis stream (see
:mod:`fleet.deltas`), several steps' deltas to one entry (:func:`encode_entry`). Readers
(the workflow, ``fleet watch ROOT --output``, the dashboard) decode them
(:func:`decode_entries`, :func:`read_deltas`), start where a run's first delta can be
(:func:`start_cursor`) and fold them into each step's text (:class:`LiveText`), which
also serves an in-process ``Workflow.subscribe(deltas=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from .events import StepDelta

if TYPE_CHECKING:
    from .eventbus import Lagged

__all__ = [
    "START_MARGIN_S",
    "LiveText",
    "decode_entries",
    "encode_entry",
    "read_deltas",
    "start_cursor",
]

START_MARGIN_S = 60.0
"""A run's deltas are looked for from this long before its log's ``start`` entry: a
worker may write a step's first text before the host's first log write lands."""


def encode_entry(deltas: list[tuple[str, str, int, str]]) -> dict[str, str]:
    """Deltas as one Redis stream entry: ``(task_id, attempt, offset, text)`` each.

    One entry carries what a process had for one stream at one flush, at most one delta
    per step run, so a tick of many streaming steps is one ``XADD``, not one per step.
    """
    return {"d": json.dumps(deltas, ensure_ascii=False, separators=(",", ":"))}


def decode_entries(entry_id: str, fields: Mapping[str, str]) -> list[StepDelta]:
    """A Redis stream entry's deltas, each with the entry's id (none if it holds none)."""
    try:
        if "d" in fields:
            rows: Any = json.loads(fields["d"])
        else:  # one delta as single fields (what a worker of an older version writes)
            rows = [[fields["t"], fields.get("a", ""), fields.get("o", 0), fields.get("x", "")]]
        return [
            StepDelta(task_id=task, attempt=attempt, offset=int(offset), text=text, id=entry_id)
            for task, attempt, offset, text in rows
        ]
    except (KeyError, ValueError, TypeError):
        return []


def read_deltas(
    client: Any, key: str, cursor: str, *, block_s: float = 0.0, count: int = 500
) -> list[StepDelta]:
    """The deltas after entry ``cursor`` of stream ``key`` (a sync Redis ``client``).

    Waits up to ``block_s`` for the first one when none is there yet. Pass the last
    delta's ``id`` back as ``cursor`` to read on: nothing is missed, nothing repeated
    (as long as the stream still holds it: it keeps about :data:`DELTA_MAXLEN` entries).
    """
    block = max(int(block_s * 1000), 1) if block_s > 0 else None
    reply = cast(list[Any], client.xread({key: cursor}, block=block, count=count))
    deltas = []
    for _stream, items in reply or []:
        for raw_id, raw in items:
            fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
            deltas.extend(decode_entries(bytes(raw_id).decode(), fields))
    return deltas


_LAST_SEQUENCE = 2**64 - 1


def start_cursor(
    start_id: str, previous_id: str | None = None, *, margin_s: float = START_MARGIN_S
) -> str:
    """Where a reader of a run's delta stream starts, to see every delta of that run.

    Both ids come from the run's event log, a Redis stream on the same server (and slot)
    as its delta stream, so they are on the clock that stamps the deltas: a host whose
    clock is off makes no difference. Ids of two streams compare by their millisecond
    only (sequence numbers count per stream), so the deltas of ``previous_id``'s
    millisecond are read too: one of an earlier run among them is another attempt of its
    step (:class:`LiveText` tells).

    Args:
        start_id: the stream id of the run's ``start`` entry in its event log.
        previous_id: the id of the entry before it there (an earlier run's last), if
            any: what was written before it belongs to earlier runs.
        margin_s: how long before ``start_id`` a delta of the run may have been written.

    Returns:
        A stream id to read after: the last one before ``margin_s`` before ``start_id``,
        or before ``previous_id``'s millisecond when that is later.
    """
    first = int(start_id.partition("-")[0]) - int(margin_s * 1000)
    if previous_id is not None:
        first = max(first, int(previous_id.partition("-")[0]))
    return f"{first - 1}-{_LAST_SEQUENCE}" if first > 0 else "0-0"


class LiveText:
    """Folds deltas into each step's current text (what ``fleet watch --output`` shows).

    A delta that does not continue the text held (its ``offset`` lies beyond it: a delta
    before it was lost), or a :class:`~fleet.eventbus.Lagged` marker naming the step (a
    subscriber that fell behind dropped some of its deltas), marks the step's text
    incomplete (:attr:`incomplete`): its text then lacks what was lost. It is whole again
    once the step's text starts over (a new model call, or a new attempt).
    """

    def __init__(self) -> None:
        self.text: dict[str, str] = {}
        """Each step's text so far."""
        self.attempts: dict[str, str] = {}
        """Each step's newest attempt."""
        self.restarts: dict[str, int] = {}
        """How many times each step started over on another attempt."""
        self.incomplete: set[str] = set()
        """Steps whose :attr:`text` misses pieces that were lost on the way."""

    def fold(self, delta: StepDelta | Lagged) -> bool:
        """Apply one delta (or a ``lagged`` marker); returns whether it began a new attempt.

        A new attempt is one of a step seen before (run again from the start).
        """
        if not isinstance(delta, StepDelta):
            self.incomplete.update(delta.steps)
            return False
        task = delta.task_id
        seen = self.attempts.get(task)
        restarted = seen is not None and seen != delta.attempt
        if restarted:
            self.restarts[task] = self.restarts.get(task, 0) + 1
            self.text[task] = ""
        self.attempts[task] = delta.attempt
        held = self.text.get(task, "")
        if delta.offset == 0 or restarted:
            self.incomplete.discard(task)
        if delta.offset > len(held):
            self.incomplete.add(task)
        self.text[task] = held[: delta.offset] + delta.text
        return restarted
