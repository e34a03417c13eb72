"""Where the dashboard reads workflows from, and the catalog of their views.

The dashboard reads the places ``fleet run`` writes to with the same settings: the fleet's
Redis (the streams ``{key_prefix}:events:*``, found by ``SCAN``) and the journal's SQLite
file (its ``fleet_events`` table). :class:`Catalog` keeps one
:class:`~fleet.dashboard.views.WorkflowView` per root id and reads each log incrementally
from where it stopped, so a refresh costs only the entries written since the last one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

from ..config import FleetSettings, mask_url
from ..runlog import LogReader, open_log_reader
from ..runner import plan_run
from .values import float_or_none
from .views import WorkflowView

__all__ = ["Catalog", "Source"]

_RETRY_S = 5.0
"""How long the list leaves a place alone after it failed to answer."""


@dataclass
class Source:
    """One place run logs are read from."""

    url: str
    """``sqlite:PATH`` or a Redis URL (with its password: never shown)."""
    key_prefix: str
    where: str = ""
    error: str | None = None
    """Why the last read failed (``None``: it worked)."""
    retry_at: float = 0.0
    """After a failure, the list skips this place until then (monotonic seconds)."""
    _reader: LogReader | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.where = mask_url(self.url)

    @property
    def is_redis(self) -> bool:
        """Whether this is the fleet's Redis (else a SQLite journal file)."""
        return not self.url.startswith("sqlite:")

    def reader(self) -> LogReader:
        """The (lazily opened) reader."""
        if self._reader is None:
            self._reader = open_log_reader(self.url, key_prefix=self.key_prefix)
        return self._reader

    def close(self) -> None:
        """Release the reader's connection."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass
class _Tracked:
    source: Source
    view: WorkflowView
    cursor: str | None = None


class Catalog:
    """Every workflow the sources have a log of, refreshed incrementally.

    Thread-safe: the app calls it from worker threads (the readers block).

    Args:
        settings: the fleet settings (``redis_url``, ``store``, ``key_prefix``).
        max_workflows: how many root ids to track per source (the newest first where the
            source can tell).
    """

    def __init__(self, settings: FleetSettings, *, max_workflows: int = 500) -> None:
        self.settings = settings
        self.max_workflows = max_workflows
        urls: list[str] = []
        for executor in ("local", "celery"):
            events = plan_run(settings, executor=executor).events
            if events is not None and events not in urls:
                urls.append(events)
        self.sources = [Source(url, settings.key_prefix) for url in urls]
        self._tracked: dict[str, list[_Tracked]] = {}
        self._lock = threading.Lock()
        self._listed_at = 0.0

    def close(self) -> None:
        """Close every source's connection."""
        with self._lock:
            for source in self.sources:
                source.close()

    def refresh_all(self, *, min_interval_s: float = 1.0) -> None:
        """Discover root ids and read what every log gained (at most once per interval)."""
        with self._lock:
            if time.monotonic() - self._listed_at < min_interval_s:
                return
            for source in self.sources:
                if time.monotonic() < source.retry_at:
                    continue
                try:
                    roots = source.reader().root_ids(limit=self.max_workflows)
                    for root_id in roots:
                        self._read(self._track(source, root_id))
                    source.error = None
                except Exception as error:  # an unreachable place: say so, show the others
                    source.error = _describe(error)
                    source.retry_at = time.monotonic() + _RETRY_S
                    source.close()
            self._listed_at = time.monotonic()

    def refresh(self, root_id: str) -> WorkflowView | None:
        """Read what ``root_id``'s logs gained; its newest run, or ``None`` if unknown."""
        with self._lock:
            tracked = self._tracked.get(root_id)
            if tracked is None:
                for source in self.sources:
                    with contextlib.suppress(Exception):
                        if source.reader().last_start(root_id) is not None:
                            self._track(source, root_id)
                tracked = self._tracked.get(root_id, [])
            for item in tracked:
                try:
                    self._read(item)
                except Exception as error:
                    item.source.error = _describe(error)
                    item.source.close()
            return self._newest(root_id)

    def views(self) -> list[WorkflowView]:
        """The newest run of every known root id, newest start first."""
        with self._lock:
            found = [self._newest(root_id) for root_id in self._tracked]
        views = [view for view in found if view is not None]
        return sorted(views, key=lambda view: view.started_at or 0.0, reverse=True)

    def source_of(self, root_id: str) -> Source | None:
        """The source holding the newest run of ``root_id``."""
        with self._lock:
            newest = self._newest(root_id)
            for item in self._tracked.get(root_id, []):
                if item.view is newest:
                    return item.source
        return None

    def _track(self, source: Source, root_id: str) -> _Tracked:
        items = self._tracked.setdefault(root_id, [])
        for item in items:
            if item.source is source:
                return item
        item = _Tracked(source, WorkflowView(root_id=root_id, source=source.where))
        items.append(item)
        return item

    def _newest(self, root_id: str) -> WorkflowView | None:
        views = [item.view for item in self._tracked.get(root_id, []) if item.view.run_id]
        if not views:
            return None
        return max(views, key=lambda view: view.started_at or 0.0)

    def _read(self, item: _Tracked) -> None:
        reader = item.source.reader()
        if item.cursor is None:
            start = reader.last_start(item.view.root_id)
            if start is None:
                return
            item.cursor = start
        while True:
            page = reader.after(item.view.root_id, item.cursor, wait_s=0.0)
            now = time.time()
            for entry in page:
                item.cursor = entry.cursor
                if entry.fields.get("control") == "start":
                    item.view = WorkflowView(
                        root_id=item.view.root_id,
                        source=item.source.where,
                        run_id=entry.fields.get("run"),
                        started_at=float_or_none(entry.fields.get("at")),
                        start_entry=entry.cursor,
                        version=item.view.version + 1,
                    )
                    item.view.last_seen = now
                else:
                    item.view.fold(entry.fields, now=now)
            if len(page) < 500:
                return


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {mask_url(str(error))}"
