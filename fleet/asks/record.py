"""What an ask journals, and the pure rules that move it from asked to answered.

One :class:`AskRecord` per ``(root_id, name)``, stored as JSON text. It is written by two
sides that never share a process: the host that asks (:func:`asked`, :func:`timed_out`,
:func:`refit`) and whoever answers (:func:`answered`). Each rule takes the record as it is
now and returns the record it should become, or raises :class:`~fleet.errors.AnswerRefused`;
a book applies it with a compare-and-swap, so the first answer wins however many race.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as SchemaViolation

from ..errors import AnswerRefused, AskError
from ..spec import FleetModel

__all__ = [
    "AskRecord",
    "AskState",
    "answered",
    "asked",
    "check_answer",
    "check_name",
    "check_schema",
    "refit",
    "timed_out",
]

AskState = Literal["open", "answered", "timed_out", "early"]
"""``open``: asked, waiting; ``answered``: the answer is taken (final); ``timed_out``: the
deadline passed first (final); ``early``: an answer came before the program asked."""

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


class AskRecord(FleetModel):
    """One question of one workflow and, once given, its answer."""

    root_id: str
    """The workflow's root id."""
    name: str
    """The ask's name, unique within the workflow."""
    state: AskState
    """Where the ask stands (see :data:`AskState`)."""
    question: str | None = None
    """The question text (``None`` while only an early answer is known)."""
    json_schema: dict[str, Any] | None = None
    """The JSON Schema an answer must fit; ``None``: any JSON value."""
    model: str | None = None
    """The pydantic model the program reads the answer with (``None``: none). Whoever
    answers checks the JSON Schema only; the model's own validators run when the program
    reads the answer, and a refusal reopens the ask with a :attr:`note`."""
    asked_at: float | None = None
    """When the program first asked, in seconds since the epoch."""
    deadline: float | None = None
    """The absolute deadline (epoch seconds); ``None``: no deadline."""
    answer: Any = None
    """The answer (any JSON value), in states ``answered`` and ``early``."""
    answered_by: str | None = None
    """Who gave the answer."""
    answered_at: float | None = None
    """When it was given (epoch seconds)."""
    note: str | None = None
    """Why an answer given earlier was not taken (``fleet status`` shows it)."""

    def to_json(self) -> str:
        """The stored form (compact JSON, keys in a stable order)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> AskRecord:
        """Load a stored record."""
        return cls.model_validate_json(raw)

    @property
    def is_open(self) -> bool:
        """Asked, not answered, and its deadline (if any) not yet passed."""
        return self.state == "open" and (self.deadline is None or time.time() < self.deadline)

    def public(self) -> dict[str, Any]:
        """The fields a listing shows (``fleet asks``, ``GET /api/asks``)."""
        return {
            "root_id": self.root_id,
            "name": self.name,
            "question": self.question,
            "schema": self.json_schema,
            "asked_at": self.asked_at,
            "deadline": self.deadline,
            "note": self.note,
            "model": self.model,
        }


def check_name(name: object) -> str:
    """``name`` if it can name an ask (it travels in URLs and command lines).

    Raises:
        AskError: it is not 1 to 100 letters, digits or ``_ . : -``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AskError(
            f"an ask name must be 1 to 100 letters, digits or '_.:-', got {name!r}",
            name=name if isinstance(name, str) else None,
        )
    return name


