"""Every exception fleet raises.

Inside a workflow, failures are values (``StepOutcome(success=False)``); these
exceptions are for misuse and for the edges (configuration, input, services)::

    FleetError
    ├── ConfigError(FleetError, ValueError)        bad setting or agents file
    ├── SpecError(FleetError, ValueError)          invalid AgentStepSpec / StepOutcome input
    │   └── BudgetError                             invalid budget input (limit, account, cycle)
    ├── UnknownAgentError(FleetError, LookupError)  no agent registered under that name
    ├── AgentError(FleetError)                      an agent failed in a way it can name (``kind``)
    │   └── BudgetExhaustedError                    the budget refused a reservation or call
    ├── CheckpointError(FleetError)                 a journal cannot be read or trusted
    ├── WorkflowCancelledError(FleetError)          a verb was called on a cancelled workflow
    ├── WorkflowClosedError(FleetError, RuntimeError) a verb called after ``finish()``
    ├── AskError(FleetError, ValueError)          misuse of ``Workflow.ask`` (name, schema, store)
    ├── AskTimeout(FleetError, TimeoutError)      an ask's deadline passed unanswered, no default
    ├── AnswerRefused(FleetError)                 an answer was not taken (``kind`` says why)
    ├── PoisonMessageError(FleetError, ValueError)  a worker refuses a task message
    └── BrokerError(FleetError, ConnectionError)    Redis / the broker is unreachable
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AnswerRefused",
    "AskError",
    "AskTimeout",
    "BrokerError",
    "BudgetError",
    "BudgetExhaustedError",
    "CheckpointError",
    "ConfigError",
    "FleetError",
    "PoisonMessageError",
    "SpecError",
    "UnknownAgentError",
    "WorkflowCancelledError",
    "WorkflowClosedError",
]


class FleetError(Exception):
    """Root of every exception fleet raises."""


class ConfigError(FleetError, ValueError):
    """A setting, configuration file or agents file is invalid or missing.

    Attributes:
        key: the setting or file that is wrong, when known.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class SpecError(FleetError, ValueError):
    """Input for a spec, outcome or other fleet value does not validate."""


class BudgetError(SpecError):
    """A budget was given invalid input.

    A negative or non-finite limit, an account name with forbidden characters, an
    unknown parent account, or a parent cycle.

    Attributes:
        account: the workflow or account concerned, when known.
    """

    def __init__(self, message: str, *, account: str | None = None) -> None:
        super().__init__(message)
        self.account = account


class UnknownAgentError(FleetError, LookupError):
    """No agent is registered under the requested name.

    Attributes:
        agent: the name that was asked for.
        known: the names that are registered.
    """

    def __init__(self, agent: str, known: list[str]) -> None:
        listing = ", ".join(repr(name) for name in sorted(known)) or "none"
        super().__init__(
            f"unknown agent {agent!r}; registered agents: {listing}. "
            "Register it in the agents file or pass it in LocalExecutor(agents=...)."
        )
        self.agent = agent
        self.known = sorted(known)


class AgentError(FleetError):
    """An agent failed for a reason it can name.

    Raise it from an agent to fail the step with ``error=kind`` and this message
    as the outcome's output (any other exception fails the step as ``crashed``).

    Attributes:
        kind: the machine-readable error kind copied into ``StepOutcome.error``.
    """

    def __init__(self, message: str, *, kind: str = "agent") -> None:
        super().__init__(message)
        self.kind = kind


class BudgetExhaustedError(AgentError):
    """The budget (tokens or dollars, the workflow's or an ancestor's) refused a step or call.

    Attributes:
        consumed: tokens (or micro-dollars, when ``unit`` is ``"usd"``) already charged.
        limit: the limit in the same unit.
        requested: the amount that was asked for.
        unit: ``"tokens"`` or ``"usd"`` (micro-dollars).
        account: the account that refused (the workflow or an ancestor), when known.
    """

    def __init__(
        self,
        message: str,
        *,
        consumed: int = 0,
        limit: int | None = None,
        requested: int = 0,
        unit: str = "tokens",
        account: str | None = None,
    ) -> None:
        super().__init__(message, kind="budget_exhausted")
        self.consumed = consumed
        self.limit = limit
        self.requested = requested
        self.unit = unit
        self.account = account


class CheckpointError(FleetError):
    """A workflow journal cannot be read, or cannot be trusted for these steps.

    Attributes:
        workflow_id: the journal's key.
    """

    def __init__(self, message: str, *, workflow_id: str | None = None) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id


class BrokerError(FleetError, ConnectionError):
    """Redis or the Celery broker cannot be reached or answered with an error.

    Attributes:
        url: the broker URL with any password masked.
        detail: more than the one-line message (e.g. the end of a child process's log),
            shown by ``fleet --debug``.
    """

    def __init__(self, message: str, *, url: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.detail = detail


class WorkflowCancelledError(FleetError):
    """A verb was called on a workflow after it was cancelled.

    The steps that were running when the cancel came are returned as outcomes with
    ``error="cancelled"``; nothing new is dispatched after it.

    Attributes:
        root_id: the workflow's root id.
        reason: why it was cancelled.
    """

    def __init__(self, root_id: str, reason: str) -> None:
        super().__init__(
            f"workflow {root_id!r} was cancelled ({reason}); nothing more runs in this run. "
            "Run the same root id again to resume: completed steps are served from the journal"
        )
        self.root_id = root_id
        self.reason = reason


class WorkflowClosedError(FleetError, RuntimeError):
    """A verb was called on a workflow after ``finish()`` / ``close()``.

    Attributes:
        root_id: the workflow's root id.
    """

    def __init__(self, root_id: str) -> None:
        super().__init__(
            f"workflow {root_id!r} is finished; build a new Workflow to run more steps "
            "(reuse the root id to resume from its journal)"
        )
        self.root_id = root_id


class PoisonMessageError(FleetError, ValueError):
    """A worker received a task message it cannot trust; it is rejected, never executed.

    The message says why (not JSON, another protocol version, an invalid field).
    """


class AskError(FleetError, ValueError):
    """``Workflow.ask`` was misused: a repeated or malformed name, a bad schema, no store.

    Attributes:
        name: the ask's name.
    """

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class AskTimeout(FleetError, TimeoutError):
    """An ask's deadline passed without an answer, and the ask had no ``default``.

    Attributes:
        root_id: the workflow's root id.
        name: the ask's name.
        deadline: when it timed out, in seconds since the epoch.
    """

    def __init__(self, root_id: str, name: str, deadline: float) -> None:
        super().__init__(
            f"workflow {root_id!r}: nobody answered {name!r} before its deadline; give the ask "
            "a default=, a longer timeout_s, or run the workflow under another root id"
        )
        self.root_id = root_id
        self.name = name
        self.deadline = deadline


class AnswerRefused(FleetError):
    """An answer to an ask was not taken; nothing was changed.

    Attributes:
        kind: ``"unknown"`` (no such workflow), ``"answered"`` (the first answer won),
            ``"expired"`` (the deadline passed) or ``"invalid"`` (it does not fit the schema).
        field: for ``"invalid"``, where in the answer the problem is (``"(root)"`` for
            the answer itself).
    """

    def __init__(self, message: str, *, kind: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field
