"""HTTP to the model server: pooled clients, one request with retries, and the retry policy.

An agent keeps one ``httpx.AsyncClient`` per event loop, so the connections of one step
are reused by the next; every client shares one TLS context (loading the CA bundle
costs tens of milliseconds of CPU, once per process instead of once per step). A loop's
client is closed when the loop shuts down its async generators (``asyncio.run`` does),
or by :meth:`Transport.aclose`.

What is retried, how long to wait, and how the server's refusals are named are plain
functions (:func:`backoff`, :func:`retry_after`) and one method (:meth:`Sender.refusal`).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import math
import random
import re
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

import httpx

from ...errors import AgentError
from ...limiters import Admission
from .config import OpenAIAgentConfig
from .wire import error_message

__all__ = [
    "MAX_BACKOFF_S",
    "MAX_RETRY_AFTER_S",
    "Refused",
    "Sender",
    "Transient",
    "Transport",
    "backoff",
    "reset_after",
    "retry_after",
]

logger = logging.getLogger("fleet.agents.openai")

MAX_RETRY_AFTER_S = 120.0
"""The longest ``Retry-After`` honoured; a server asking for more gets this."""
MAX_BACKOFF_S = 30.0
"""The longest wait between retries without ``Retry-After`` (before jitter)."""
LEASE_MARGIN_S = 5.0
"""A call's in-flight slot under a provider limit outlives its request timeout by this."""


def backoff(
    attempt: int,
    retry_after: float | None,
    *,
    base_s: float,
    jitter: float = 0.0,
    cap_s: float = MAX_BACKOFF_S,
) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based).

    The server's ``retry_after`` wins when it gave one; otherwise ``base_s`` doubles per
    attempt up to ``cap_s``, plus ``jitter * base_s`` (pass ``random.random()``).
    """
    if retry_after is not None:
        return retry_after
    return float(min(base_s * 2 ** (attempt - 1), cap_s) + jitter * base_s)


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return min(max(float(millis) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def reset_after(headers: httpx.Headers) -> float | None:
    """Seconds until the provider's windows reset (``x-ratelimit-reset-*``, e.g. ``6m0s``)."""
    longest: float | None = None
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name, "").strip()
        parts = _DURATION.findall(value)
        if parts and not _DURATION.sub("", value):
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in parts)
        else:
            try:  # a bare number of seconds
                seconds = float(value)
            except ValueError:
                continue
        if math.isfinite(seconds):
            longest = max(longest or 0.0, min(max(seconds, 0.0), MAX_RETRY_AFTER_S))
    return longest


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


class Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, dropped connection)."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class Refused(AgentError):
    """The server refused the request with an HTTP status we do not retry."""

    def __init__(self, message: str, *, status: int, kind: str = "provider") -> None:
        super().__init__(message, kind=kind)
        self.status = status


@functools.cache
def _tls() -> ssl.SSLContext:
    """The TLS context every client shares (built once: it loads the CA bundle)."""
    return httpx.create_ssl_context()


async def _closed_with_loop(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    # The loop finalises live async generators when it shuts down: close the pool then.
    try:
        yield
    finally:
        await client.aclose()


_Closer = AsyncGenerator[None, None]


class Transport:
    """One agent's way to its server: the endpoint and a pooled client per event loop.

    Args:
        config: the agent's configuration (``base_url``, limits, retries).
        where: the server's address as shown in messages (credentials masked).
    """

    def __init__(self, config: OpenAIAgentConfig, *, where: str) -> None:
        self.config = config
        self.where = where
        self.endpoint = config.base_url.rstrip("/") + "/chat/completions"
        self._lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, _Closer]] = {}

    async def client(self) -> httpx.AsyncClient:
        """This event loop's pooled client (made on first use)."""
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is not None and not found[0].is_closed:
            return found[0]
        client = httpx.AsyncClient(
            verify=_tls(), limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)
        )
        closer = _closed_with_loop(client)
        await closer.asend(None)
        with self._lock:
            self._clients = {lp: c for lp, c in self._clients.items() if not lp.is_closed()}
            self._clients[loop] = (client, closer)
        return client

    async def aclose(self) -> None:
        """Close this event loop's client and its connections (a later step makes a new one)."""
        with self._lock:
            found = self._clients.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[1].aclose()

    def sender(
        self,
        *,
        key: str | None,
        label: str,
        remaining_s: Callable[[], float | None],
        gate: CallGate | None = None,
    ) -> Sender:
        """What one step sends requests through (its key, deadline, log label, limit)."""
        return Sender(self, key=key, label=label, remaining_s=remaining_s, gate=gate)


