"""One event loop per worker process, shared by every step the process runs.

Celery's threads pool gives each running step a thread; a step's coroutine does not run
on that thread but on this process's one :class:`StepLoop`, and the Celery thread blocks
on its future. So a worker started with ``-c 256`` has 256 threads that only wait, and
one loop that holds 256 model calls in flight over pooled connections (an agent's HTTP
client is kept per event loop), instead of 256 loops contending for the GIL, each with
its own connections and TLS setup.

A *blocking* agent (a plain ``def`` agent, or one declared ``blocking = true``) would
stall every step on the shared loop, so its steps keep the old way: each runs on a loop
of its own on its Celery thread (:class:`ThreadLoops`). That costs what every step cost
before: a loop per running step, and no connection reuse with the other steps.

A step that escapes with ``SystemExit`` or ``KeyboardInterrupt`` fails only its own
step: the loop converts it and keeps running. A watchdog thread logs, with the stack,
when an agent holds the shared loop for longer than ``stall_warn_s``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["OnStepLoop", "StepEscaped", "StepLoop", "ThreadLoops", "prestart_threads"]

logger = logging.getLogger("fleet.worker")

T = TypeVar("T")


class StepEscaped(RuntimeError):
    """A step raised ``SystemExit`` or ``KeyboardInterrupt``; only that step fails."""


async def _guarded(coro: Coroutine[Any, Any, T]) -> T:
    # A task that raises SystemExit/KeyboardInterrupt re-raises it out of run_forever,
    # which would stop the loop every other step of the process runs on.
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as escaped:
        raise StepEscaped(f"the step raised {type(escaped).__name__}: {escaped}") from None


class StepLoop:
    """This process's shared event loop, on a thread of its own, started on first use.

    Args:
        stall_warn_s: log a warning (with the loop thread's stack) when the loop has not
            run a callback for this long: an agent is blocking it.
    """

    def __init__(self, *, stall_warn_s: float = 2.0) -> None:
        self.stall_warn_s = stall_warn_s
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closing = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shared loop; block this thread until it is done.

        If this thread is interrupted while waiting, the step's task is cancelled.
        """
        loop = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(_guarded(coro), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if self._loop is None or self._pid != os.getpid() or not alive:
                # First use in this (possibly forked) process.
                self._pid = os.getpid()
                self._closing = False
                loop = self._loop = asyncio.new_event_loop()
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(loop, ready), name="fleet-steps", daemon=True
                )
                self._thread.start()
                ready.wait()
                threading.Thread(
                    target=self._watch, args=(loop,), name="fleet-steps-watch", daemon=True
                ).start()
                atexit.register(self.close)
            return self._loop

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        while not self._closing:
            try:
                loop.run_forever()
            except BaseException:  # keep serving the other steps
                logger.exception("an exception escaped to the worker's event loop")

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Warn when an agent holds the loop (checked every ``stall_warn_s / 4``)."""
        while not self._closing and not loop.is_closed():
            answered = threading.Event()
            try:
                loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # closed meanwhile
                return
            if answered.wait(self.stall_warn_s):
                time.sleep(self.stall_warn_s / 4)
                continue
            thread = self._thread
            frame = sys._current_frames().get(thread.ident or 0) if thread else None
            where = "".join(traceback.format_stack(frame, limit=6)) if frame else "(unknown)\n"
            logger.warning(
                "an agent has blocked this worker's event loop for %.1f s, stalling every "
                "step of the process; make it non-blocking, or declare it blocking = true "
                "in the agents file so its steps get threads of their own. It is at:\n%s",
                self.stall_warn_s,
                where.rstrip(),
            )
            answered.wait()

    def close(self, timeout_s: float = 5.0) -> None:
        """Close async generators (agents' pooled clients) and stop the loop's thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid() or loop.is_closed():
                return
            self._closing = True
        try:
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout_s)
        except Exception:
            logger.warning("the worker's event loop did not close its clients in time")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()


class ThreadLoops:
    """A loop per thread, for steps whose agent blocks: kept for the thread's lifetime."""

    def __init__(self) -> None:
        self._local = threading.local()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's own loop."""
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop.run_until_complete(_guarded(coro))


def prestart_threads(
    executor: object,
    count: int,
    *,
    warm: Callable[[], object] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Start ``count`` threads of a thread pool now rather than one per task later.

    A ``ThreadPoolExecutor`` starts a thread on each submit while none is idle, and the
    submitter waits for it to run: at a worker's first burst of 256 steps that is 256
    thread starts in a row on Celery's consumer thread. ``count`` jobs that wait for
    each other make the pool start them all at once, before work arrives. ``warm`` runs
    on each of them first, for what a thread builds on its first task (Celery keeps a
    result backend per thread, each with a Redis pool of its own).
    """
    if not isinstance(executor, ThreadPoolExecutor) or count < 2:
        return
    barrier = threading.Barrier(count)

    def meet() -> None:
        if warm is not None:
            try:
                warm()
            except Exception as error:  # the task builds it again, and reports a failure
                logger.debug("warming a step thread failed: %s", error)
        try:
            barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            logger.info("started fewer than %d step threads ahead of work", count)

    for _ in range(count):
        executor.submit(meet)


class OnStepLoop:
    """Calls ``fn(reason)`` on the event loop a step runs on, from the lease thread.

    The step's loop is known only once its coroutine starts there (the shared loop, or a
    blocking step's own): a call that comes earlier waits for that moment.
    """

    def __init__(self, fn: Callable[[str], object]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: str | None = None

    def __call__(self, reason: str) -> None:
        """Call ``fn(reason)`` on the step's loop (once the step runs there)."""
        with self._lock:
            if self._loop is None:
                self._pending = reason
                return
            loop = self._loop
        loop.call_soon_threadsafe(self._fn, reason)

    async def run(self, body: Coroutine[Any, Any, T]) -> T:
        """Await ``body`` on this loop, which calls made from now on are sent to."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            pending, self._pending = self._pending, None
        if pending is not None:
            self._fn(pending)
        return await body
