"""The dashboard's web app: two pages, a JSON API under ``/api/`` and live updates.

Routes (all behind basic auth except ``/healthz``):

- ``GET /`` the workflow list; ``GET /workflows/{root_id}`` one workflow;
- ``GET /api/workflows`` (``?status=``, ``?limit=``) and ``GET /api/workflows/{root_id}``;
- ``GET /api/workflows/{root_id}/steps/{task_id}``: one step, with its output from the
  journal only when ``dashboard_show_text`` is on;
- ``GET /api/workflows/{root_id}/steps/{task_id}/live``: the step's live output as
  server-sent events, resumable with ``Last-Event-ID``, only with ``dashboard_show_output``
  on (:mod:`fleet.dashboard.live`);
- ``GET /api/workflows/{root_id}/events``: server-sent events, one ``data:`` line with the
  workflow's JSON whenever it changed, until the run ended;
- ``POST /api/workflows/{root_id}/cancel`` (JSON body, optional ``reason``): cancels the
  run on the cancel board it registered on (:mod:`fleet.cancel`);
- ``GET /api/asks`` and ``POST /api/workflows/{root_id}/asks/{name}``: the questions
  workflows wait on, and answers to them (:mod:`fleet.dashboard.asks`);
- ``GET /metrics``: Prometheus metrics with bounded labels (:mod:`fleet.dashboard.metrics`).

Bad input is a 4xx JSON ``{"error": ...}``; nothing ever answers with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import metrics as process_metrics
from ..config import FleetSettings
from .asks import ask_routes
from .auth import BasicAuth, dashboard_auth
from .data import Catalog
from .ledger import LedgerBudgets
from .live import LiveOutput
from .liveness import Liveness, board_for
from .metrics import render_metrics
from .views import WorkflowView

__all__ = ["STATUSES", "create_app"]

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATUSES = ("running", "finished", "cancelled", "failed", "abandoned")
"""The statuses a workflow is listed with."""

_ROOT_ID = re.compile(r"[^\x00-\x1f\x7f/]{1,200}")
_MAX_LIMIT = 1000
_MAX_STREAMS = 64
"""Live pages served at once; more get 503 (each polls its workflow's log)."""
_POLL_S = 0.4
_KEEPALIVE_S = 15.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE)


_NO_STORE = {"Cache-Control": "no-store"}


