"""``fleet limits show [NAME]`` and ``fleet limits reset NAME``: provider limits' use."""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table

from ..agents.registry import load_limits
from ..errors import ConfigError
from ..limiters import LimitState, ProviderLimit, RedisRateLimiter
from .app import app, console, settings

__all__ = ["limits_app"]

limits_app = typer.Typer(
    help="Inspect provider limits ([limits.NAME] in the agents file; use kept in Redis).",
    no_args_is_help=True,
)
app.add_typer(limits_app, name="limits")

_REDIS_URL = typer.Option(None, "--redis-url", help="Redis holding the windows (FLEET_REDIS_URL).")
_KEY_PREFIX = typer.Option(None, "--key-prefix", help="Key prefix (FLEET_KEY_PREFIX).")


def _row(limit: ProviderLimit, state: LimitState) -> list[str]:
    flight = str(state.in_flight)
    if limit.max_concurrent is not None:
        flight += f" / {limit.max_concurrent}"
    return [
        limit.name,
        f"{limit.window_s:g} s",
        f"{state.requests} / {'no cap' if limit.requests is None else limit.requests}",
        f"{state.tokens} / {'no cap' if limit.tokens is None else limit.tokens}",
        flight,
        f"{state.paused_s:.1f} s left" if state.paused_s > 0 else "none",
    ]


def _selected(
    name: str | None, limits: dict[str, ProviderLimit], source: str
) -> dict[str, ProviderLimit]:
    if name is None:
        return limits
    if name not in limits:
        known = ", ".join(repr(k) for k in sorted(limits)) or "none"
        raise ConfigError(
            f"no limit {name!r} in {source!r} (declared: {known}); check the name or "
            "FLEET_AGENTS_FILE",
            key=name,
        )
    return {name: limits[name]}


@limits_app.command("reset")
def reset(
    name: str = typer.Argument(..., metavar="NAME", help="The limit to reset."),
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
) -> None:
    """Forget a limit's window, in-flight calls and provider pause (waiting calls go on)."""
    config = settings(redis_url=redis_url, key_prefix=key_prefix)
    limit = _selected(name, load_limits(config.agents_file), str(config.agents_file))[name]
    limiter = RedisRateLimiter(config.redis_url, key_prefix=config.key_prefix)

    async def run() -> None:
        try:
            await limiter.reset(limit)
        finally:
            await limiter.close()

    asyncio.run(run())
    console.print(f"limit {name!r} reset: its window is empty and no pause is on", highlight=False)


@limits_app.command("show")
def show(
    name: str | None = typer.Argument(None, metavar="[NAME]", help="One limit (default: all)."),
    redis_url: str | None = _REDIS_URL,
    key_prefix: str | None = _KEY_PREFIX,
) -> None:
    """Requests and tokens in each limit's current window, calls in flight, provider pause."""
    config = settings(redis_url=redis_url, key_prefix=key_prefix)
    limits = _selected(name, load_limits(config.agents_file), str(config.agents_file))
    if not limits:
        # Nothing declared is an answer, not an error: no provider limits apply.
        console.print(
            f"no provider limits: no [limits.NAME] tables in {str(config.agents_file)!r} "
            "(declare one there, or point FLEET_AGENTS_FILE at the file that has them)",
            highlight=False,
            markup=False,  # "[limits.NAME]" is text, not a Rich style
        )
        return
    limiter = RedisRateLimiter(config.redis_url, key_prefix=config.key_prefix)

    async def read() -> list[LimitState]:
        try:
            return [await limiter.state(limit) for limit in limits.values()]
        finally:
            await limiter.close()

    table = Table(title="provider limits", title_justify="left")
    for column in ("limit", "window", "requests", "tokens", "in flight", "provider pause"):
        table.add_column(column)
    for limit, state in zip(limits.values(), asyncio.run(read()), strict=True):
        table.add_row(*_row(limit, state))
    console.print(table)
