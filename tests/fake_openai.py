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

__all__ = [
    "AutoModel",
    "FakeOpenAI",
    "Recorded",
    "Reply",
    "error",
    "example",
    "reply",
    "tool_call",
]


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


@dataclass
class AutoModel:
    """Answers whatever it is asked, like a (very obedient) small model, one slot at a time.

    A request offering tools, before any tool result, gets a call of the first tool with
    example arguments (``content: null``); a request asking for JSON (a
    ``response_format`` schema, or the output contract in the prompt) gets an example
    of the schema; anything else gets ``"ok"``. ``slots`` requests are served at once,
    ``service_s`` each; the others queue, as on a one-slot llama.cpp server.
    """

    service_s: float = 0.05
    slots: int = 1

    def answer(self, body: dict[str, Any]) -> Reply:
        """The reply to one request."""
        messages = body.get("messages") or []
        prompt = sum(len(json.dumps(m)) for m in messages) // 4 + 1
        tools = body.get("tools") or []
        if tools and not any(m.get("role") == "tool" for m in messages):
            function = tools[0]["function"]
            arguments = example(function.get("parameters") or {"type": "object"})
            call = tool_call(function["name"], arguments, call_id="call_auto")
            return reply(None, tool_calls=[call], prompt_tokens=prompt, completion_tokens=9)
        schema = _asked_schema(body)
        content = "ok" if schema is None else json.dumps(example(schema))
        return reply(content, prompt_tokens=prompt, completion_tokens=len(content) // 4 + 1)


def _asked_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    format_ = body.get("response_format") or {}
    if isinstance(format_.get("schema"), dict):
        return format_["schema"]
    if isinstance((format_.get("json_schema") or {}).get("schema"), dict):
        return format_["json_schema"]["schema"]
    for message in body.get("messages") or []:
        text = message.get("content")
        if isinstance(text, str) and "FINAL OUTPUT CONTRACT" in text:
            schema = json.loads(text[text.index("{", text.index("FINAL OUTPUT CONTRACT")) :])
            return schema if isinstance(schema, dict) else None
    return None


def example(schema: dict[str, Any]) -> Any:
    """A small value that satisfies a (simple) JSON Schema."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: example(properties.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return [example(schema.get("items", {}))] * schema.get("minItems", 0)
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": False}.get(kind)


class FakeOpenAI:
    """The server. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>``; any
            other key gets a 401 whose message echoes the key received (as real APIs do).
        models: when set, a request for any other model gets a 404 ``model_not_found``.
        reject_response_format: answer 400 to any request with a ``response_format``
            (a server without JSON-schema support).
        reject_json_schema: answer ``response_format: {"type": "json_schema"}`` with a
            500 whose body is a pydantic validation error and a traceback, as
            llama-cpp-python's server does (``json_object`` is accepted).
        reject_null_content: answer 400 (a validation error naming ``content``) to a
            request with a message whose ``content`` is ``null``.
        drop_every: close the connection without answering every Nth request that
            reaches the model (0: never).
        auto: when the script is empty, answer like a model would (see :class:`AutoModel`).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: set[str] | None = None,
        reject_response_format: bool = False,
        reject_json_schema: bool = False,
        reject_null_content: bool = False,
        drop_every: int = 0,
        auto: AutoModel | None = None,
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.reject_response_format = reject_response_format
        self.reject_json_schema = reject_json_schema
        self.reject_null_content = reject_null_content
        self.drop_every = drop_every
        self.auto = auto
        self.dropped = 0
        self.served = 0
        self._model_requests = 0
        self._slots = threading.BoundedSemaphore(auto.slots if auto is not None else 1)
        self.requests: list[Recorded] = []
        self.disconnects = 0
        self.hung_up_at: list[float] = []
        """``time.time()`` of each disconnect, when the server noticed the client gone."""
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

    def _next_is_dropped(self) -> bool:
        with self._lock:
            self._model_requests += 1
            drop = self.drop_every > 0 and self._model_requests % self.drop_every == 0
            self.dropped += drop
            return drop

    def _hung_up(self) -> None:
        with self._changed:
            self.disconnects += 1
            self.hung_up_at.append(time.time())
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
    if not isinstance(body, dict):
        return None
    if fake.reject_response_format and "response_format" in body:
        return 400, {"error": {"message": "response_format is not supported"}}
    kind = (body.get("response_format") or {}).get("type")
    if fake.reject_json_schema and kind not in (None, "text", "json_object"):
        return 500, {"error": {"message": _LLAMA_CPP_PYTHON_500, "type": "internal_server_error"}}
    messages = body.get("messages") or []
    if fake.reject_null_content and any(m.get("content", "") is None for m in messages):
        message = (
            "3 validation errors:\n"
            + "  {'loc': ('body', 'messages', 1, 'role'), 'msg': \"Input should be 'user'\"}\n" * 8
            + "  {'loc': ('body', 'messages', 1, 'content'), 'msg': 'Input should be a valid string'}"
        )
        return 400, {"error": {"message": message, "type": "invalid_request_error"}}
    return None


_LLAMA_CPP_PYTHON_500 = (
    "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n"
    "  Input should be 'text' or 'json_object' [type=literal_error, "
    "input_value='json_schema', input_type=str]\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/llama_cpp/server/errors.py", line 170, in custom_route_handler\n'
    "    response = await original_route_handler(request)\n"
    "SECRET-LOOKING-SERVER-INTERNALS"
)


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

    def _serve_auto(self, body: Any) -> None:
        """One slot-limited, fixed-time answer (a client gone while queued is skipped)."""
        fake, auto = self.fake, self.fake.auto
        assert auto is not None
        if fake._next_is_dropped():
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        while not fake._slots.acquire(timeout=0.01):
            if self._client_gone() or fake._stopping.is_set():
                fake._hung_up()
                self.close_connection = True
                return
        try:
            time.sleep(auto.service_s)
            with fake._lock:
                fake.served += 1
        finally:
            fake._slots.release()
        if self._client_gone():
            fake._hung_up()
            self.close_connection = True
            return
        model = body.get("model") if isinstance(body, dict) else None
        self._send(200, _completion(str(model), auto.answer(body)))

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
        if scripted is None and self.fake.auto is not None:
            self._serve_auto(body)
            return
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