class Dashboard:
    """The routes' shared state: settings, the catalog of workflows, live streams."""

    def __init__(self, settings: FleetSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.liveness = Liveness(settings.key_prefix)
        self.ledgers = LedgerBudgets(settings)
        self.flower_url = settings.dashboard_flower_url
        self.show_text = settings.dashboard_show_text
        self.streams = 0
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    # -- data --------------------------------------------------------------------------

    async def listing(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        await asyncio.to_thread(self.catalog.refresh_all)
        views = self.catalog.views()
        for view in views:
            await self._mark(view)
        now = time.time()
        rows = [view.summary(now=now) for view in views]
        if status is not None:
            rows = [row for row in rows if row["status"] == status]
        return rows[:limit]

    async def view(self, root_id: str) -> WorkflowView | None:
        view = await asyncio.to_thread(self.catalog.refresh, root_id)
        if view is not None:
            await self._mark(view)
            await self.ledgers.mark(view)  # the budget as `fleet status` reads it
        return view

    async def _mark(self, view: WorkflowView) -> None:
        """Read whether the run's host is gone (its heartbeat lapsed)."""
        if view.ended_as is None:
            source = self.catalog.source_of(view.root_id)
            if source is not None:
                await self.liveness.mark(view, source.url)

    def detail(self, view: WorkflowView) -> dict[str, Any]:
        return view.detail(now=time.time(), flower_url=self.flower_url, show_text=self.show_text)

    def sources(self) -> list[dict[str, Any]]:
        return [
            {"where": source.where, "ok": source.error is None, "error": source.error}
            for source in self.catalog.sources
        ]

    # -- pages -------------------------------------------------------------------------

    async def index_page(self, request: Request) -> Response:
        rows = await self.listing(None, _MAX_LIMIT)
        return self._page(request, "index.html", {"rows": rows, "sources": self.sources()})

    async def workflow_page(self, request: Request) -> Response:
        root_id = _root_id(request)
        view = await self.view(root_id)
        if view is None:
            page = self._page(request, "missing.html", {"root_id": root_id})
            page.status_code = 404
            return page
        return self._page(request, "workflow.html", {"wf": self.detail(view)})

    def _page(self, request: Request, name: str, context: dict[str, Any]) -> Response:
        context = {**context, "flower_url": self.flower_url, "show_text": self.show_text}
        context["show_output"] = self.settings.dashboard_show_output
        return self.templates.TemplateResponse(request, name, context, headers=_NO_STORE)

    # -- API ---------------------------------------------------------------------------

    async def api_list(self, request: Request) -> Response:
        status = _query_choice(request, "status", STATUSES)
        limit = _query_int(request, "limit", default=200, low=1, high=_MAX_LIMIT)
        return JSONResponse(await self.listing(status, limit), headers=_NO_STORE)

    async def metrics(self, request: Request) -> Response:
        await asyncio.to_thread(self.catalog.refresh_all)
        for view in self.catalog.views():
            await self._mark(view)  # an abandoned run's steps count as interrupted
        # The workflows' figures, then this process's own registry (fleet.metrics), if on.
        text = render_metrics(self.catalog.views()) + process_metrics.exposition().decode()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def api_sources(self, request: Request) -> Response:
        return JSONResponse(self.sources(), headers=_NO_STORE)

    async def api_workflow(self, request: Request) -> Response:
        root_id = _root_id(request)
        view = await self.view(root_id)
        if view is None:
            return _error(404, f"no workflow {root_id!r} is logged in {self._places()}")
        return JSONResponse(self.detail(view), headers=_NO_STORE)

    async def api_step(self, request: Request) -> Response:
        root_id = _root_id(request)
        task_id = str(request.path_params.get("task_id", ""))
        if not _ROOT_ID.fullmatch(task_id):
            return _error(400, "malformed task id: 1 to 200 characters, no control characters")
        view = await self.view(root_id)
        step = view.find(task_id) if view is not None else None
        if view is None or step is None:
            return _error(404, f"workflow {root_id!r} has no step {task_id!r} logged")
        body = step.to_dict(self.flower_url, view.step_status(step))
        body["phase"] = view.phases[step.phase].name
        body["output"] = None
        if not self.show_text:
            body["output_note"] = "output text is hidden (dashboard_show_text is off)"
            return JSONResponse(body, headers=_NO_STORE)
        journal = view.journal_id(step)
        body["output"], body["output_note"] = await _journaled_output(
            self.settings, journal, task_id
        )
        return JSONResponse(body, headers=_NO_STORE)

    async def api_events(self, request: Request) -> Response:
        root_id = _root_id(request)
        if await self.view(root_id) is None:
            return _error(404, f"no workflow {root_id!r} is logged in {self._places()}")
        if self.streams >= _MAX_STREAMS:
            return _error(503, f"{_MAX_STREAMS} live pages are open; close one and reload")
        return StreamingResponse(
            self._stream(request, root_id),
            media_type="text/event-stream",
            headers={**_NO_STORE, "X-Accel-Buffering": "no"},
        )

    async def _stream(self, request: Request, root_id: str) -> AsyncIterator[str]:
        self.streams += 1
        try:
            sent = -1
            quiet_since = time.monotonic()
            while not await request.is_disconnected():
                view = await self.view(root_id)
                if view is not None and view.version != sent:
                    sent = view.version
                    quiet_since = time.monotonic()
                    yield f"data: {json.dumps(self.detail(view))}\n\n"
                    if view.ended_as is not None or view.abandoned:
                        yield "event: end\ndata: {}\n\n"
                        return
                elif time.monotonic() - quiet_since > _KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(_POLL_S)
        finally:
            self.streams -= 1

    async def api_cancel(self, request: Request) -> Response:
        root_id = _root_id(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # A cross-site form cannot send JSON without a preflight we never answer.
            return _error(415, "send the cancel as JSON (Content-Type: application/json)")
        try:
            body = json.loads((await request.body())[:10_000] or b"{}")
        except ValueError:
            return _error(400, 'the body is not JSON; send {} or {"reason": "..."}')
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
            return _error(400, "reason must be a string of at most 500 characters")
        view = await self.view(root_id)
        source = self.catalog.source_of(root_id)
        if view is None or source is None:
            return _error(404, f"no workflow {root_id!r} is logged in {self._places()}")
        if view.abandoned:
            return _error(409, f"workflow {root_id!r} is not running: {view.abandoned}")
        notice = await _request_cancel(
            self.settings, source.url, root_id, reason or "cancelled from the dashboard"
        )
        if notice is None:
            return _error(409, f"workflow {root_id!r} is not running (status {view.status})")
        return JSONResponse(
            {"root_id": root_id, "run_id": notice.run_id, "reason": notice.reason},
            status_code=202,
        )

    def _places(self) -> str:
        return ", ".join(source.where for source in self.catalog.sources) or "no place"


async def _journaled_output(
    settings: FleetSettings, journal: str | None, task_id: str
) -> tuple[str | None, str | None]:
    """The step's output from the run's journal, or why there is none."""
    from ..errors import FleetError
    from ..stores import open_store

    if journal is None:
        return None, "steps outside phases are not journaled"
    try:
        async with open_store(settings.store, key_prefix=settings.key_prefix) as store:
            checkpoint = await store.load(journal)
    except FleetError as error:
        return None, f"the journal cannot be read: {error}"
    for record in checkpoint.steps if checkpoint is not None else ():
        if record.task_id == task_id:
            return record.outcome.output, None
    return None, "not in the journal (failed steps are not kept; a finished run clears it)"


async def _request_cancel(settings: FleetSettings, url: str, root_id: str, reason: str) -> Any:
    board = board_for(url, settings.key_prefix)
    try:
        return await board.request(root_id, reason)
    finally:
        await board.close()


def _root_id(request: Request) -> str:
    root_id = str(request.path_params.get("root_id", ""))
    if not _ROOT_ID.fullmatch(root_id):
        shown = root_id if len(root_id) <= 60 else root_id[:60] + "..."
        raise HTTPException(
            400,
            f"malformed root id {shown!r}: 1 to 200 characters, no control characters or '/'",
        )
    return root_id


def _query_choice(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if value not in choices:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise HTTPException(400, f"{name} must be one of {', '.join(choices)}, got {shown!r}")
    return value


def _query_int(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    if len(value) > 12 or not value.isdigit() or not low <= int(value) <= high:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise HTTPException(400, f"{name} must be a whole number {low}..{high}, got {shown!r}")
    return int(value)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if request.url.path.startswith("/api/") or error.status_code != 404:
        return _error(error.status_code, str(error.detail))
    return PlainTextResponse("not found", status_code=404)


async def _crash(request: Request, error: Exception) -> Response:
    logger.exception("dashboard request %s %s failed", request.method, request.url.path)
    return _error(500, f"the dashboard failed on this request ({type(error).__name__})")


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(settings: FleetSettings, *, catalog: Catalog | None = None) -> Starlette:
    """The dashboard app for ``settings`` (basic auth from ``dashboard_user``/``_password``).

    Raises:
        ConfigError: no dashboard password is configured.
    """
    user, password = dashboard_auth(settings)
    board = Dashboard(settings, catalog or Catalog(settings))
    answer_routes, asks = ask_routes(settings, board.catalog)  # Workflow.ask: list, answer
    live = LiveOutput(board)
    routes = [
        Route("/", board.index_page),
        Route("/healthz", _healthz),
        Route("/metrics", board.metrics),
        Route("/workflows/{root_id}", board.workflow_page),
        Route("/api/workflows", board.api_list),
        Route("/api/sources", board.api_sources),
        Route("/api/workflows/{root_id}", board.api_workflow),
        Route("/api/workflows/{root_id}/events", board.api_events),
        Route("/api/workflows/{root_id}/steps/{task_id}", board.api_step),
        Route("/api/workflows/{root_id}/steps/{task_id}/live", live.api_live),
        Route("/api/workflows/{root_id}/cancel", board.api_cancel, methods=["POST"]),
        *answer_routes,
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asks.close()
            board.catalog.close()

    return Starlette(
        routes=routes,
        middleware=[Middleware(BasicAuth, user=user, password=password)],
        exception_handlers={HTTPException: _http_error, Exception: _crash},
        lifespan=lifespan,
    )
