"""`[limits.NAME]` tables in the agents file, agents' `limit = "NAME"`, `fleet limits show`."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.agents import load_agents
from fleet.agents.registry import load_limits
from fleet.cli import app
from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.limiters import ProviderLimit, RedisRateLimiter
from fleet.runstatus import _limit_lines

GOOD = """
[limits.gpt-main]
requests = 500
tokens = 200000
window_s = 10
max_concurrent = 64

[limits.small]
requests = 5
tokens = 1000

[agents.writer]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
limit = "gpt-main"

[agents.critic]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
limit = "gpt-main"

[agents.tool]
target = "tests.agents:noop"
limit = "small"

[agents.free]
target = "tests.agents:noop"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_agents_share_a_declared_limit(tmp_path: Path) -> None:
    """Several agents name one limit; each definition carries it; window_s defaults to 60."""
    agents = load_agents(_write(tmp_path, GOOD))
    main = ProviderLimit("gpt-main", 500, 200000, 10.0, 64)
    assert agents["writer"].limit == main and agents["critic"].limit == main
    assert agents["tool"].limit == ProviderLimit("small", 5, 1000, 60.0, None)
    assert agents["free"].limit is None
    assert set(load_limits(tmp_path / "agents.toml")) == {"gpt-main", "small"}


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ("requests = 0\ntokens = 10", "limits.bad.requests", "positive integer, got 0"),
        ("requests = 5\ntokens = -1", "limits.bad.tokens", "positive integer, got -1"),
        ("requests = 5\ntokens = 10\nwindow_s = 0", "limits.bad.window_s", "got 0"),
        ("requests = 5\ntokens = 10\nmax_concurrent = 0", "limits.bad.max_concurrent", "got 0"),
        ("requests = true\ntokens = 10", "limits.bad.requests", "got True"),
        ("requests = 2.5\ntokens = 10", "limits.bad.requests", "got 2.5"),
        ("window_s = 5", "limits.bad", "needs 'requests' or 'tokens'"),
        ("requests = 5\ntokens = 10\nrpm = 3", "limits.bad.rpm", "unknown key 'rpm'"),
    ],
)
def test_bad_limit_table(tmp_path: Path, table: str, key: str, words: str) -> None:
    """A non-positive, missing or unknown field fails at load naming the table and the key."""
    path = _write(tmp_path, f"[limits.bad]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_agents(path)
    assert caught.value.key == key
    assert "[limits.bad]" in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(
    ("table", "requests", "tokens"),
    [("requests = 5", 5, None), ("tokens = 900", None, 900), ("requests = 5\ntokens = 9", 5, 9)],
)
def test_either_requests_or_tokens_is_enough(
    tmp_path: Path, table: str, requests: int | None, tokens: int | None
) -> None:
    """A [limits.NAME] table with only requests, or only tokens, loads: the other is no cap."""
    path = _write(tmp_path, f"[limits.one]\n{table}\n")
    assert load_limits(path)["one"] == ProviderLimit("one", requests, tokens, 60.0, None)


def test_unknown_limit_name(tmp_path: Path) -> None:
    """An agent naming an undeclared limit fails at load, listing the declared ones."""
    path = _write(
        tmp_path,
        '[limits.real]\nrequests = 1\ntokens = 1\n[agents.a]\ntarget = "tests.agents:noop"\n'
        'limit = "typo"\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_agents(path)
    assert caught.value.key == "agents.a.limit"
    assert "'typo'" in str(caught.value) and "'real'" in str(caught.value)


def test_fleet_limits_show(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """`fleet limits show` prints each limit's window use, in-flight calls and provider pause."""
    path = _write(tmp_path, GOOD)
    limiter = RedisRateLimiter(redis_url, key_prefix=key_prefix)
    main = load_limits(path)["gpt-main"]

    async def use() -> None:
        for tokens in (700, 300):
            await limiter.try_admit(main, uuid.uuid4().hex, tokens, lease_s=30)
        await limiter.pause(main, 30)
        await limiter.close()

    asyncio.run(use())
    env = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": key_prefix}
    env["FLEET_AGENTS_FILE"] = str(path)
    runner = CliRunner()
    shown = runner.invoke(app, ["limits", "show"], env=env, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    main_row = next(line for line in shown.output.splitlines() if "gpt-main" in line)
    for cell in ("10 s", "2 / 500", "1000 / 200000", "2 / 64", "s left"):
        assert cell in main_row
    small_row = next(line for line in shown.output.splitlines() if "small" in line)
    assert "0 / 5" in small_row and "none" in small_row
    one = runner.invoke(app, ["limits", "show", "small"], env=env, terminal_width=200)
    assert one.exit_code == 0 and "gpt-main" not in one.output
    unknown = runner.invoke(app, ["limits", "show", "nope"], env=env)
    assert unknown.exit_code != 0 and "'nope'" in str(unknown.exception)


def test_fleet_status_lists_each_limit_with_its_use(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """`fleet status` of a fleet run shows every declared limit's current use."""
    path = _write(tmp_path, GOOD)
    config = FleetSettings(redis_url=redis_url, key_prefix=key_prefix, agents_file=path)
    main = load_limits(path)["gpt-main"]

    async def read() -> list[str]:
        limiter = RedisRateLimiter(redis_url, key_prefix=key_prefix)
        await limiter.try_admit(main, uuid.uuid4().hex, 700, lease_s=30)
        await limiter.close()
        return await _limit_lines(config, redis_url)

    lines = asyncio.run(read())
    assert lines[0].startswith("gpt-main: 1/500 requests, 700/200000 tokens in the last 10 s")
    assert lines[1].startswith("small: 0/5 requests")
