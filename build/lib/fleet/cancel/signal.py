"""The in-process side of a cancel: a one-shot signal that stops dispatch and interrupts steps.

A :class:`Cancellation` belongs to one cancellable unit: a workflow run on the host, or one
running step on a worker. Once :meth:`Cancellation.cancel` is called it stays cancelled:

* combinators and executors look at :func:`current_cancellation` (a context variable the
  :class:`~fleet.Workflow` verbs set) and dispatch nothing new;
* every task inside :meth:`Cancellation.interrupts` is cancelled at its current ``await``
  and leaves the block with :class:`StepInterrupted` instead of ``CancelledError``, so a
  step turns into an outcome with ``error="cancelled"`` while a cancel of its *caller*
  still propagates as ``CancelledError`` (the same bookkeeping ``asyncio.timeout`` does).

Code that blocks its thread (a ``time.sleep`` or a blocking client inside an agent)
cannot be interrupted: the step ends when that code returns, and its result is then
discarded (see :func:`cancelled_outcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from ..spec import NO_USAGE, AgentStepSpec, StepOutcome, TokenUsage

__all__ = [
    "CANCELLED",
    "Cancellation",
    "StepInterrupted",
    "cancelled_outcome",
    "current_cancellation",
    "use_cancellation",
]

CANCELLED = "cancelled"
"""The ``StepOutcome.error`` of a step that a cancel stopped (or never started)."""

_CURRENT: contextvars.ContextVar[Cancellation | None] = contextvars.ContextVar(
    "fleet_cancellation", default=None
)


def current_cancellation() -> Cancellation | None:
    """The cancellation of the workflow (or step) this code runs for, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_cancellation(cancellation: Cancellation | None) -> Iterator[None]:
    """Make ``cancellation`` current inside the block (tasks created there inherit it)."""
    token = _CURRENT.set(cancellation)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class StepInterrupted(Exception):
    """Raised out of :meth:`Cancellation.interrupts` when the cancel stopped the block.

    Attributes:
        reason: why the work was cancelled.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Interrupts:
    """The context manager :meth:`Cancellation.interrupts` returns."""

    __slots__ = ("_base", "_owner", "_task")

    def __init__(self, owner: Cancellation) -> None:
        self._owner = owner
        self._task: asyncio.Task[object] | None = None
        self._base = 0

    def __enter__(self) -> None:
        owner = self._owner
        if owner.cancelled:
            raise StepInterrupted(owner.reason or CANCELLED)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Cancellation.interrupts() needs a running asyncio task")
        self._task = task
        self._base = task.cancelling()
        owner._tasks.add(task)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owner, task = self._owner, self._task
        assert task is not None
        owner._tasks.discard(task)
        if task not in owner._requested:
            return
        owner._requested.discard(task)
        # Undo our own cancel request; a cancel of the caller made meanwhile stays. The
        # block ending without a CancelledError after our request means something inside
        # swallowed it (redis-py's asyncio client can, mid-command): still interrupted.
        if task.uncancel() <= self._base and exc_type in (asyncio.CancelledError, None):
            raise StepInterrupted(owner.reason or CANCELLED) from None


class Cancellation:
    """A one-shot cancel signal for a workflow run or a running step.

    Args:
        markers: the names the fleet knows this unit by: the cancel markers a step message
            carries, which a worker checks in Redis at claim time and while it runs.
        parent: a cancellation whose cancel also cancels this one.
        root_id: the workflow this cancellation belongs to (its hosts keep their records
            of its steps under it, see :mod:`fleet.retention`).
    """

    def __init__(
        self,
        markers: Sequence[str] = (),
        *,
        parent: Cancellation | None = None,
        root_id: str | None = None,
    ) -> None:
        self.markers = tuple(markers)
        self.root_id = root_id
        self._reason: str | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._requested: set[asyncio.Task[object]] = set()
        self._callbacks: list[Callable[[str], object]] = []
        if parent is not None:
            parent.add_callback(self.cancel)

    def __repr__(self) -> str:
        return f"Cancellation(markers={self.markers!r}, reason={self._reason!r})"

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why it was cancelled (``None`` while it is not)."""
        return self._reason

    def cancel(self, reason: str = CANCELLED) -> bool:
        """Cancel: interrupt every task inside :meth:`interrupts` and tell the callbacks.

        Call it on the event loop the interrupted tasks run on (from another thread, use
        ``loop.call_soon_threadsafe``). A task that cancels its own cancellation is not
        interrupted (it knows); it sees :attr:`cancelled` at its next check.

        Returns:
            ``False`` if it was already cancelled (nothing changes then).
        """
        if self._reason is not None:
            return False
        self._reason = str(reason) or CANCELLED
        current = _current_task()
        for task in list(self._tasks):
            if task is not current and not task.done():
                self._requested.add(task)
                task.cancel(f"fleet: {self._reason}")
        for callback in list(self._callbacks):
            callback(self._reason)
        return True

    def add_callback(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(reason)`` when cancelled (now, if it already is).

        Returns:
            A function that removes the callback.
        """
        if self._reason is not None:
            callback(self._reason)
            return lambda: None
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def interrupts(self) -> _Interrupts:
        """A ``with`` block the cancel interrupts: it then raises :class:`StepInterrupted`.

        Entering an already cancelled block raises :class:`StepInterrupted` at once. A
        cancel of the enclosing task by anyone else still raises ``CancelledError``.
        """
        return _Interrupts(self)


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: called from plain code
        return None


def cancelled_outcome(
    spec: AgentStepSpec,
    reason: str | None,
    *,
    usage: TokenUsage = NO_USAGE,
    duration_s: float = 0.0,
    worker: str | None = None,
    discarded: bool = False,
) -> StepOutcome:
    """The outcome of a step a cancel stopped, or never started (``error="cancelled"``).

    Args:
        spec: the step.
        reason: why the workflow was cancelled.
        usage: tokens the step spent before it stopped (they are charged).
        duration_s: how long it ran.
        worker: where it ran.
        discarded: the agent blocked its thread, could not be interrupted and ran to the
            end; its result is dropped.
    """
    message = f"step {spec.task_id!r} cancelled: {reason or CANCELLED}"
    if discarded:
        message += (
            "; its agent blocked its thread and could not be interrupted, so it ran to "
            "the end and its result was discarded"
        )
    return StepOutcome.failed(
        spec.task_id,
        spec.agent,
        message,
        error=CANCELLED,
        usage=usage,
        duration_s=duration_s,
        worker=worker,
    )
