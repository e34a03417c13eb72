"""The wire protocol between the Celery host and its workers, in one place.

Both sides import this module and nothing private of each other. A step travels as
follows (the key names are :class:`fleet.redis.keys.Keys`'s, the rest is defined here)::

    host                                   Redis                         worker
    StepMessage ──── fleet.run_step ─────▶ queue ──────────────────────▶ decode()
                                           lease(tid)    ◀── claim_step.lua (Started)
    collector ◀── BLPOP ── reply(name) ◀── result(tid, nonce) ◀── finish.lua (Finished)
                                           steps(owner)  done:{tid} (journaled rounds)
    read it: result expires ─────────────▶ steps(owner)  ran:{tid}, then over:{nonce}

A pipeline chain link (``fleet.run_stage``) carries a :class:`StageMessage` pointer; the
item and the pipeline's :class:`PipelineContext` live in the ``pipe(pipe)`` hash, and
each link's record is keyed by :func:`stage_link_id`. The host hears about every step
through :data:`Notice` values pushed on its reply list. The Lua scripts are
``fleet/redis/lua/{claim_step,finish,begin_link,renew_lease}.lua``; each opens with the
keys and arguments it takes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from ..checkpoint import step_identity
from ..errors import PoisonMessageError, SpecError
from ..events import RateLimited
from ..redis.keys import REPLY_TTL_S
from ..spec import AgentStepSpec, FleetModel, StepOutcome

__all__ = [
    "PROTOCOL_VERSION",
    "REPLY_TTL_S",
    "RESULT_GRACE_S",
    "STAGE_TASK",
    "STEP_TASK",
    "BudgetHold",
    "Finished",
    "Limited",
    "Notice",
    "PipelineContext",
    "StageMessage",
    "Started",
    "StepMessage",
    "Stopped",
    "decode",
    "read_notice",
    "recorded",
    "stage_link_id",
    "step_summary",
    "step_task_id",
]

PROTOCOL_VERSION = 1
"""Version of the JSON messages host and workers exchange; a worker rejects any other."""
STEP_TASK = "fleet.run_step"
"""The generic step task."""
STAGE_TASK = "fleet.run_stage"
"""The pipeline-stage task (one link of a chain)."""
RESULT_GRACE_S = 10
"""A step's result lives this long after its host has read it: nothing needs it then (a
duplicate of the dispatch is refused by the step record,
:meth:`~fleet.redis.keys.Keys.steps`, and a resumed
host reads the done-markers there), so the grace only covers stragglers, short so that
results do not pile up at a high step rate."""


# --------------------------------------------------------------------------- messages


class BudgetHold(FleetModel):
    """What a worker needs to settle the reservation the host made for a step."""

    workflow_id: str
    """The budget's workflow id (its ledger key)."""
    reservation_id: str
    """The reservation to re-attach (the step's task id)."""
    tokens: int = Field(ge=0)
    """Tokens the host reserved: the step's token hold."""
    limit_tokens: int | None = None
    """The budget's limit when the step was sent."""
    lease_s: float = 30.0
    """The reservation's lease."""
    ancestors: list[str] | None = None
    """The accounts above the workflow the host reserved in, nearest first (``None``: the
    worker reads them from the ledger): the worker settles in the same chain."""


class StepMessage(FleetModel):
    """The one argument of ``fleet.run_step`` (sent as JSON text)."""

    v: int
    """Protocol version; must be :data:`PROTOCOL_VERSION`."""
    spec: AgentStepSpec
    """The step to run."""
    reply: str
    """Redis list the worker pushes start/finish notices to."""
    nonce: str
    """Names this dispatch: a failed outcome is reused only by duplicates of it."""
    workflow_id: str | None = None
    """The journal the step belongs to, when its round is journaled."""
    record: str | None = None
    """Whose step record (:meth:`~fleet.redis.keys.Keys.steps`) answers for the step: the
    workflow's root id,
    or the round's nonce outside a workflow (``None``: the nonce)."""
    budget: BudgetHold | None = None
    """The step's token hold, when a Redis budget ledger guards the workflow."""
    journal: bool = False
    """Write the step's journal record into the fleet's Redis journal when it succeeds."""
    traceparent: str | None = Field(default=None, max_length=256)
    """The W3C trace context of the step's round, when the host traces (fleet[otel]).

    Optional and ignorable, so no version bump: a worker without tracing (or an older
    one: unknown keys are ignored) runs the step the same; a malformed value only starts
    a new trace on the worker.
    """
    announce: bool = True
    """Push a :class:`Started` notice when the step is claimed (someone listens for events)."""
    cancel: list[str] = Field(default_factory=list)
    """Cancel markers (the workflow run's id, the round's id): a worker that finds any of
    them in Redis (:meth:`~fleet.redis.keys.Keys.cancel`) drops the message, or interrupts
    the running step."""
    deltas: str | None = Field(default=None, max_length=1024)
    """The stream the step's output deltas go to (:meth:`~fleet.redis.keys.Keys.deltas` of
    its workflow), when it runs under a workflow. Optional and ignorable, like
    ``traceparent``: an older worker runs the step the same, without live text."""


class StageMessage(FleetModel):
    """The argument of one ``fleet.run_stage`` link: a pointer, never the item itself."""

    v: int
    """Protocol version; must be :data:`PROTOCOL_VERSION`."""
    pipe: str
    """The pipeline run (its context lives at ``{prefix}:pipe:{pipe}``)."""
    item: int = Field(ge=0)
    """The item's index."""
    stage: int = Field(ge=0)
    """The stage this link runs."""

    def next(self) -> StageMessage:
        """The pointer the following link of the same chain receives."""
        return self.model_copy(update={"stage": self.stage + 1})


