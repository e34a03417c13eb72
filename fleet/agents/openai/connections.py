"""An httpx transport whose connection pool is aiohttp's.

httpcore's pool (httpx's default transport) scans every connection for every queued
request each time a request starts or ends, so its CPU per request grows with the
requests in flight: on the 2-core benchmark machine one call cost ~3.5 ms of CPU with
64 in flight and ~10 ms with 256, and a worker holding 256 model calls spent its time
there. aiohttp's connector hands out idle connections in constant time (~0.6 ms per
call at 256 in flight, same machine). The agent keeps httpx's API (requests, responses,
exceptions); only the transport underneath changes.

Errors are mapped onto httpx's: timeouts onto ``ConnectTimeout``/``ReadTimeout``, a
refused connection onto ``ConnectError``, a connection dropped mid-answer onto
``RemoteProtocolError``/``ReadError``, so retry decisions stay as they were.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

_NOT_FORWARDED = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers aiohttp sets itself from the URL and the body."""


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as error:
        raise httpx.ConnectTimeout(str(error) or "connect timed out", request=request) from error
    except TimeoutError as error:  # aiohttp's read timeouts are TimeoutErrors too
        raise httpx.ReadTimeout(str(error) or "read timed out", request=request) from error
    except aiohttp.ClientConnectorError as error:
        raise httpx.ConnectError(str(error), request=request) from error
    except aiohttp.ServerDisconnectedError as error:
        raise httpx.RemoteProtocolError(str(error), request=request) from error
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as error:
        raise httpx.ReadError(str(error), request=request) from error
    except aiohttp.ClientError as error:
        raise httpx.TransportError(str(error), request=request) from error


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests through one aiohttp session (made on first use, on its loop).

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
            # No cookies kept between steps; bodies left encoded for httpx to decode.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the whole answer (model answers are not streamed here)."""
        limits = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=limits.get("connect"), sock_read=limits.get("read")
        )
        headers = [  # raw: the names as the agent spelled them
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            if name.lower().decode("latin-1") not in _NOT_FORWARDED
        ]
        body = await request.aread()
        with _as_httpx_errors(request):
            async with self._client().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
            ) as answer:
                content = await answer.read()
                status, answer_headers = answer.status, list(answer.headers.items())
        return httpx.Response(status, headers=answer_headers, content=content, request=request)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
