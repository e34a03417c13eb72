"""An agent's HTTP connections to its model server: one aiohttp session per event loop.

Why aiohttp: httpcore's pool (httpx's default) scans every connection for every queued
request each time a request starts or ends, so its CPU per call grows with the calls in
flight; aiohttp's connector hands out idle connections in constant time. httpx's request
and response layer on top of aiohttp's pool still spends more CPU per call than aiohttp
alone, so the agent talks to aiohttp directly: a step's POST builds one aiohttp request,
nothing more. ``bench/llm_worker.py`` measures a worker's CPU per call.

A failure comes back as :class:`ConnectionFailed`, named the way the log has always named
it (``ConnectError``, ``ReadTimeout``, ...), with ``timed_out`` telling a request the
server may still be working on from one that never arrived or was cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import pydantic_core

from .wire import StreamedCompletion

__all__ = ["Answer", "ConnectionFailed", "Connections"]


@dataclass(frozen=True)
class Answer:
    """A model server's whole answer."""

    status: int
    headers: Mapping[str, str]
    """Case-insensitive, as the server sent them."""
    text: str


class ConnectionFailed(Exception):
    """No answer: the connection could not be made, timed out, or broke.

    Args:
        name: what failed, e.g. ``ConnectError`` or ``ReadTimeout``.
        message: aiohttp's description (may name the server's address).
        timed_out: no answer within the timeout (the server may still be working on it).
    """

    def __init__(self, name: str, message: str, *, timed_out: bool = False) -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.timed_out = timed_out


def _failure(error: BaseException) -> ConnectionFailed | None:
    """The :class:`ConnectionFailed` for an aiohttp error (``None``: not a connection error)."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return ConnectionFailed("ConnectTimeout", str(error) or "connect timed out", timed_out=True)
    if isinstance(error, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return ConnectionFailed("ReadTimeout", str(error) or "read timed out", timed_out=True)
    if isinstance(error, aiohttp.ClientConnectorError):
        return ConnectionFailed("ConnectError", str(error))
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return ConnectionFailed("RemoteProtocolError", str(error))
    if isinstance(error, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return ConnectionFailed("ReadError", str(error))
    if isinstance(error, aiohttp.InvalidURL):
        return None  # the agent's base_url: a configuration error, not worth a retry
    if isinstance(error, aiohttp.ClientError):
        return ConnectionFailed(type(error).__name__, str(error))
    return None


async def _on_body_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    notify = getattr(context, "trace_request_ctx", None)
    if notify is not None:
        notify(time.monotonic())


def _json(body: Any) -> bytes:
    """A request body as JSON, compact, UTF-8, and never ``NaN`` (not JSON; raises)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


async def _read_events(
    answer: aiohttp.ClientResponse, stream: StreamedCompletion, alive: Callable[[], None]
) -> Answer:
    """Feed a server-sent-events answer to ``stream``, up to ``[DONE]``, reading to its end.

    Reads whatever arrived at once and splits it into lines here: under load many events
    wait in the socket together, and one read for all of them costs far less than one
    ``readline`` each. Each read tells ``alive`` (see :func:`_idle_bound`).
    """
    pending, done = b"", False
    async for block in answer.content.iter_any():
        alive()
        if done:
            continue  # the rest of the body, so the connection can be reused
        pending += block
        *lines, pending = pending.split(b"\n")
        for line in lines:
            done = done or _feed(line, stream)
    if not done and pending:
        _feed(pending, stream)
    if stream.error is not None:
        return Answer(502, answer.headers, json.dumps({"error": stream.error}))
    return Answer(answer.status, answer.headers, json.dumps(stream.body()))


