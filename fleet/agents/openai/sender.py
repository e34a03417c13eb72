"""One step's requests to the model server: one request with retries, and the retry policy.

A :class:`Sender` (made by :meth:`.transport.Transport.sender`) sends a step's requests
through its agent's pooled client and slots, admitted under the provider limit
(:class:`CallGate`), retried within the step's deadline, with the API key scrubbed.

What is retried and how the server's refusals are named is :meth:`Sender.refusal`; how
long to wait is :mod:`.retry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import AgentError
from ...limiters import Admission
from .capabilities import rejected_field, validation_error
from .concurrency import WidthMemory
from .connections import ConnectionFailed
from .failures import Refused, Transient
from .retry import backoff, reset_after, retry_after
from .wire import StreamedCompletion, error_message

if TYPE_CHECKING:
    from .transport import Transport

__all__ = ["CallGate", "Sender"]

LEASE_MARGIN_S = 5.0
"""A call's in-flight slot under a provider limit outlives its request timeout by this."""


def _usage_total(data: Any) -> int | None:
    """The ``usage.total_tokens`` of a completion body (``None`` when absent)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if type(total) is int and total > 0 else None


class CallGate(Protocol):
    """Admission under the agent's provider limit (``AgentContext`` is one)."""

    async def admit_call(self, tokens: int, *, lease_s: float = ...) -> Admission:
        """Wait until a call of ``tokens`` fits under the limit; count it."""

    async def pause_limit(self, seconds: float) -> None:
        """The provider answered 429: pause the limit fleet-wide for ``seconds``."""


logger = logging.getLogger("fleet.agents.openai")


