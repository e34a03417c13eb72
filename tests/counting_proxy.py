"""A loopback HTTP proxy that counts and records what reaches a model server.

Put it in front of a real server (``CountingProxy(upstream_url)``) to learn how many
requests the server received and what usage it reported, without trusting the client.
Each request is forwarded on its own upstream connection and waited for to the end,
also when the client hung up meanwhile (the server did that work all the same).
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CountingProxy", "Exchange"]


@dataclass
class Exchange:
    """One request the server received, and its answer."""

    path: str
    request: Any
    status: int
    """The HTTP status (0: the server dropped the connection)."""
    response: Any


class CountingProxy:
    """The proxy. Use as a context manager.

    Args:
        upstream: the server's root, e.g. ``http://127.0.0.1:PORT``.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CountingProxy:
        handler = type("ProxyHandler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` of the proxy."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def completions(self) -> list[Exchange]:
        """The chat-completion exchanges so far."""
        with self.lock:
            return [e for e in self.exchanges if e.path.endswith("/chat/completions")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: CountingProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Stay quiet."""

    def _forward(self, method: str) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=900)
        headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
        try:
            upstream.request(method, self.path, body=raw or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException):
            data, status = b"", 0  # the server dropped the connection: so do we
        finally:
            upstream.close()
        exchange = Exchange(self.path, _json(raw), status, _json(data))
        with self.proxy.lock:
            self.proxy.exchanges.append(exchange)
        if status == 0:
            self.close_connection = True
            return
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up on this one

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._forward("POST")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._forward("GET")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")