@contextlib.asynccontextmanager
async def _idle_bound(idle_s: float) -> AsyncIterator[Callable[[], None]]:
    """``TimeoutError`` once nothing arrived for ``idle_s``; yields what marks an arrival.

    What aiohttp's ``sock_read`` timeout does, for a streamed answer: aiohttp moves its
    timer on every read (a new timer handle per chunk, a chunk per token), this checks
    the time of the last arrival once per ``idle_s``.
    """
    loop = asyncio.get_running_loop()
    last = loop.time()

    def alive() -> None:
        nonlocal last
        last = loop.time()

    async with asyncio.timeout(None) as window:
        handles = [loop.call_at(last + idle_s, lambda: check())]

        def check() -> None:
            if loop.time() >= last + idle_s:
                window.reschedule(loop.time())
            else:
                handles[0] = loop.call_at(last + idle_s, check)

        try:
            yield alive
        finally:
            handles[0].cancel()


def _feed(line: bytes, stream: StreamedCompletion) -> bool:
    """Hand one ``data:`` line to ``stream``; returns whether it was ``[DONE]``."""
    if not line.startswith(b"data:"):
        return False  # a comment, an event name or the blank line between events
    data = line[5:].strip()
    if data == b"[DONE]":
        return True
    try:
        # pydantic-core's parser (pydantic's own): a chunk costs a fraction of json.loads,
        # and a streamed answer is hundreds of chunks.
        stream.feed(pydantic_core.from_json(data))
    except ValueError:
        pass  # one unreadable chunk loses only itself
    return False


def _nothing() -> None:
    pass


class Connections:
    """One aiohttp session (its connection pool), made on first use on the loop that uses it.

    Args:
        ssl_context: TLS settings for ``https://`` servers.
        keepalive_s: how long an idle connection is kept for the next request.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, keepalive_s: float = 30.0) -> None:
        self._ssl = ssl_context
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0, ssl=self._ssl, keepalive_timeout=self._keepalive_s
            )
            traces = aiohttp.TraceConfig()
            traces.on_request_chunk_sent.append(_on_body_sent)
            # No cookies kept between steps; an answer's body is read as sent.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trace_configs=[traces],
            )
        return self._session

    async def post_json(
        self,
        url: str,
        body: Any,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        on_sent: Callable[[float], None] | None = None,
        stream: StreamedCompletion | None = None,
        bound_reads: bool = True,
    ) -> Answer:
        """POST ``body`` as JSON and read the whole answer.

        ``timeout_s`` bounds connecting and each wait for the server's bytes, as a
        per-request timeout does in httpx (with ``bound_reads=False`` only connecting:
        the caller bounds the wait for the answer); ``on_sent`` gets
        ``time.monotonic()`` once the body is written. With ``stream``, a 2xx answer of
        server-sent events is fed to it event by event, and the answer's text is the
        completion it put together (an ``error`` event makes it a 502).

        Raises:
            ConnectionFailed: no answer (see the class).
        """
        if stream is None or not bound_reads:
            read = timeout_s if bound_reads else None
            return await self._post(url, body, headers, timeout_s, read, on_sent, stream, _nothing)
        try:  # a streamed answer's reads are bounded by _idle_bound, not by aiohttp
            async with _idle_bound(timeout_s) as alive:
                return await self._post(url, body, headers, timeout_s, None, on_sent, stream, alive)
        except TimeoutError as error:
            message = f"no bytes from the server for {timeout_s:g} s"
            raise ConnectionFailed("ReadTimeout", message, timed_out=True) from error

    async def _post(
        self,
        url: str,
        body: Any,
        headers: Mapping[str, str],
        connect_s: float,
        read_s: float | None,
        on_sent: Callable[[float], None] | None,
        stream: StreamedCompletion | None,
        alive: Callable[[], None],
    ) -> Answer:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)
        try:
            async with self._client().post(
                url,
                data=_json(body),
                headers={"Content-Type": "application/json", **headers},
                timeout=timeout,
                allow_redirects=False,
                trace_request_ctx=on_sent,
            ) as answer:
                alive()
                if stream is not None and answer.content_type == "text/event-stream":
                    if 200 <= answer.status < 300:
                        return await _read_events(answer, stream, alive)
                content = await answer.read()
                return Answer(answer.status, answer.headers, _decode(content, answer.charset))
        except (aiohttp.ClientError, TimeoutError) as error:
            failure = _failure(error)
            if failure is None:
                raise
            raise failure from error

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