def _first_line(message: str, limit: int = 200) -> str:
    """A server message as one short line (tracebacks and long bodies cut)."""
    line = message.strip().splitlines()[0] if message.strip() else "(empty)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Sender:
    """One step's requests: the key, retries within the step's deadline, the key scrubbed.

    Args:
        transport: the agent's transport.
        key: the API key (``None``: no ``Authorization`` header).
        label: names the agent and step in log lines.
        remaining_s: seconds left before the step's deadline (``None``: no deadline).
        limit: admits every HTTP request under the agent's provider limit first
            (``None``: no limit).
        on_text: told each piece of a streamed answer's text as it arrives, and whether
            it is the answer's first (a retried request starts the text over).
        memory: where the width the server takes is remembered between processes
            (``None``: only in this one).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        key: str | None,
        label: str,
        remaining_s: Callable[[], float | None],
        limit: CallGate | None = None,
        on_text: Callable[[str, bool], None] | None = None,
        memory: WidthMemory | None = None,
    ) -> None:
        self.transport = transport
        self.limit = limit
        self.on_text = on_text
        self.memory = memory
        self.config = transport.config
        self.label = label
        self.remaining_s = remaining_s
        self.has_key = key is not None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._secrets = [key, json.dumps(key)[1:-1]] if key else []

    def scrub(self, text: str) -> str:
        """``text`` with the API key masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def post(self, body: Callable[[], dict[str, Any]], *, call_tokens: int = 0) -> Any:
        """POST one request, retrying transient failures within the step's deadline.

        Each attempt is admitted under the provider limit first, as ``call_tokens``
        (the prompt estimate plus the call's ``max_tokens``).

        ``body()`` builds the request when its slot is granted, so each try is sent in the
        features the server is known to accept by then.

        Returns:
            The decoded JSON body of a 2xx answer.

        Raises:
            Refused: the server refused the request (not worth retrying).
            AgentError: ``unavailable`` once retries are spent or would outlive the step.
        """
        attempt = 1
        while True:
            try:
                return await self.admitted_attempt(body, call_tokens)
            except Transient as problem:
                last = problem
            if attempt > self.config.max_retries:
                raise self._unavailable(last, attempt, "")
            wait = backoff(
                attempt, last.retry_after, base_s=self.config.backoff_s, jitter=random.random()
            )
            remaining = self.remaining_s()
            if remaining is not None and wait >= remaining:
                raise self._unavailable(
                    last,
                    attempt,
                    f"; the next try would be in {wait:.2f} s but the step has "
                    f"{remaining:.2f} s left",
                )
            logger.warning(
                "%s: %s; retrying in %.2f s (attempt %d of %d)",
                self.label,
                last,
                wait,
                attempt + 1,
                self.config.max_retries + 1,
            )
            await asyncio.sleep(wait)
            attempt += 1

    def _unavailable(self, last: Transient, attempts: int, why: str) -> AgentError:
        return AgentError(
            f"model server at {self.transport.where} is unavailable: {last} "
            f"(gave up after {attempts} attempt(s){why})",
            kind="unavailable",
        )

    async def admitted_attempt(self, body: Callable[[], dict[str, Any]], call_tokens: int) -> Any:
        """One request admitted under the provider limit, settled with its real usage.

        A 429 spends nothing at the provider and pauses the limit for the whole fleet
        until the provider's reset (``Retry-After``, ``retry-after-ms`` or
        ``x-ratelimit-reset-*``); an answer without usage keeps the estimate.
        """
        if self.limit is None:
            return await self.attempt(body)
        # The client first: building one (TLS context) can hold the loop for a while, and
        # the window counts a call from its admission, so send right after it.
        self.transport.client()
        lease_s = self.config.timeout_s + LEASE_MARGIN_S
        admission = await self.limit.admit_call(call_tokens, lease_s=lease_s)
        used: int | None = None
        sent: list[float] = []
        try:
            data = await self.attempt(body, on_429=self._pause, on_sent=sent.append)
            used = _usage_total(data)
            return data
        except Transient as problem:
            if problem.status == 429:
                used = 0
            raise
        finally:
            await asyncio.shield(admission.settle(used, sent_at=sent[0] if sent else None))

    async def _pause(self, headers: Mapping[str, str]) -> None:
        assert self.limit is not None
        reset = retry_after(headers) or reset_after(headers)
        if reset:
            await self.limit.pause_limit(reset)

    async def attempt(
        self,
        body: Callable[[], dict[str, Any]],
        *,
        on_429: Callable[[Mapping[str, str]], Any] | None = None,
        on_sent: Callable[[float], None] | None = None,
    ) -> Any:
        """One HTTP request in one of the agent's slots; :class:`Transient` if worth retrying.

        The slot is waited for before the request's own timeout starts; the answer (or
        its absence) adjusts how many slots there are (see :mod:`.concurrency`).
        """
        gate = self.transport.gate
        await gate.recall(self.memory)
        ticket = await gate.acquire()
        try:
            data, latency, tokens = await self._request(body(), on_429, on_sent)
        except Transient as problem:
            if problem.congestion:
                # A timed-out request may still be running on the server: hold its slot.
                hold_s = self.config.timeout_s if problem.abandoned else 0.0
                remaining = self.remaining_s()
                if remaining is not None:
                    hold_s = min(hold_s, remaining)
                await gate.release_congested(ticket, hold_s=hold_s)
                await gate.remember(self.memory)
            else:
                gate.forget()
            raise
        except BaseException:
            gate.forget()
            raise
        gate.release(ticket, latency_s=latency, tokens=tokens, timeout_s=self.config.timeout_s)
        await gate.remember(self.memory)
        return data

    async def _request(
        self,
        body: dict[str, Any],
        on_429: Callable[[Mapping[str, str]], Any] | None,
        on_sent: Callable[[float], None] | None,
    ) -> tuple[Any, float, int]:
        """The HTTP request itself; ``on_sent`` gets ``time.monotonic()`` once it is written."""
        timeout = self.config.timeout_s
        remaining = self.remaining_s()
        if remaining is not None:
            timeout = max(min(timeout, remaining), 0.001)
        client = self.transport.client()
        started = time.monotonic()
        try:
            # A streamed answer's bytes keep its request alive (each read is bounded);
            # a whole answer is waited for while the server keeps answering others.
            streamed = body.get("stream") is True
            async with self._patience(started, timeout, streamed):
                answer = await client.post_json(
                    self.transport.endpoint,
                    body,
                    headers=self._headers,
                    timeout_s=timeout,
                    on_sent=on_sent,
                    stream=StreamedCompletion(self.on_text) if streamed else None,
                    bound_reads=streamed,
                )
        except (ConnectionFailed, TimeoutError) as problem:
            if isinstance(problem, TimeoutError) or problem.timed_out:
                waited = time.monotonic() - started
                queued = (
                    f" (waited {waited:.3g} s while the server answered others)"
                    if waited > 1.5 * timeout
                    else ""
                )
                raise Transient(
                    f"no answer within {timeout:.3g} s{queued}", congestion=True, abandoned=True
                ) from None
            raise Transient(self.scrub(str(problem))) from None
        latency = time.monotonic() - started
        text = self.scrub(answer.text)
        status = answer.status
        if 200 <= status < 300:
            try:
                data = json.loads(text)
            except ValueError:
                raise Refused(
                    f"model server at {self.transport.where} sent a response that is not JSON",
                    status=status,
                ) from None
            return data, latency, _work(data)
        if status == 429 and on_429 is not None:
            await on_429(answer.headers)
        raise self.refusal(status, text, answer.headers, body)

    @contextlib.asynccontextmanager
    async def _patience(
        self, started: float, first_s: float, streamed: bool
    ) -> AsyncIterator[None]:
        """Give up on the answer after ``first_s`` unless the server keeps answering.

        A call queued behind others at a server that answers them is waited for (up to
        the step's deadline, see :meth:`.concurrency.Gate.patient`); its retry would
        only join the back of the same queue. ``TimeoutError`` when given up. A
        streamed call is bounded per read instead (its bytes show it is alive).
        """
        if streamed:
            yield
            return
        loop = asyncio.get_running_loop()
        gate = self.transport.gate
        async with asyncio.timeout(None) as window:
            handles = [loop.call_later(first_s, lambda: check())]

            def check() -> None:
                waited, left = time.monotonic() - started, self.remaining_s()
                if gate.patient(started, waited, self.config.timeout_s) and (
                    left is None or left > 0.001
                ):
                    wait = first_s if left is None else min(first_s, left)
                    handles[0] = loop.call_later(wait, check)
                else:
                    window.reschedule(loop.time())

            try:
                yield
            finally:
                handles[0].cancel()

    def refusal(
        self, status: int, text: str, headers: Mapping[str, str], body: dict[str, Any]
    ) -> Exception:
        """The exception for an HTTP error: :class:`Transient` or :class:`Refused`.

        Retried: 408, 429, 502/503/504 and other 5xx unless the body is a validation
        error. Refused at once: 401/403 (``auth``), 404 and every other 4xx, and a
        validation error whatever its status (``provider``, naming the rejected field so
        the conversation can fall back).
        """
        where = self.transport.where
        message = error_message(text)
        if status in (401, 403):
            env = self.config.api_key_env
            hint = (
                f"check the key in ${env}"
                if env and self.has_key
                else f"${env} is not set, so no key was sent"
                if env
                else "no key is sent because api_key_env is not set"
            )
            return Refused(
                f"model server at {where} refused the API key (HTTP {status}: {message}); {hint}",
                status=status,
                kind="auth",
            )
        if status == 404:
            return Refused(
                f"model server at {where} answered 404 for model {self.config.model!r} "
                f"({message}); check the model name and that base_url is the API root "
                "(usually ending in /v1)",
                status=status,
            )
        invalid = status not in (408, 429) and validation_error(text)
        if status in (408, 429) or (status >= 500 and not invalid):
            wait = retry_after(headers)
            if wait is None and status == 429:
                wait = reset_after(headers)
            return Transient(
                f"HTTP {status}: {_first_line(message)}",
                retry_after=wait,
                congestion=status in (429, 503),
                status=status,
            )
        full = error_message(text, limit=None)
        field = rejected_field(full, body) if invalid else None
        if field is not None:
            return Refused(
                f"model server at {where} rejected the request's {field!r} "
                f"(HTTP {status}: {_first_line(message)})",
                status=status,
                rejected=field,
                detail=full,
            )
        return Refused(
            f"model server at {where} refused the request (HTTP {status}: "
            f"{message if status < 500 else _first_line(message)})",
            status=status,
        )


def _work(data: Any) -> int:
    """A call's size for latency comparisons.

    Generated tokens, plus prompt tokens at an eighth (reading a prompt is much faster
    per token than generating).
    """
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return 0
    counts = [usage.get(name) for name in ("completion_tokens", "prompt_tokens")]
    completion, prompt = (c if isinstance(c, int) and c > 0 else 0 for c in counts)
    return completion + prompt // 8
