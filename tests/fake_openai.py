"""A small, real OpenAI-compatible chat-completions server for the tests.

It listens on 127.0.0.1 (a free port) in a background thread and answers
``POST /v1/chat/completions`` from a per-test script of :class:`Reply` values, one per
request, in order. It records every request it received (headers and JSON body) and
every client that hung up while it was still working on a reply, so a test can check
what the agent actually sent and that a cancelled request really went away::

    with FakeOpenAI() as server:
        server.script(reply("hello", prompt_tokens=5, completion_tokens=2))
        ...  # point an agent at server.base_url
        assert server.requests[0].body["model"] == "m"
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAI", "Recorded", "Reply", "error", "reply", "tool_call"]


@dataclass
class Reply:
    """What the server does for one request."""

    content: str | None = None
    """The assistant message's text (``None`` with tool calls)."""
    tool_calls: list[dict[str, Any]] | None = None
    """Tool calls as the API returns them (see :func:`tool_call`)."""
    usage: dict[str, int] | None = None
    """The ``usage`` object; ``None`` leaves it out of the response."""
    status: int = 200
    """HTTP status; anything but 200 sends ``body`` instead of a completion."""
    body: Any = None
    """The JSON body of an error response."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (e.g. ``Retry-After``)."""
    delay_s: float = 0.0
    """Seconds to wait before answering (a client hanging up meanwhile is recorded)."""
    drop: bool = False
    """Close the connection without answering."""


@dataclass
class Recorded:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float
    """``time.monotonic()`` when it arrived."""
    peer: tuple[str, int] = ("", 0)
    """The client's address and port (one port per TCP connection)."""


def reply(
    content: str | None = None,
    *,
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    usage: bool = True,
    tool_calls: list[dict[str, Any]] | None = None,
    delay_s: float = 0.0,
) -> Reply:
    """A successful completion with the given usage."""
    return Reply(
        content=content,
        tool_calls=tool_calls,
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if usage
        else None,
        delay_s=delay_s,
    )


def tool_call(
    name: str, arguments: dict[str, Any] | str, *, call_id: str = "call_1"
) -> dict[str, Any]:
    """One entry of ``tool_calls`` (``arguments`` given as a dict is JSON-encoded)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def error(status: int, message: str, *, headers: dict[str, str] | None = None) -> Reply:
    """An error response shaped like OpenAI's (``{"error": {"message": ...}}``)."""
    return Reply(
        status=status,
        body={"error": {"message": message, "type": "fake_error", "code": None}},
        headers=headers or {},
    )


class FakeOpenAI:
    """The server. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>``; any
            other key gets a 401 whose message echoes the key received (as real APIs do).
        models: when set, a request for any other model gets a 404 ``model_not_found``.
        reject_response_format: answer 400 to any request with a ``response_format``
            (a server without JSON-schema support).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: set[str] | None = None,
        reject_response_format: bool = False,
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.reject_response_format = reject_response_format
        self.requests: list[Recorded] = []
        self.disconnects = 0
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        """Listen on a free loopback port."""
        handler = type("FakeOpenAIHandler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (pending delays end at once)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What an agent's ``base_url`` should be (``http://127.0.0.1:PORT/v1``)."""
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    # -- scripting and inspection ----------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies; each request takes the next one."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        with self._lock:
            return len(self._replies)

    def wait_for(self, predicate: Any, timeout_s: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (checked whenever a request arrives/ends)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))
        return True

    # -- used by the handler ---------------------------------------------------------

    def _record(self, request: Recorded, *, take: bool) -> Reply | None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
            return self._replies.pop(0) if take and self._replies else None

    def _hung_up(self) -> None:
        with self._changed:
            self.disconnects += 1
            self._changed.notify_all()


def _completion(model: str, scripted: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": scripted.content}
    if scripted.tool_calls:
        message["tool_calls"] = scripted.tool_calls
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if scripted.tool_calls else "stop",
            }
        ],
    }
    if scripted.usage is not None:
        body["usage"] = scripted.usage
    return body


def _refusal(fake: FakeOpenAI, path: str, key: str, body: Any) -> tuple[int, Any] | None:
    """The error a real server would send before looking at the script, if any."""
    if path.rstrip("/") != "/v1/chat/completions":
        return 404, {"error": {"message": f"no route {path}"}}
    if fake.api_key is not None and key != f"Bearer {fake.api_key}":
        shown = key.removeprefix("Bearer ") or "(none)"
        message = f"Incorrect API key provided: {shown}."
        return 401, {"error": {"message": message, "code": "invalid_api_key"}}
    model = body.get("model") if isinstance(body, dict) else None
    if fake.models is not None and model not in fake.models:
        message = f"The model `{model}` does not exist."
        return 404, {"error": {"message": message, "code": "model_not_found"}}
    if fake.reject_response_format and isinstance(body, dict) and "response_format" in body:
        return 400, {"error": {"message": "response_format is not supported"}}
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    fake: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Stay quiet."""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False (and recorded) if the client hung up meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.fake._stopping.is_set():
            if self._client_gone():
                self.fake._hung_up()
                self.close_connection = True
                return False
            time.sleep(0.01)
        return True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        request = Recorded(
            self.path, dict(self.headers.items()), body, time.monotonic(), self.client_address[:2]
        )
        refusal = _refusal(self.fake, self.path, self.headers.get("Authorization", ""), body)
        if refusal is not None:
            self.fake._record(request, take=False)
            self._send(*refusal)
            return
        scripted = self.fake._record(request, take=True)
        if scripted is None:
            self._send(418, {"error": {"message": "fake server: no scripted reply left"}})
            return
        if scripted.delay_s and not self._wait(scripted.delay_s):
            return
        if scripted.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if scripted.status != 200:
            self._send(scripted.status, scripted.body, scripted.headers)
            return
        model = body.get("model") if isinstance(body, dict) else None
        self._send(200, _completion(str(model), scripted), scripted.headers)
