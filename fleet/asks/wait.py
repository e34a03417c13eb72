"""``Workflow.ask``: journal a question, wait for its answer, survive the wait.

The host journals the question (with its schema and absolute deadline) in the run's ask
book, publishes ``asked``, and polls the book every :data:`POLL_S` until an answer is
taken, the deadline passes, or the workflow is cancelled. It holds no step reservation
and no concurrency slot while it waits. A re-run of the program reaches the same ask and
finds the journaled answer (or the passed deadline) at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import BaseModel, ValidationError

from ..cancel.signal import Cancellation
from ..errors import AnswerRefused, AskError, AskTimeout, WorkflowCancelledError
from ..events import Answered, Asked, LogEvent
from ..spec import describe_validation_error
from .book import AskBook, update
from .record import AskRecord, asked, check_name, check_schema, refit, timed_out

__all__ = ["NO_DEFAULT", "POLL_S", "AskSchema", "wait_for_answer"]

POLL_S = 0.25
"""How often a waiting host reads its ask: an answer is seen well within a second."""


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()
"""``Workflow.ask(default=...)`` when none is given: a timeout raises ``AskTimeout``."""


class AskSchema:
    """What an answer must fit: a pydantic model class, a JSON Schema dict, or anything.

    Args:
        name: the ask's name (for error messages).
        schema: a pydantic model class (answers come back as instances), a JSON Schema
            dict, or ``None`` (any JSON value).

    Raises:
        AskError: ``schema`` is none of those, or not a valid JSON Schema.
    """

    def __init__(self, name: str, schema: Any) -> None:
        self.name = name
        self.model: type[BaseModel] | None = None
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            self.model = schema
            self.json_schema: dict[str, Any] | None = schema.model_json_schema()
        elif schema is None or isinstance(schema, dict):
            self.json_schema = check_schema(name, schema)
        else:
            raise AskError(
                f"ask {name!r}: schema must be a pydantic model class, a JSON Schema dict or "
                f"None, got {schema!r}",
                name=name,
            )

    def convert(self, answer: Any) -> Any:
        """The answer as the program gets it (a model instance when a model was given).

        Raises:
            AnswerRefused: the model refuses it (``kind="invalid"``).
        """
        if self.model is None:
            return answer
        try:
            return self.model.model_validate(answer)
        except ValidationError as error:
            problem = error.errors(include_url=False, include_input=False)[0]
            field = ".".join(str(part) for part in problem["loc"]) or "(root)"
            raise AnswerRefused(
                f"the answer to {self.name!r} does not fit {self.model.__name__}: "
                + describe_validation_error(error, "answer").removeprefix("invalid answer: "),
                kind="invalid",
                field=field,
            ) from None


async def wait_for_answer(
    book: AskBook,
    root_id: str,
    name: str,
    *,
    question: str,
    schema: Any = None,
    timeout_s: float | None = None,
    default: Any = NO_DEFAULT,
    publish: Callable[[Any], None],
    cancellation: Cancellation,
    poll_s: float = POLL_S,
) -> Any:
    """Journal the ask in ``book``, then wait for its answer (see :meth:`fleet.Workflow.ask`).

    Raises:
        AskError: a bad name, question, schema or timeout.
        AskTimeout: the deadline passed unanswered and no ``default`` was given.
        WorkflowCancelledError: the workflow was cancelled while waiting.
    """
    check_name(name)
    if not isinstance(question, str) or not question.strip():
        raise AskError(f"ask {name!r} needs a question (a non-empty string)", name=name)
    if timeout_s is not None and not (isinstance(timeout_s, int | float) and timeout_s >= 0):
        raise AskError(
            f"ask {name!r}: timeout_s must be seconds >= 0 or None, got {timeout_s!r}", name=name
        )
    form = AskSchema(name, schema)
    seconds = None if timeout_s is None else float(timeout_s)

    def ask_now(current: AskRecord | None) -> AskRecord:
        return asked(
            current,
            root_id=root_id,
            name=name,
            question=question,
            schema=form.json_schema,
            timeout_s=seconds,
            now=time.time(),
            model=None if form.model is None else form.model.__name__,
        )

    record = await update(book, root_id, name, ask_now)
    if record.is_open:
        publish(Asked(name=name, question=record.question or question))
    while True:
        if record.state == "answered":
            try:
                value = form.convert(record.answer)
            except AnswerRefused as refusal:
                note = f"the answer by {record.answered_by} was not taken: {refusal}"
                record = await update(book, root_id, name, partial(_refit, taken=record, note=note))
                continue
            publish(Answered(name=name, by=record.answered_by or "unknown"))
            return value
        if record.state == "timed_out":
            return _time_out(record, root_id, name, default, publish)
        now = time.time()
        if record.deadline is not None and now >= record.deadline:
            record = await update(book, root_id, name, partial(_expire, last=record))
            continue
        if cancellation.cancelled:
            raise WorkflowCancelledError(root_id, cancellation.reason or "cancelled")
        pause = poll_s if record.deadline is None else min(poll_s, record.deadline - now)
        await asyncio.sleep(max(pause, 0.0))
        record = await update(book, root_id, name, ask_now)  # a read, unless it was cleared


def _refit(current: AskRecord | None, taken: AskRecord, note: str) -> AskRecord:
    return taken if current is None else refit(current, taken, note)


def _expire(current: AskRecord | None, last: AskRecord) -> AskRecord:
    return timed_out(last if current is None else current)


def _time_out(
    record: AskRecord, root_id: str, name: str, default: Any, publish: Callable[[Any], None]
) -> Any:
    deadline = record.deadline or time.time()
    if default is NO_DEFAULT:
        raise AskTimeout(root_id, name, deadline)
    publish(
        LogEvent(
            level="warning",
            message=f"nobody answered {name!r} before its deadline; using its default",
            fields={"ask": name},
        )
    )
    return default