class Sender:
    """One step's requests: the key, retries within the step's deadline, the key scrubbed.

    Args:
        transport: the agent's transport.
        key: the API key (``None``: no ``Authorization`` header).
        label: names the agent and step in log lines.
        remaining_s: seconds left before the step's deadline (``None``: no deadline).
        gate: admits every HTTP request under the agent's provider limit first
            (``None``: no limit).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        key: str | None,
        label: str,
        remaining_s: Callable[[], float | None],
        gate: CallGate | None = None,
    ) -> None:
        self.transport = transport
        self.gate = gate
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

    async def post(self, body: dict[str, Any], *, call_tokens: int = 0) -> Any:
        """POST one request, retrying transient failures within the step's deadline.

        Each attempt is admitted under the provider limit first, as ``call_tokens``
        (the prompt estimate plus the call's ``max_tokens``).

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

    async def admitted_attempt(self, body: dict[str, Any], call_tokens: int) -> Any:
        """One request admitted under the provider limit, settled with its real usage.

        A 429 spends nothing at the provider and pauses the limit for the whole fleet
        until the provider's reset (``Retry-After``, ``retry-after-ms`` or
        ``x-ratelimit-reset-*``); an answer without usage keeps the estimate.
        """
        if self.gate is None:
            return await self.attempt(body)
        # The client first: building one (TLS context) can hold the loop for a while, and
        # the window counts a call from its admission, so send right after it.
        await self.transport.client()
        lease_s = self.config.timeout_s + LEASE_MARGIN_S
        admission = await self.gate.admit_call(call_tokens, lease_s=lease_s)
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

    async def _pause(self, headers: httpx.Headers) -> None:
        assert self.gate is not None
        reset = retry_after(headers) or reset_after(headers)
        if reset:
            await self.gate.pause_limit(reset)

    async def attempt(
        self,
        body: dict[str, Any],
        *,
        on_429: Callable[[httpx.Headers], Any] | None = None,
        on_sent: Callable[[float], None] | None = None,
    ) -> Any:
        """One HTTP request; raises :class:`Transient` for what is worth retrying.

        ``on_sent`` is called with ``time.monotonic()`` once the request is written.
        """
        extensions: dict[str, Any] = {}
        if on_sent is not None:

            async def trace(event: str, info: dict[str, Any]) -> None:
                if event.endswith("send_request_body.complete"):
                    on_sent(time.monotonic())

            extensions["trace"] = trace
        timeout = self.config.timeout_s
        remaining = self.remaining_s()
        if remaining is not None:
            timeout = max(min(timeout, remaining), 0.001)
        client = await self.transport.client()
        try:
            response = await client.post(
                self.transport.endpoint,
                json=body,
                headers=self._headers,
                timeout=timeout,
                extensions=extensions,
            )
        except httpx.TimeoutException:
            raise Transient(f"no answer within {timeout:.3g} s") from None
        except httpx.TransportError as problem:
            raise Transient(self.scrub(f"{type(problem).__name__}: {problem}")) from None
        text = self.scrub(response.text)
        status = response.status_code
        if 200 <= status < 300:
            try:
                return json.loads(text)
            except ValueError:
                raise Refused(
                    f"model server at {self.transport.where} sent a response that is not JSON",
                    status=status,
                ) from None
        if status == 429 and on_429 is not None:
            await on_429(response.headers)
        raise self.refusal(status, error_message(text), response.headers)

    def refusal(self, status: int, message: str, headers: httpx.Headers) -> Exception:
        """The exception for an HTTP error ``status``: :class:`Transient` or :class:`Refused`."""
        where = self.transport.where
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
        if status in (408, 429) or status >= 500:
            wait = retry_after(headers)
            if wait is None and status == 429:
                wait = reset_after(headers)
            return Transient(f"HTTP {status}: {message}", retry_after=wait, status=status)
        return Refused(
            f"model server at {where} refused the request (HTTP {status}: {message})",
            status=status,
        )
