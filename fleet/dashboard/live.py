"""A step's live output on the dashboard: its output deltas as server-sent events.

``GET /api/workflows/{root_id}/steps/{task_id}/live`` streams the step's ``step_delta``
events (:mod:`fleet.deltas`) from the run's Redis delta stream, each with its stream
entry id as the SSE ``id``, so a browser that reconnects (``Last-Event-ID``) resumes
after the last delta it got: nothing missed, nothing twice. A first request starts where
the run's first delta can be (:func:`~fleet.deltas.start_cursor`, on Redis's clock). The
stream ends (``event: end``) once the run ended, or was abandoned (its host stopped
heartbeating), and every delta is sent.

Only with ``dashboard_show_output`` on (``FLEET_DASHBOARD_SHOW_OUTPUT=1``): outputs can
be sensitive. Prompts are never sent. Only a fleet run has live output; a run logged to a
SQLite file gets a 404 saying so.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..deltas import decode_entries, start_cursor
from ..eventbus import delta_stream_key, event_stream_key

if TYPE_CHECKING:
    from .app import Dashboard

__all__ = ["LiveOutput"]

_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
_ID = re.compile(r"[^\x00-\x1f\x7f/]{1,200}")
_BLOCK_MS = 500
_CHECK_END_S = 1.0
_KEEPALIVE_S = 15.0
_MAX_STREAMS = 64
"""Live outputs served at once; more get 503."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class LiveOutput:
    """The live-output route of one dashboard (see the module docstring)."""

    def __init__(self, board: Dashboard) -> None:
        self.board = board
        self.show = board.settings.dashboard_show_output
        self.streams = 0

    async def api_live(self, request: Request) -> Response:
        """Serve a step's live output as server-sent events."""
        root_id = str(request.path_params.get("root_id", ""))
        task_id = str(request.path_params.get("task_id", ""))
        if not (_ID.fullmatch(root_id) and _ID.fullmatch(task_id)):
            return _error(400, "malformed root or task id: 1 to 200 characters, no control ones")
        if not self.show:
            return _error(
                403,
                "live output is hidden: the operator turns it on with "
                "FLEET_DASHBOARD_SHOW_OUTPUT=1 (dashboard_show_output)",
            )
        view = await self.board.view(root_id)
        source = self.board.catalog.source_of(root_id)
        if view is None or source is None:
            return _error(404, f"no workflow {root_id!r} is logged here")
        if not source.is_redis:
            return _error(404, f"workflow {root_id!r} has no live output: only fleet runs do")
        if self.streams >= _MAX_STREAMS:
            return _error(503, f"{_MAX_STREAMS} live outputs are open; close one and retry")
        cursor = request.headers.get("last-event-id") or ""
        if not _ENTRY_ID.fullmatch(cursor):
            cursor = view.start_entry or ""
            cursor = "(" + cursor if _ENTRY_ID.fullmatch(cursor) else "0"
        key = delta_stream_key(root_id, key_prefix=self.board.settings.key_prefix)
        return StreamingResponse(
            self._stream(request, source.url, key, root_id, task_id, cursor),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        self, request: Request, url: str, key: str, root_id: str, task_id: str, cursor: str
    ) -> AsyncIterator[str]:
        from ..redis.clients import async_client

        self.streams += 1
        client = async_client(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            if cursor.startswith("("):  # the run's start entry: begin where its deltas can
                cursor = await self._start(client, root_id, cursor[1:])
            yield "retry: 1000\n\n"
            quiet_since = time.monotonic()
            checked = -_CHECK_END_S
            ended = False
            while not await request.is_disconnected():
                block = None if ended else _BLOCK_MS
                reply = cast(list[Any], await client.xread({key: cursor}, block=block, count=500))
                entries = [item for _stream, items in reply or [] for item in items]
                for raw_id, raw in entries:
                    cursor = bytes(raw_id).decode()
                    fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                    for delta in decode_entries(cursor, fields):
                        if delta.task_id != task_id:
                            continue
                        quiet_since = time.monotonic()
                        data = delta.model_dump(include={"text", "attempt", "offset"})
                        yield f"id: {cursor}\nevent: delta\ndata: {json.dumps(data)}\n\n"
                if ended and not entries:
                    yield "event: end\ndata: {}\n\n"
                    return
                if time.monotonic() - checked > _CHECK_END_S:
                    checked = time.monotonic()
                    view = await self.board.view(root_id)
                    ended = view is None or view.ended_as is not None or bool(view.abandoned)
                if time.monotonic() - quiet_since > _KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0)
        finally:
            self.streams -= 1
            await client.aclose()

    async def _start(self, client: Any, root_id: str, start_id: str) -> str:
        """The cursor before a run's first delta (its log's ``start`` entry is ``start_id``)."""
        events = event_stream_key(root_id, key_prefix=self.board.settings.key_prefix)
        before = cast(
            list[Any], await client.xrevrange(events, max=f"({start_id}", min="-", count=1)
        )
        return start_cursor(start_id, bytes(before[0][0]).decode() if before else None)
