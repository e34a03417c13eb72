"""bench.provider: the loopback OpenAI-compatible server the benchmarks and tests share."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import jsonschema
import pytest

from bench.provider import Provider, ProviderProcess
from bench.provider_answers import example

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def provider() -> Iterator[Provider]:
    with Provider(latency_s=0.0) as server:
        yield server


def chat(provider: Provider, body: dict[str, object] | None = None, **kw: object) -> httpx.Response:
    return httpx.post(f"{provider.base_url}/chat/completions", json=body or BODY, timeout=10, **kw)  # type: ignore[arg-type]


def test_answers_carry_usage_capped_by_max_tokens(provider: Provider) -> None:
    """Every answer has usage; completion tokens never exceed the request's max_tokens."""
    provider.configure(completion_tokens=50)
    data = chat(provider, {**BODY, "max_tokens": 7}).json()
    usage = data["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7 > 7
    assert data["choices"][0]["message"]["content"] == "answer 1"
    assert provider.stats()["log"][0]["total_tokens"] == usage["total_tokens"]


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 8},
        "score": {"type": "integer", "minimum": 3, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
        "kind": {"$ref": "#/$defs/kind"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    },
    "required": ["title", "score", "tags", "kind"],
    "additionalProperties": False,
    "$defs": {"kind": {"const": "k"}},
}


def test_json_schema_answers_satisfy_the_schema(provider: Provider) -> None:
    """response_format json_schema, or a schema quoted in the prompt, gets a fitting object."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    content = chat(provider, {**BODY, "response_format": fmt}).json()["choices"][0]["message"]
    jsonschema.validate(json.loads(content["content"]), SCHEMA)
    quoted = {
        "role": "user",
        "content": f"Answer as JSON matching:\n{json.dumps(SCHEMA, indent=2)}",
    }
    content = chat(provider, {"model": "m", "messages": [quoted]}).json()["choices"][0]["message"]
    jsonschema.validate(json.loads(content["content"]), SCHEMA)


def test_example_fits_simple_schemas() -> None:
    """The schema instance builder honours types, bounds, enums and nesting."""
    for schema in (
        SCHEMA,
        {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 3},
        {"type": ["null", "boolean"]},
        {
            "allOf": [
                {"properties": {"a": {"type": "integer"}}},
                {"properties": {"b": {"type": "string"}}},
            ]
        },
        {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
    ):
        jsonschema.validate(example(schema), schema)


def test_tool_calls_until_the_conversation_has_the_results(provider: Provider) -> None:
    """Offered tools are called (the chosen one, arguments fitting its schema), then text."""
    tools = [
        {"type": "function", "function": {"name": "first", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}},
    ]
    choice = {"type": "function", "function": {"name": "lookup"}}
    body = {**BODY, "tools": tools, "tool_choice": choice}
    answer = chat(provider, body).json()["choices"][0]
    assert answer["finish_reason"] == "tool_calls"
    call = answer["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    messages = [
        *BODY["messages"],
        answer["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "42"},
    ]  # type: ignore[list-item]
    final = chat(provider, {**body, "messages": messages}).json()["choices"][0]
    assert final["finish_reason"] == "stop" and final["message"]["content"] == "answer 2"


def test_request_window_answers_429_with_retry_after(provider: Provider) -> None:
    """Past the requests per sliding window: 429, Retry-After, nothing admitted."""
    provider.configure(requests_per_window=3, window_s=30.0)
    statuses = [chat(provider).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    refused = chat(provider)
    assert refused.headers["Retry-After"] == "30"
    assert 0 < int(refused.headers["retry-after-ms"]) <= 30_000
    stats = provider.stats()
    assert stats["rate_limited"] == 3 and stats["ok"] == 3
    assert [e["admitted"] for e in stats["log"]] == [True] * 3 + [False] * 3
    provider.reset()
    assert chat(provider).status_code == 200


def test_token_window_admits_only_what_fits(provider: Provider) -> None:
    """Tokens per window count prompt + completion at admission."""
    first = chat(provider).json()["usage"]["total_tokens"]
    provider.reset()
    provider.configure(tokens_per_window=first * 2, window_s=30.0)
    assert [chat(provider).status_code for _ in range(3)] == [200, 200, 429]
    provider.configure(tokens_per_window=first - 1)
    refused = chat(provider)
    assert (
        refused.status_code == 429 and "larger than the limit" in refused.json()["error"]["message"]
    )


def test_quirks_reject_schema_null_content_and_drop(provider: Provider) -> None:
    """The switchable quirks: 500 validation body, content null, dropped connection."""
    provider.configure(reject_json_schema=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    refused = chat(provider, {**BODY, "response_format": fmt})
    assert refused.status_code == 500 and "validation error" in refused.json()["message"]
    assert chat(provider).status_code == 200  # only json_schema requests are refused
    provider.configure(reject_json_schema=False, null_content=True)
    assert chat(provider).json()["choices"][0]["message"]["content"] is None
    provider.configure(null_content=False, drop_next=1)
    with pytest.raises(httpx.RemoteProtocolError):
        chat(provider)
    assert chat(provider).status_code == 200
    stats = provider.stats(log=False)
    assert (stats["dropped"], stats["errors"], stats["client_closed"]) == (1, 1, 0)


def test_unknown_setting_is_refused(provider: Provider) -> None:
    """POST /_provider/config names the unknown key."""
    with pytest.raises(httpx.HTTPStatusError):
        provider.configure(latncy_s=1.0)
    reply = httpx.post(f"{provider.root}/_provider/config", json={"latncy_s": 1})
    assert "latncy_s" in reply.json()["error"]["message"]


async def test_counts_peak_concurrency_and_clients_that_hang_up() -> None:
    """Peak and current in-flight, and a client that closes before its answer, are counted."""
    with ProviderProcess(latency_s=5.0) as provider:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            url = f"{provider.base_url}/chat/completions"
            calls = [asyncio.create_task(client.post(url, json=BODY)) for _ in range(40)]
            for _ in range(200):  # all 40 reach the server before the one that hangs up
                during = await asyncio.to_thread(provider.stats, log=False)
                if during["in_flight"] == 40:
                    break
                await asyncio.sleep(0.02)
            assert during["in_flight"] == 40
            # Only the wait for the answer is short: the request itself always reaches the server.
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, json=BODY, timeout=httpx.Timeout(30, read=0.3))
            answers = await asyncio.gather(*calls)
        assert {a.status_code for a in answers} == {200}
        for _ in range(100):
            stats = await asyncio.to_thread(provider.stats)
            if stats["client_closed"]:
                break
            await asyncio.sleep(0.05)
        assert stats["peak_in_flight"] == 41
        assert stats["client_closed"] == 1 and stats["in_flight"] == 0
        closed = [e for e in stats["log"] if e["status"] == "client_closed"]
        assert len(closed) == 1 and closed[0]["done_at"] - closed[0]["at"] < 5.0
    assert provider.process is None
