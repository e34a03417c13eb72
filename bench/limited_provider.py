"""A loopback OpenAI-compatible provider that enforces its own rate limits, like a real one.

``POST /v1/chat/completions`` answers after ``latency_s`` with a completion of
``completion_tokens`` (capped by the request's ``max_tokens``), unless the request would
overrun the provider's sliding window of ``window_s``: at most ``requests`` calls and
``tokens`` tokens (prompt + completion, as reported in ``usage``) counted at arrival.
An overrun answers 429 with ``Retry-After`` (whole seconds), ``retry-after-ms`` and
``x-ratelimit-reset-requests``, and counts nothing. ``GET /v1/log`` returns every
request as JSON (arrival time, status, tokens), so a test or benchmark can check that
no window ever held more than the limit.

In a test: ``with LimitedProvider(requests=20, tokens=5000, window_s=3) as p: ...``
(a background thread). For a benchmark, in its own process::

    python -m bench.limited_provider --requests 100 --tokens 20000 --window-s 10 --port 0
    # prints "listening on http://127.0.0.1:PORT/v1"
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LimitedProvider", "Logged", "window_peaks"]


@dataclass(frozen=True)
class Logged:
    """One request the provider received."""

    at: float
    """Arrival (``time.monotonic()`` of the provider's process)."""
    status: int
    """200, or 429 when it was refused."""
    tokens: int
    """Tokens it counted (0 when refused)."""


def window_peaks(log: list[Logged], window_s: float) -> tuple[int, int]:
    """The most requests and the most tokens any sliding window of ``window_s`` held."""
    served = sorted((e for e in log if e.status == 200), key=lambda e: e.at)
    peak_requests = peak_tokens = tokens = 0
    start = 0
    for end, entry in enumerate(served):
        tokens += entry.tokens
        while served[start].at <= entry.at - window_s:
            tokens -= served[start].tokens
            start += 1
        peak_requests = max(peak_requests, end - start + 1)
        peak_tokens = max(peak_tokens, tokens)
    return peak_requests, peak_tokens


class LimitedProvider:
    """The provider. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        requests: calls allowed per window.
        tokens: tokens allowed per window.
        window_s: the sliding window.
        latency_s: how long each served call takes.
        completion_tokens: completion length of every answer (capped by ``max_tokens``).
        port: where to listen (0: a free port).
    """

    def __init__(
        self,
        *,
        requests: int,
        tokens: int,
        window_s: float,
        latency_s: float = 0.0,
        completion_tokens: int = 20,
        port: int = 0,
    ) -> None:
        self.requests, self.tokens, self.window_s = requests, tokens, window_s
        self.latency_s = latency_s
        self.completion_tokens = completion_tokens
        self.port = port
        self.log: list[Logged] = []
        self.forced_429: deque[float] = deque()
        self._window: deque[tuple[float, int]] = deque()
        self._used = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LimitedProvider:
        """Listen on ``127.0.0.1``."""
        handler = type("LimitedHandler", (_Handler,), {"provider": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 512
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="limited-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LimitedProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The agents' ``base_url``."""
        assert self._server is not None, "start() the provider first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def wait_for_requests(self, count: int, timeout_s: float = 30.0) -> bool:
        """Block until ``count`` requests have arrived (``False`` on timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.log) >= count:
                    return True
            time.sleep(0.005)
        return False

    def refuse_next(self, retry_after_s: float) -> None:
        """Answer the next request 429 with ``Retry-After: retry_after_s``, whatever the window."""
        with self._lock:
            self.forced_429.append(retry_after_s)

    def admit(self, cost: int) -> float | None:
        """Count one arriving call of ``cost`` tokens; ``None``, or seconds until it could fit."""
        now = time.monotonic()
        with self._lock:
            if self.forced_429:
                self.log.append(Logged(now, 429, 0))
                return self.forced_429.popleft()
            while self._window and self._window[0][0] <= now - self.window_s:
                self._used -= self._window.popleft()[1]
            wait = 0.0
            if len(self._window) >= self.requests:
                wait = self._window[len(self._window) - self.requests][0] + self.window_s - now
            excess = self._used + cost - self.tokens
            for at, counted in self._window if excess > 0 else ():
                excess -= counted
                if excess <= 0:
                    wait = max(wait, at + self.window_s - now)
                    break
            if wait > 0 or excess > 0:
                self.log.append(Logged(now, 429, 0))
                return max(wait, 0.001)
            self._window.append((now, cost))
            self._used += cost
            self.log.append(Logged(now, 200, cost))
            return None


class _Handler(BaseHTTPRequestHandler):
    provider: LimitedProvider
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Quiet: the provider keeps its own log."""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        """``/v1/log``: every request so far."""
        provider = self.provider
        with provider._lock:
            log = [asdict(entry) for entry in provider.log]
        self._send(200, {"window_s": provider.window_s, "log": log})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        """A chat completion, or a 429 when the window is full."""
        provider = self.provider
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        prompt = (len(json.dumps(body.get("messages", []))) + 3) // 4
        completion = min(provider.completion_tokens, body.get("max_tokens") or 10**9)
        wait = provider.admit(prompt + completion)
        if wait is not None:
            self._send(
                429,
                {"error": {"message": "rate limit reached", "type": "rate_limit"}},
                {
                    "Retry-After": str(math.ceil(wait)),
                    "retry-after-ms": str(round(wait * 1000)),
                    "x-ratelimit-reset-requests": f"{wait:.3f}s",
                },
            )
            return
        time.sleep(provider.latency_s)
        self._send(
            200,
            {
                "id": "cmpl",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x" * completion},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )


def main() -> None:
    """Run the provider in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--window-s", type=float, required=True)
    parser.add_argument("--latency-s", type=float, default=1.0)
    parser.add_argument("--completion-tokens", type=int, default=20)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    provider = LimitedProvider(
        requests=args.requests,
        tokens=args.tokens,
        window_s=args.window_s,
        latency_s=args.latency_s,
        completion_tokens=args.completion_tokens,
        port=args.port,
    ).start()
    print(f"listening on {provider.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        provider.stop()


if __name__ == "__main__":
    main()