def check_schema(name: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """``schema`` if it is a usable JSON Schema (or ``None``).

    Raises:
        AskError: it is not valid JSON Schema, or not JSON.
    """
    if schema is None:
        return None
    try:
        json.dumps(schema)
        Draft202012Validator.check_schema(schema)
    except (TypeError, ValueError) as error:
        raise AskError(f"ask {name!r}: its schema is not JSON ({error})", name=name) from None
    except SchemaError as error:
        raise AskError(
            f"ask {name!r}: its schema is not a valid JSON Schema ({error.message})", name=name
        ) from None
    return schema


def _where(error: SchemaViolation) -> str:
    """The field a schema violation is about (a missing property names that property)."""
    path = [str(part) for part in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        required: Any = error.validator_value
        missing = [p for p in required if p not in error.instance]
        if missing:
            path.append(str(missing[0]))
    return ".".join(path) or "(root)"


def check_answer(name: str, schema: dict[str, Any] | None, answer: Any) -> None:
    """Check that ``answer`` is JSON and fits ``schema``.

    Raises:
        AnswerRefused: ``kind="invalid"``, with the field that is wrong.
    """
    try:
        json.dumps(answer, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AnswerRefused(
            f"the answer to {name!r} is not JSON ({error})", kind="invalid", field="(root)"
        ) from None
    if schema is None:
        return
    problems = sorted(
        Draft202012Validator(schema).iter_errors(answer), key=lambda e: list(e.absolute_path)
    )
    if problems:
        field = _where(problems[0])
        raise AnswerRefused(
            f"the answer to {name!r} does not fit its schema: field {field}: {problems[0].message}",
            kind="invalid",
            field=field,
        )


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def asked(
    current: AskRecord | None,
    *,
    root_id: str,
    name: str,
    question: str,
    schema: dict[str, Any] | None,
    timeout_s: float | None,
    now: float,
    model: str | None = None,
) -> AskRecord:
    """The record once the program reaches the ask.

    A record already asked is kept as it is (its deadline is absolute). An early answer
    is taken if it fits the schema, else dropped with a note saying why. ``model`` names
    the pydantic model the program reads the answer with, if any.
    """
    if current is not None and current.state != "early":
        return current
    record = AskRecord(
        root_id=root_id,
        name=name,
        state="open",
        question=question,
        json_schema=schema,
        model=model,
        asked_at=now,
        deadline=None if timeout_s is None else now + timeout_s,
    )
    if current is None:
        return record
    try:
        check_answer(name, schema, current.answer)
    except AnswerRefused as refusal:
        note = (
            f"an answer given early by {current.answered_by} at "
            f"{_clock(current.answered_at or now)} was not taken: {refusal}"
        )
        return record.model_copy(update={"note": note})
    return record.model_copy(
        update={
            "state": "answered",
            "answer": current.answer,
            "answered_by": current.answered_by,
            "answered_at": current.answered_at,
        }
    )


def answered(
    current: AskRecord | None,
    *,
    root_id: str,
    name: str,
    answer: Any,
    by: str,
    now: float,
) -> AskRecord:
    """The record once ``answer`` is given; the first answer wins.

    With no record yet the answer is kept as an *early* answer, checked when the
    program asks (the caller makes sure the workflow exists).

    Raises:
        AnswerRefused: already answered, past the deadline, or not fitting the schema.
    """
    if current is None or current.state == "early":
        if current is not None:
            raise AnswerRefused(
                f"workflow {root_id!r} has not asked {name!r} yet, and already holds an "
                f"answer given early by {current.answered_by}; the first answer wins",
                kind="answered",
            )
        check_answer(name, None, answer)
        return AskRecord(
            root_id=root_id,
            name=name,
            state="early",
            answer=answer,
            answered_by=by,
            answered_at=now,
        )
    if current.state == "answered":
        raise AnswerRefused(
            f"{name!r} of workflow {root_id!r} is already answered (by {current.answered_by} "
            f"at {_clock(current.answered_at or now)}); the first answer wins",
            kind="answered",
        )
    if current.state == "timed_out" or (current.deadline is not None and now >= current.deadline):
        raise AnswerRefused(
            f"{name!r} of workflow {root_id!r} is past its deadline "
            f"({_clock(current.deadline or now)}); the workflow no longer takes an answer",
            kind="expired",
        )
    check_answer(name, current.json_schema, answer)
    return current.model_copy(
        update={
            "state": "answered",
            "answer": answer,
            "answered_by": by,
            "answered_at": now,
            "note": None,
        }
    )


def timed_out(current: AskRecord) -> AskRecord:
    """The record once its deadline passed: an open ask times out, an answer stays."""
    if current.state != "open":
        return current
    return current.model_copy(update={"state": "timed_out"})


def refit(current: AskRecord, expected: AskRecord, note: str) -> AskRecord:
    """Reopen ``expected`` (an answer the program's own model refused), with ``note``."""
    if current != expected:
        return current
    return current.model_copy(
        update={
            "state": "open",
            "answer": None,
            "answered_by": None,
            "answered_at": None,
            "note": note,
        }
    )
