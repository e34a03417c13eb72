"""How :mod:`bench.provider` streams an answer: server-sent events, as OpenAI's API does.

A chunk with the role, one chunk per completion token (``token_interval_s`` apart), tool
calls in two chunks each (arguments split), a chunk with the finish reason, a last chunk
with ``usage`` when the request asked for it (``stream_options.include_usage``) and the
provider does not play a server that never sends it, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

__all__ = ["stream_answer"]


def _pieces(text: str, count: int) -> list[str]:
    """``text`` cut into ``count`` pieces (about one completion token each)."""
    count = max(1, min(count, len(text)))
    size = len(text) / count
    return [text[round(i * size) : round((i + 1) * size)] for i in range(count)]


async def stream_answer(
    request: web.Request,
    s: Any,
    entry: dict[str, Any],
    body: dict[str, Any],
    answer: web.Response,
) -> web.StreamResponse:
    """Send ``answer`` as server-sent events: a chunk per token, then usage, then ``[DONE]``.

    ``s`` is the provider's settings (``token_interval_s``, ``stream_usage``).

    The log entry gets ``first_token_at`` (``time.time()`` as the first text chunk is
    written) and ``stream_done_at``.
    """
    assert answer.text is not None
    data = json.loads(answer.text)
    choice = data["choices"][0]
    message, usage = choice["message"], data["usage"]
    head = {k: data[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(event: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    # A text chunk is the same JSON but for its text: render it once, so the provider's
    # own CPU (thousands of chunks a second in a benchmark) stays small.
    text_chunk = json.dumps(chunk({"content": "\x00"})).encode().split(b'"\\u0000"')

    await send(chunk({"role": "assistant", "content": ""}))
    content = message.get("content")
    if isinstance(content, str) and content:
        if content == f"answer {entry['n']}":  # plain text: one word per completion token
            words = usage["completion_tokens"] - 1
            content += "".join(f" w{i}" for i in range(1, words + 1))
        started = time.monotonic()
        for index, piece in enumerate(_pieces(content, usage["completion_tokens"])):
            if index and s.token_interval_s > 0:  # paced from the start: no drift adds up
                await asyncio.sleep(max(started + index * s.token_interval_s - time.monotonic(), 0))
            await response.write(
                b"data: " + text_chunk[0] + json.dumps(piece).encode() + text_chunk[1] + b"\n\n"
            )
            if index == 0:
                entry["first_token_at"] = time.time()
    for index, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        function = {"name": call["function"]["name"], "arguments": arguments[:half]}
        await send(
            chunk(
                {
                    "tool_calls": [
                        {"index": index, "id": call["id"], "type": "function", "function": function}
                    ]
                }
            )
        )
        await send(
            chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]})
        )
    await send(chunk({}, choice["finish_reason"]))
    if s.stream_usage and (body.get("stream_options") or {}).get("include_usage"):
        await send(head | {"choices": [], "usage": usage})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    entry.update(status=200, stream_done_at=time.time())
    return response
