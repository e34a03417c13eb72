"""The dashboard's questions: what workflows are waiting on (``Workflow.ask``), and answers.

- ``GET /api/asks`` → ``{"items": [{"root_id", "name", "question", "schema", "asked_at",
  "deadline", "note", "model"}]}``: the open questions of every workflow in the dashboard's
  places (``note``: why an earlier answer was not taken; ``model``: the pydantic model the
  program reads the answer with, whose own validators run only then);
- ``POST /api/workflows/{root_id}/asks/{name}`` with the answer as the JSON body: 200 when
  it is taken (or kept until the program asks), 409 when the ask is already answered or
  past its deadline, 422 when it does not fit the JSON Schema (``field`` says where), 404
  when neither the ask nor the workflow is known. The basic-auth user is recorded as ``by``.
  A 200 answer may still be refused by the program's ``model``: the ask is then listed
  again, its ``note`` saying why.

Open asks are listed from the places the dashboard reads run logs from (the journal's
SQLite file and the fleet's Redis: a run's asks are in its journal, one of them). An answer
goes to the book already holding the ask; an early one (nothing asked yet) goes to the run's
journal, found as ``fleet answer`` finds it, which is not always where its log is (a Celery
run with the default SQLite journal logs to Redis).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..asks import AskBook, give_answer, open_ask_book, open_asks, read
from ..config import FleetSettings, mask_url
from ..errors import AnswerRefused, AskError, ConfigError, FleetError
from ..runs.index import indexed
from ..runstatus import locate_run
from .data import Catalog

__all__ = ["AskDesk", "ask_routes"]

_ROOT_ID = re.compile(r"[^\x00-\x1f\x7f/]{1,200}")
_MAX_BODY = 64_000
_STATUS = {"answered": 409, "expired": 409, "invalid": 422, "unknown": 404}
_NO_STORE = {"Cache-Control": "no-store"}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=_NO_STORE)


def _user(request: Request, fallback: str) -> str:
    """The basic-auth user of the request (the middleware already checked the password)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(token.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, ValueError):
            user = ""
        if user:
            return user
    return fallback


class AskDesk:
    """The two ask routes over the catalog's places (one book per place, kept open)."""

    def __init__(self, settings: FleetSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self._books: dict[str, AskBook] = {}

    def book(self, place: str) -> AskBook:
        """The ask book of one place (a journal's SQLite file or a Redis), kept open."""
        book = self._books.get(place)
        if book is None:
            book = open_ask_book(place, key_prefix=self.settings.key_prefix)
            self._books[place] = book
        return book

    async def close(self) -> None:
        """Release every book's connection."""
        for book in self._books.values():
            await book.close()

    async def api_asks(self, request: Request) -> Response:
        """``GET /api/asks``: the open questions, oldest first."""
        items: list[dict[str, Any]] = []
        for source in self.catalog.sources:
            try:
                found = await open_asks(self.book(source.url))
            except FleetError:
                continue  # an unreachable place: /api/sources says so
            items.extend(record.public() for record in found)
        items.sort(key=lambda item: item["asked_at"] or 0.0)
        return JSONResponse({"items": items}, headers=_NO_STORE)

    async def api_answer(self, request: Request) -> Response:
        """``POST /api/workflows/{root_id}/asks/{name}``: answer with the JSON body."""
        root_id = str(request.path_params.get("root_id", ""))
        name = str(request.path_params.get("name", ""))
        if not _ROOT_ID.fullmatch(root_id):
            return _error(400, "malformed root id: 1 to 200 characters, no control characters")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # A cross-site form cannot send JSON without a preflight we never answer.
            return _error(415, "send the answer as JSON (Content-Type: application/json)")
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            return _error(413, f"the answer is larger than {_MAX_BODY} bytes")
        try:
            answer = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not JSON; send the answer itself, e.g. true")
        by = _user(request, self.settings.dashboard_user)
        try:
            book = await self._book_of(root_id, name)
            record = await give_answer(book, root_id, name, answer, by=by)
        except AnswerRefused as refusal:
            status = _STATUS.get(refusal.kind, 409)
            return _error(status, str(refusal), kind=refusal.kind, field=refusal.field)
        except AskError as error:
            return _error(400, str(error))
        except FleetError as error:
            return _error(503, f"the ask cannot be written: {error}")
        body = {
            "root_id": root_id,
            "name": name,
            "by": by,
            "state": record.state,
            "answered_at": record.answered_at,
            "model": record.model,
        }
        return JSONResponse(body, headers=_NO_STORE)

    async def _book_of(self, root_id: str, name: str) -> AskBook:
        """The book holding the ask, else that of the run's journal (an early answer).

        The journal is found as ``fleet answer`` finds it (:func:`fleet.runstatus.locate_run`):
        a Celery run with a SQLite journal logs to Redis but keeps its asks in the file.

        Raises:
            AnswerRefused: neither the ask nor a running workflow of ``root_id`` is known.
            ConfigError: the run's journal cannot be opened from here (its password is
                not known, or it is ``memory``).
        """
        for source in self.catalog.sources:
            try:
                if await read(self.book(source.url), root_id, name) is not None:
                    return self.book(source.url)
            except FleetError:
                continue
        view = await asyncio.to_thread(self.catalog.refresh, root_id)
        if view is None or self.catalog.source_of(root_id) is None:
            raise AnswerRefused(f"no workflow {root_id!r} is known here", kind="unknown")
        if view.ended_as == "finished":
            raise AnswerRefused(
                f"workflow {root_id!r} has finished; it waits for no answer", kind="unknown"
            )
        return self.book(await asyncio.to_thread(self._journal_of, root_id))

    def _journal_of(self, root_id: str) -> str:
        """The journal of ``root_id``'s newest run (blocking: run it in a thread).

        The run index masks passwords; a place it names that the dashboard's own settings
        hold is used with their password.
        """
        try:
            return locate_run(self.settings, root_id).places.store
        except ConfigError:
            entry = indexed(self.settings.run_index, root_id)
            for url in (self.settings.store, self.settings.redis_url):
                if entry is not None and entry.store == mask_url(url):
                    return url
            raise


def ask_routes(settings: FleetSettings, catalog: Catalog) -> tuple[list[Route], AskDesk]:
    """The routes of :class:`AskDesk` (close the desk when the app stops)."""
    desk = AskDesk(settings, catalog)
    routes = [
        Route("/api/asks", desk.api_asks),
        Route("/api/workflows/{root_id}/asks/{name}", desk.api_answer, methods=["POST"]),
    ]
    return routes, desk
