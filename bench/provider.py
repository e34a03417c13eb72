"""A loopback OpenAI-compatible model server for benchmarks and tests.

It answers ``POST /v1/chat/completions`` after a configurable latency (plus jitter), with
``usage`` in every answer (streamed as server-sent events, a chunk per token and usage in
the last one, when the request says ``"stream": true``), an object that satisfies the
request's JSON schema when one is asked for (``response_format`` or a schema quoted in the
prompt), and tool calls when the request offers tools. It enforces its own limits
(requests and tokens per sliding window, concurrent requests), answering ``429`` with
``Retry-After``, and can switch on quirks real servers have: reject ``response_format:
json_schema`` with a 500 validation body, answer ``content: null``, drop connections, stream
without usage. Counters come over HTTP::

    GET  /_provider/stats[?log=0]  requests, 429s, peak and current in-flight, connections
                                   the client closed early, and a per-request log
    POST /_provider/config         change settings (JSON object of ProviderSettings fields)
    POST /_provider/reset          zero the counters, the log and the rate windows

Run on its own::

    python -m bench.provider --port 8000 --latency 2.0 --jitter 0.1 --requests 100 --window 60

or from a test, in a thread (:class:`Provider`) or a subprocess (:class:`ProviderProcess`,
which keeps thousands of slow requests off the test's GIL); both stop cleanly::

    with ProviderProcess(latency_s=1.0) as provider:
        ...  # point an agent at provider.base_url
        assert provider.stats()["peak_in_flight"] == 64

aiohttp serves it: one event loop holds thousands of open slow requests, and its handler
cancellation tells a client that hung up from one that waited for its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from bench.provider_answers import completion, schema_in_prompt, tool_call_answer
from bench.provider_stream import stream_answer

__all__ = ["Provider", "ProviderProcess", "ProviderSettings", "make_app"]

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """How the provider behaves; every field can be changed while it runs."""

    latency_s: float = 0.05
    """Seconds before each answer."""
    jitter_s: float = 0.0
    """Each latency is drawn uniformly from ``latency_s ± jitter_s`` (never below 0)."""
    completion_tokens: int = 16
    """Completion tokens per answer (capped by the request's ``max_tokens``)."""
    requests_per_window: int | None = None
    """At most this many requests admitted per sliding window; more get 429."""
    tokens_per_window: int | None = None
    """At most this many tokens (prompt + completion) admitted per sliding window."""
    window_s: float = 60.0
    """The sliding window of both limits."""
    max_concurrent: int | None = None
    """At most this many requests in flight; more get 429."""
    tool_rounds: int = 1
    """With tools offered: answer with a tool call until the conversation has this many
    tool results, then with text."""
    reject_json_schema: bool = False
    """Quirk: a request with ``response_format: json_schema`` gets a 500 validation body."""
    null_content: bool = False
    """Quirk: answer ``content: null`` (no tool calls either)."""
    drop_every: int = 0
    """Quirk: every Nth request's connection is closed after the latency, unanswered."""
    drop_next: int = 0
    """Quirk: the next N requests' connections are closed after the latency, unanswered."""
    token_interval_s: float = 0.0
    """A streamed answer (``"stream": true``) sends one completion token per chunk, this
    far apart; ``latency_s`` is then the time to the first one."""
    reject_stream: bool = False
    """Quirk: a request with ``"stream": true`` gets a 400 validation error naming it."""
    stream_usage: bool = True
    """A streamed answer ends with a ``usage`` chunk when the request asks for it
    (``stream_options.include_usage``); ``False`` is the quirk of servers that never do."""
    seed: int = 0
    """Seed of the jitter."""


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class _State:
    """Counters, the request log and the sliding windows (touched only on the server loop)."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.random = random.Random(settings.seed)
        self.reset()

    def reset(self) -> None:
        self.requests = self.ok = self.rate_limited = self.errors = 0
        self.dropped = self.client_closed = self.in_flight = self.peak_in_flight = 0
        self.tokens = 0
        self.last_request_at: float | None = None
        self.log: list[dict[str, Any]] = []
        self.window: deque[tuple[float, int]] = deque()

    def snapshot(self, *, with_log: bool) -> dict[str, Any]:
        stats = {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "errors": self.errors,
            "dropped": self.dropped,
            "client_closed": self.client_closed,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "tokens": self.tokens,
            "last_request_at": self.last_request_at,
            "settings": dataclasses.asdict(self.settings),
        }
        if with_log:
            stats["log"] = self.log
        return stats

    def refusal(self, now: float, cost: int) -> tuple[str, float] | None:
        """``(reason, retry_after_s)`` if the limits refuse a request of ``cost`` tokens now."""
        s = self.settings
        while self.window and self.window[0][0] <= now - s.window_s:
            self.window.popleft()
        if s.max_concurrent is not None and self.in_flight >= s.max_concurrent:
            return "concurrent requests", 1.0
        if s.requests_per_window is not None and len(self.window) >= s.requests_per_window:
            oldest = self.window[len(self.window) - s.requests_per_window][0]
            return "requests", oldest + s.window_s - now
        if s.tokens_per_window is not None:
            used = sum(tokens for _, tokens in self.window)
            if used + cost > s.tokens_per_window:
                if cost > s.tokens_per_window:
                    return "tokens (request larger than the limit)", s.window_s
                for at, tokens in self.window:
                    used -= tokens
                    if used + cost <= s.tokens_per_window:
                        return "tokens", at + s.window_s - now
        return None


STATE = web.AppKey("state", _State)


def _error(status: int, message: str, kind: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _validation_error(body: dict[str, Any]) -> web.Response:
    """What some servers send for a ``json_schema`` response format they cannot handle."""
    message = (
        "1 validation error for ChatCompletionRequest\nresponse_format.json_schema\n"
        "  Extra inputs are not permitted [type=extra_forbidden]"
    )
    return web.json_response(
        {"object": "error", "message": message, "type": "BadRequestError", "code": 500},
        status=500,
    )


async def _chat(request: web.Request) -> web.StreamResponse:
    state: _State = request.app[STATE]
    s = state.settings
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "request body is not JSON", "invalid_request_error")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "expected a JSON object with `messages`", "invalid_request_error")
    now, mono = time.time(), time.monotonic()
    state.requests += 1
    state.last_request_at = now
    number = state.requests
    prompt_tokens = _tokens(json.dumps(body["messages"])) + _tokens(json.dumps(body.get("tools")))
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    completion_tokens = s.completion_tokens if not cap else max(1, min(s.completion_tokens, cap))
    cost = prompt_tokens + completion_tokens
    entry: dict[str, Any] = {"n": number, "at": now, "mono": mono, "model": body.get("model")}
    state.log.append(entry)
    refused = state.refusal(mono, cost)
    if refused is not None:
        reason, wait = refused
        state.rate_limited += 1
        entry.update(status=429, admitted=False, in_flight=state.in_flight)
        wait = max(wait, 0.001)
        return _error(
            429,
            f"Rate limit reached for {reason}; try again in {wait:.3f}s",
            "rate_limit_exceeded",
            **{"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))},
        )
    state.window.append((mono, cost))
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    entry.update(admitted=True, in_flight=state.in_flight, prompt_tokens=prompt_tokens)
    entry.update(completion_tokens=completion_tokens, total_tokens=cost, status=None)
    drop = s.drop_next > 0 or (s.drop_every > 0 and number % s.drop_every == 0)
    if s.drop_next > 0:
        state.settings = dataclasses.replace(s, drop_next=s.drop_next - 1)
    dropping = False
    try:
        await asyncio.sleep(max(0.0, s.latency_s + state.random.uniform(-s.jitter_s, s.jitter_s)))
        if drop:
            dropping = True
            state.dropped += 1
            entry["status"] = "dropped"
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        response = _answer(state, body, number, prompt_tokens, completion_tokens)
        if body.get("stream") is True and response.status == 200:
            return await stream_answer(request, state.settings, entry, body, response)
        entry["status"] = response.status
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        if not dropping:  # the client hung up while we were working on its answer
            state.client_closed += 1
            entry.update(status="client_closed")
        raise
    finally:
        state.in_flight -= 1
        entry["done_at"] = time.time()


def _answer(
    state: _State, body: dict[str, Any], number: int, prompt_tokens: int, completion_tokens: int
) -> web.Response:
    s = state.settings
    response_format = body.get("response_format") or {}
    if s.reject_json_schema and response_format.get("type") == "json_schema":
        state.errors += 1
        return _validation_error(body)
    if s.reject_stream and body.get("stream") is not None:
        state.errors += 1
        return _error(400, "Unsupported parameter: 'stream'", "invalid_request_error")
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    state.ok += 1
    state.tokens += prompt_tokens + completion_tokens
    if s.null_content:
        message: dict[str, Any] = {"role": "assistant", "content": None}
    elif (call := tool_call_answer(body, number, s.tool_rounds)) is not None:
        message = call
    else:
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None and response_format.get("type") != "json_object":
            schema = schema_in_prompt(body["messages"])
        message = {"role": "assistant", "content": completion(number, schema, response_format)}
    return web.json_response(
        {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "bench",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                }
            ],
            "usage": usage,
        }
    )


async def _stats(request: web.Request) -> web.Response:
    state: _State = request.app[STATE]
    return web.json_response(state.snapshot(with_log=request.query.get("log", "1") != "0"))


async def _config(request: web.Request) -> web.Response:
    state: _State = request.app[STATE]
    changes = await request.json()
    fields = {f.name for f in dataclasses.fields(ProviderSettings)}
    unknown = sorted(set(changes) - fields) if isinstance(changes, dict) else ["(not an object)"]
    if unknown:
        return _error(400, f"unknown settings {unknown!r}; known: {sorted(fields)!r}", "config")
    state.settings = dataclasses.replace(state.settings, **changes)
    if "seed" in changes:
        state.random = random.Random(state.settings.seed)
    return web.json_response(dataclasses.asdict(state.settings))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})


def make_app(settings: ProviderSettings | None = None) -> web.Application:
    """The aiohttp application (serve it with ``handler_cancellation=True``)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = _State(settings or ProviderSettings())
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_provider/stats", _stats)
    app.router.add_post("/_provider/config", _config)
    app.router.add_post("/_provider/reset", _reset)
    return app


async def _serve(settings: ProviderSettings, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        make_app(settings), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, server.sockets[0].getsockname()[1]


class _Control:
    """Reading counters and changing settings over HTTP (both ways of running share it)."""

    root: str

    @property
    def base_url(self) -> str:
        """What an agent's ``base_url`` should be (``http://127.0.0.1:PORT/v1``)."""
        return f"{self.root}/v1"

    def stats(self, *, log: bool = True) -> dict[str, Any]:
        """The counters (and, unless ``log=False``, the per-request log)."""
        reply = httpx.get(f"{self.root}/_provider/stats", params={"log": int(log)}, timeout=30)
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change settings (fields of :class:`ProviderSettings`); returns them all."""
        reply = httpx.post(f"{self.root}/_provider/config", json=changes, timeout=30)
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    def reset(self) -> None:
        """Zero the counters, the log and the rate windows."""
        httpx.post(f"{self.root}/_provider/reset", timeout=30).raise_for_status()


class Provider(_Control):
    """The provider on its own event loop in a thread of this process."""

    def __init__(self, **settings: Any) -> None:
        self.settings = ProviderSettings(**settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-provider")
        self._runner: web.AppRunner | None = None

    def start(self) -> Provider:
        """Listen on a free loopback port."""
        self._thread.start()
        serving = asyncio.run_coroutine_threadsafe(
            _serve(self.settings, "127.0.0.1", 0), self._loop
        )
        self._runner, port = serving.result(timeout=30)
        self.root = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        """Close the socket and every open request, then end the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> Provider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProviderProcess(_Control):
    """The provider in a subprocess of its own (``python -m bench.provider``), stopped by PID."""

    def __init__(self, **settings: Any) -> None:
        self.settings = ProviderSettings(**settings)
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> ProviderProcess:
        """Start it on a free loopback port; return once it listens."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        args = [sys.executable, "-m", "bench.provider", "--port", "0", "--settings-json"]
        args.append(json.dumps(dataclasses.asdict(self.settings)))
        self.process = subprocess.Popen(
            args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"bench.provider did not start: {line!r}")
        self.root = line.split()[-1]
        return self

    @property
    def pid(self) -> int:
        """The subprocess's PID."""
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM the subprocess (by PID), then SIGKILL if it lingers."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> ProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse(argv: list[str] | None) -> tuple[ProviderSettings, str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.provider", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="latency ± this, uniformly")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, help="requests admitted per window")
    parser.add_argument("--tokens", type=int, help="tokens admitted per window")
    parser.add_argument("--window", type=float, default=60.0, help="sliding window, seconds")
    parser.add_argument("--max-concurrent", type=int, help="requests in flight at most")
    parser.add_argument("--tool-rounds", type=int, default=1)
    parser.add_argument("--reject-json-schema", action="store_true", help="quirk: 500 on it")
    parser.add_argument("--null-content", action="store_true", help="quirk: content null")
    parser.add_argument("--drop-every", type=int, default=0, help="quirk: drop every Nth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings-json", help="all settings as JSON (overrides the rest)")
    a = parser.parse_args(argv)
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        parser.error(f"--host {a.host!r}: the provider listens on loopback only")
    if a.settings_json:
        settings = ProviderSettings(**json.loads(a.settings_json))
    else:
        settings = ProviderSettings(
            latency_s=a.latency,
            jitter_s=a.jitter,
            completion_tokens=a.completion_tokens,
            requests_per_window=a.requests,
            tokens_per_window=a.tokens,
            window_s=a.window,
            max_concurrent=a.max_concurrent,
            tool_rounds=a.tool_rounds,
            reject_json_schema=a.reject_json_schema,
            null_content=a.null_content,
            drop_every=a.drop_every,
            seed=a.seed,
        )
    return settings, a.host, a.port


async def _main(settings: ProviderSettings, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner, bound = await _serve(settings, host, port)
    print(f"listening on http://{host}:{bound}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the provider until SIGTERM or Ctrl-C."""
    settings, host, port = _parse(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of open requests
    asyncio.run(_main(settings, host, port))


if __name__ == "__main__":
    main()
