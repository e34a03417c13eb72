"""``fleet answer`` and ``fleet asks``: answer a workflow's question, list open ones.

A run's asks live in its journal (:mod:`fleet.asks`): the journal's SQLite file on the
embedded default, the fleet's Redis with a Redis journal. ``fleet answer`` finds the run
the way ``fleet status`` does (:func:`fleet.runstatus.locate_run`).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..asks import AskBook, AskRecord, give_answer, open_ask_book, open_asks, records
from ..config import FleetSettings, mask_url
from ..errors import AnswerRefused, BrokerError, FleetError
from ..redis.sentinel import check_redis
from ..runner import RunPlaces
from ..runs.index import indexed_stores
from ..runstatus import Located, locate_run
from ..urls import REDIS_SCHEMES
from .app import app, settings
from .cancel import ExecutorOption, RedisUrlOption, board_at
from .progress import say

__all__ = ["answer", "ask_lines", "asks", "read_asks"]

_STORE_HELP = "The run's journal, as given to `fleet run` (default FLEET_STORE)."


def _check_store(store: str) -> None:
    """Fail in one line when the journal cannot be there: a Redis that does not answer.

    Raises:
        BrokerError: the journal's Redis does not answer (``fleet`` exits 2 with the
            line, like ``fleet run``).
    """
    if store.strip().startswith(REDIS_SCHEMES):
        check_redis(store.strip(), setting="--store (FLEET_STORE)")


def _missing_journal(store: str) -> Path | None:
    """The journal file of a ``sqlite:PATH`` store when it does not exist."""
    text = store.strip()
    if not text.startswith("sqlite:"):
        return None
    path = Path(text.removeprefix("sqlite:"))
    return None if path.exists() else path


def _clock(at: float | None) -> str:
    return "none" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _parse(text: str | None, file: Path | None) -> Any:
    """The answer from ``--json`` or ``--file``; exit 1 with one line when it is not JSON."""
    if (text is None) == (file is None):
        say("give the answer with exactly one of --json TEXT or --file PATH")
        raise typer.Exit(1)
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            say(f"cannot read the answer from {str(file)!r}: {error}")
            raise typer.Exit(1) from None
    try:
        return json.loads(text or "")
    except ValueError as error:
        say(f"the answer is not JSON ({error}); e.g. --json 'true' or --json '{{\"ok\": true}}'")
        raise typer.Exit(1) from None


async def _workflow_exists(config: FleetSettings, located: Located, root_id: str) -> bool:
    """Whether ``root_id`` has run (a log or a run record); a finished run refuses answers."""
    board = board_at(config, located.places)
    try:
        record = await board.latest(root_id)
    except FleetError:
        record = None
    finally:
        await board.close()
    if record is not None and record.status == "finished":
        raise AnswerRefused(
            f"workflow {root_id!r} has finished; nothing waits for an answer", kind="unknown"
        )
    return record is not None or located.found


@app.command()
def answer(
    root_id: Annotated[str, typer.Argument(help="The workflow's root id.")],
    name: Annotated[str, typer.Argument(help="The ask's name (as the program gave it).")],
    json_text: Annotated[
        str | None, typer.Option("--json", help="The answer as JSON, e.g. 'true'.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A file holding the answer as JSON.")
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="Who answers (default: your user name).")
    ] = None,
    store: Annotated[str | None, typer.Option("--store", help=_STORE_HELP)] = None,
    redis_url: RedisUrlOption = None,
    executor: ExecutorOption = "local",
) -> None:
    """Answer a workflow's question (`Workflow.ask`); the first valid answer wins.

    Exits 0 when the answer is taken (or kept until the program asks), 1 with one line
    when the workflow is unknown, the ask is already answered or past its deadline, or
    the answer does not fit the ask's JSON Schema; 2 when the journal's Redis does not
    answer. A pydantic model's own validators run when the program reads the answer: one
    that refuses it reopens the ask, and `fleet status` / `fleet asks` show why.
    """
    value = _parse(json_text, file)
    who = by or _user()
    config = settings(store=store, redis_url=redis_url)
    explicit = store is not None or redis_url is not None
    try:
        located = locate_run(config, root_id, executor=executor, explicit=explicit)
        _check_store(located.places.store)
        book = open_ask_book(located.places.store, key_prefix=config.key_prefix)

        async def give() -> tuple[AskRecord, list[str]]:
            try:
                given = await give_answer(
                    book,
                    root_id,
                    name,
                    value,
                    by=who,
                    exists=lambda: _workflow_exists(config, located, root_id),
                )
                if given.state != "early":
                    return given, []
                found = await records(book, root_id)  # a mistyped name is kept as early
                return given, [r.name for r in found if r.state == "open" and r.is_open]
            finally:
                await book.close()

        record, waiting = asyncio.run(give())
    except AnswerRefused as refusal:
        text = str(refusal)
        if refusal.kind == "unknown" and "finished" not in text:
            text += f" (looked in: {'; '.join(located.looked)})"
        say(f"answer not taken: {text}")
        raise typer.Exit(1) from None
    except BrokerError:
        raise  # one line and exit 2, as for every command whose Redis does not answer
    except FleetError as error:
        say(f"cannot answer {name!r} of workflow {root_id!r}: {error}")
        raise typer.Exit(1) from None
    if record.state == "early":
        say(
            f"kept the answer to {name!r} of workflow {root_id!r} (by {who}): the workflow "
            "has not asked it yet; it is checked and taken when it does"
            + (f" (it is waiting on: {', '.join(map(repr, waiting))})" if waiting else "")
        )
    else:
        say(f"answered {name!r} of workflow {root_id!r} (by {who})" + _checked_later(record))


def _checked_later(record: AskRecord) -> str:
    """What an answer taken here still has to pass: the program's own model, if any."""
    if record.model is None:
        return ""
    return (
        f"; it fits the ask's JSON Schema, and the program checks it with its model "
        f"{record.model} when it reads it: if the model refuses it, the ask reopens and "
        f"`fleet status {record.root_id}` says why"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "cli"


def ask_lines(record: AskRecord, *, host: bool = True) -> list[str]:
    """How ``fleet status`` shows one ask.

    Args:
        record: the ask.
        host: whether a host is running the workflow (so an open ask is being waited on);
            after a cancel or a host's death the ask stays open for the next run.
    """
    head = f"  ask {record.name}: "
    if record.state == "early":
        lines = [head + f"an answer by {record.answered_by} is kept until the program asks"]
    elif record.state == "answered":
        lines = [head + f"answered by {record.answered_by} at {_clock(record.answered_at)}"]
    elif record.state == "timed_out" or not record.is_open:
        lines = [head + f"timed out at {_clock(record.deadline)}, unanswered"]
    else:
        state = "WAITING" if host else "OPEN (no host waits on it now)"
        lines = [
            head + f"{state} since {_clock(record.asked_at)} (deadline "
            f"{_clock(record.deadline)}): {record.question}",
            f"    answer it with: fleet answer {record.root_id} {record.name} --json ..."
            + ("" if host else f"; the next run with --root-id {record.root_id} takes it"),
        ]
    if record.note and record.state in ("open", "timed_out"):
        lines.append(f"    note: {record.note}")
    return lines


async def read_asks(
    config: FleetSettings, places: RunPlaces, root_id: str, *, host: bool = True
) -> list[str]:
    """The ``fleet status`` lines of ``root_id``'s asks (empty when it asked nothing).

    ``host`` says whether a host is running the workflow (see :func:`ask_lines`).
    """
    if places.store.strip() == "memory":
        return []
    try:
        book = open_ask_book(places.store, key_prefix=config.key_prefix)
        try:
            found = await records(book, root_id)
        finally:
            await book.close()
    except FleetError as error:
        return [f"  asks: unreadable ({error})"]
    return [line for record in found for line in ask_lines(record, host=host)]


def _other_journals(config: FleetSettings) -> list[str]:
    """Journals other runs used (from the run index), for a listing that found nothing."""
    here = mask_url(config.store).strip()
    return [place for place in indexed_stores(config.run_index) if place.strip() != here]


@app.command()
def asks(
    store: Annotated[
        str | None, typer.Option("--store", help="The journal to look in (default FLEET_STORE).")
    ] = None,
) -> None:
    """List the questions workflows are waiting on (root, name, question, asked, deadline)."""
    config = settings(store=store)
    where = mask_url(config.store)
    _check_store(config.store)
    missing = _missing_journal(config.store)
    if missing is not None:
        say(
            f"no journal at {str(missing)!r}: no run has used --store {config.store} here; "
            "give `fleet asks` the --store the run used"
        )
        raise typer.Exit(1)
    try:
        book: AskBook = open_ask_book(config.store, key_prefix=config.key_prefix)

        async def listing() -> list[AskRecord]:
            try:
                return await open_asks(book)
            finally:
                await book.close()

        found = asyncio.run(listing())
    except FleetError as error:
        say(f"cannot list asks in {where}: {error}")
        raise typer.Exit(1) from None
    if not found:
        others = [] if store is not None else _other_journals(config)
        say(
            f"no open questions in {where}"
            + (f"; runs also used {', '.join(others)} (fleet asks --store ...)" if others else "")
        )
        return
    say(f"{len(found)} open question{'s' if len(found) > 1 else ''} in {where}:")
    for record in found:
        say(
            f"{record.root_id}  {record.name}  asked {_clock(record.asked_at)}  "
            f"deadline {_clock(record.deadline)}  {record.question}"
        )
        if record.note:
            say(f"    note: {record.note}")