class PipelineContext(FleetModel):
    """What every link of one pipeline run shares (the ``ctx`` field of its hash)."""

    stages: list[str]
    """The registered stage names, in order."""
    reply: str
    """The host's reply list."""
    nonce: str
    """Names the run: each link's record is ``result(link, nonce)``."""
    announce: bool = True
    """Push a :class:`Started` notice when a link starts (someone listens for events)."""
    cancel: list[str] = Field(default_factory=list)
    """Cancel markers of every link (the workflow run's id, the pipeline's id)."""
    deltas: str | None = Field(default=None, max_length=1024)
    """The stream every link's output deltas go to (as :attr:`StepMessage.deltas`)."""


_Model = TypeVar("_Model", bound=FleetModel)


def decode(model: type[_Model], payload: object) -> _Model:
    """Decode a task's JSON argument into ``model``, checking the protocol version.

    Raises:
        PoisonMessageError: the payload is not JSON text, speaks another protocol
            version, or does not validate; such a message must never run.
    """
    if not isinstance(payload, str):
        raise PoisonMessageError(f"expected JSON text, got {type(payload).__name__}")
    try:
        head = json.loads(payload)
    except ValueError as error:
        raise PoisonMessageError(f"not valid JSON ({error})") from None
    except RecursionError:
        raise PoisonMessageError("JSON nested too deeply to decode") from None
    version = head.get("v") if isinstance(head, dict) else None
    # type() rather than ==: JSON `true` must not pass for version 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise PoisonMessageError(
            f"unknown message schema version {version!r} (this worker speaks "
            f"{PROTOCOL_VERSION}); upgrade the worker or the host so they match"
        )
    try:
        return model.from_dict(head)
    except SpecError as error:
        raise PoisonMessageError(str(error)) from None


# --------------------------------------------------------------------------- notices


class Started(FleetModel):
    """A worker claimed a step (or a chain link's step) and is about to run it."""

    kind: Literal["started"] = "started"
    id: str
    """The task id (a step's, or a chain link's :func:`stage_link_id`)."""
    task_id: str
    """The step's ``spec.task_id``."""
    agent: str
    """The step's agent."""
    worker: str | None = None
    """The Celery node that claimed it (``worker1@host``), for humans."""


class Finished(FleetModel):
    """A step (or chain link) ran; here is its outcome."""

    kind: Literal["finished"] = "finished"
    id: str
    """The task id (a step's, or a chain link's :func:`stage_link_id`)."""
    outcome: StepOutcome
    """What came of it."""
    settled: bool = False
    """The worker settled the step's token hold before telling the host (so the host does
    not settle it again); ``False`` when it did not (no hold, a failed settle, a duplicate
    delivery answered from the record)."""
    journaled: bool = False
    """The worker wrote the step's journal record with its outcome, in the same script
    (``worker_journal``), so the host does not journal it again."""


class Stopped(FleetModel):
    """A chain link's stage declined (returned ``None``) or crashed: the chain ends here."""

    kind: Literal["stopped"] = "stopped"
    id: str
    """The chain link's :func:`stage_link_id`."""
    outcome: StepOutcome | None = None
    """The item's final outcome (the previous link's), or ``None`` (first stage, or a crash)."""


class Limited(FleetModel):
    """A step's model call waited noticeably for its provider limit (the host emits the event)."""

    kind: Literal["rate_limited"] = "rate_limited"
    id: str
    """The step's task id."""
    event: RateLimited
    """The ``rate_limited`` workflow event to emit."""


Notice = Annotated[Started | Finished | Stopped | Limited, Field(discriminator="kind")]
"""Everything a worker pushes on a host's reply list."""

_NOTICES: TypeAdapter[Started | Finished | Stopped | Limited] = TypeAdapter(Notice)


def read_notice(raw: str | bytes) -> Started | Finished | Stopped | Limited | None:
    """Parse one reply-list entry; ``None`` for one this host cannot read (it is skipped)."""
    try:
        return _NOTICES.validate_json(raw)
    except ValidationError:
        return None


def recorded(tid: str, raw: str | bytes) -> Finished | Stopped:
    """What a step or chain link recorded (``result``/``done`` keys), as the notice it sent.

    A record is the outcome's JSON, or a chain link's :class:`Stopped` notice.
    """
    head = json.loads(raw)
    if isinstance(head, dict) and head.get("kind") == "stopped":
        return Stopped.model_validate(head)
    return Finished(id=tid, outcome=StepOutcome.from_dict(head))


# --------------------------------------------------------------------------- ids


def step_task_id(workflow_id: str, spec: AgentStepSpec) -> str:
    """The task id of a journaled step: the same workflow, step and identity give the same id.

    Derived from :func:`fleet.checkpoint.step_identity` (which covers the workflow id,
    the task id and every identity field), so a resumed host finds the step's lease or
    done-marker instead of sending it again.
    """
    identity = step_identity(workflow_id, spec)
    return "fs-" + hashlib.sha256(identity.encode()).hexdigest()[:40]


def stage_link_id(pipe: str, item: int, stage: int) -> str:
    """The task id of one link of a pipeline chain."""
    return f"fp-{pipe}-{item}-{stage}"


def step_summary(workflow_id: str | None, spec: AgentStepSpec) -> str:
    """The argument summary monitoring shows for a step (never the prompt)."""
    return f"{workflow_id or '-'} {spec.task_id} {spec.agent}"
