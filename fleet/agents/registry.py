"""Agents by name: the built-ins, python agents by dotted path, and the agents file.

A host runs only what its registry holds, so a message can never name arbitrary
code: ``AgentStepSpec.agent`` is a key, not an import path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownAgentError
from ..limiters.base import ProviderLimit, parse_limits
from ..pricing import ModelPrice, UnknownPrice, parse_prices
from .base import AgentDefinition, AgentFunction
from .echo import ECHO
from .tables import read_agents_file, with_line
from .targets import import_target, resolve_target

logger = logging.getLogger("fleet.agents")

__all__ = [
    "AgentLike",
    "AgentRegistry",
    "import_target",
    "load_agents",
    "load_limits",
    "read_agents_file",
    "resolve_target",
]

AgentLike = AgentFunction | str | AgentDefinition
"""What ``LocalExecutor(agents=...)`` accepts per name: a coroutine function, a dotted
path ``"package.module:function"``, or a full :class:`AgentDefinition`."""

BUILTINS: dict[str, AgentDefinition] = {ECHO.name: ECHO}


def _definition(name: str, agent: AgentLike) -> AgentDefinition:
    if isinstance(agent, AgentDefinition):
        return agent if agent.name == name else dataclasses.replace(agent, name=name)
    if isinstance(agent, str):
        agent = resolve_target(agent)
    as_definition = getattr(agent, "definition", None)
    if callable(as_definition):
        # Agent objects that know their own default reservation (e.g. OpenAIAgent).
        found = as_definition(name)
        if isinstance(found, AgentDefinition):
            return found
    if not _is_async(agent):
        raise ConfigError(
            f"agent {name!r} must be an async function "
            "`async def agent(spec, ctx) -> AgentResult | str` (a plain function runs "
            "when its agents-file table says blocking = true)",
            key=name,
        )
    return AgentDefinition(name=name, run=agent)


def _is_async(agent: object) -> bool:
    return inspect.iscoroutinefunction(agent) or inspect.iscoroutinefunction(
        getattr(agent, "__call__", None)  # noqa: B004 - async callable objects count too
    )


class AgentRegistry(Mapping[str, AgentDefinition]):
    """An immutable name → :class:`AgentDefinition` mapping, built-ins included."""

    def __init__(self, agents: Mapping[str, AgentLike] | None = None, *, builtins: bool = True):
        found: dict[str, AgentDefinition] = dict(BUILTINS) if builtins else {}
        for name, agent in (agents or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"agent names must be non-empty strings, got {name!r}")
            found[name] = _definition(name, agent)
        self._agents = found

    def __getitem__(self, name: str) -> AgentDefinition:
        return self._agents[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)

    def __len__(self) -> int:
        return len(self._agents)

    def resolve(self, name: str) -> AgentDefinition:
        """The agent registered as ``name``.

        Raises:
            UnknownAgentError: nothing is registered under that name (lists what is).
        """
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgentError(name, list(self._agents)) from None


_PYTHON_KEYS = ("kind", "target", "reserve_tokens", "blocking")
"""The keys a ``kind = "python"`` table may have (``limit`` is read before it)."""


def _python_agent(
    name: str, table: Mapping[str, Any], source: str, money: _FileMoney
) -> AgentDefinition:
    for key in table:
        if key not in _PYTHON_KEYS:
            close = difflib.get_close_matches(key, _PYTHON_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{source}: [agents.{name}] has unknown key {key!r}; {hint}a 'python' agent "
                "takes " + ", ".join(_PYTHON_KEYS[1:]) + " and limit",
                key=f"agents.{name}.{key}" if key else f"agents.{name}",
            )
    target = table.get("target")
    if not isinstance(target, str):
        raise ConfigError(
            f"{source}: [agents.{name}] of kind 'python' needs target = 'package.module:function'",
            key=f"agents.{name}.target",
        )
    reserve = table.get("reserve_tokens")
    if reserve is not None and (type(reserve) is not int or reserve < 0):  # not a bool
        raise ConfigError(
            f"{source}: [agents.{name}] reserve_tokens must be a non-negative integer, "
            f"got {reserve!r}",
            key=f"agents.{name}.reserve_tokens",
        )
    blocking = table.get("blocking", False)
    if type(blocking) is not bool:
        raise ConfigError(
            f"{source}: [agents.{name}] blocking must be true or false, got {blocking!r}",
            key=f"agents.{name}.blocking",
        )
    try:
        run = _blocking_run(name, target) if blocking else _definition(name, target).run
    except ConfigError as problem:  # name the file and the table, not just the target
        raise ConfigError(
            f"{source}: [agents.{name}] {problem}", key=f"agents.{name}.target"
        ) from None
    return AgentDefinition(
        name=name, run=run, reserve_tokens=reserve, kind="python", blocking=blocking
    )


def _blocking_run(name: str, target: str) -> AgentFunction:
    """A blocking agent's run: an async one as it is, a plain function in a thread."""
    agent = resolve_target(target)
    if _is_async(agent):
        return agent

    @functools.wraps(agent)
    async def in_thread(spec: Any, ctx: Any) -> Any:
        return await asyncio.to_thread(agent, spec, ctx)

    return in_thread


def _openai_agent(
    name: str, table: Mapping[str, Any], source: str, money: _FileMoney
) -> AgentDefinition:
    from .openai import definition_from_config

    return definition_from_config(
        name, table, source=source, prices=money.prices, unknown_price=money.unknown_price
    )


def _pydantic_ai_agent(
    name: str, table: Mapping[str, Any], source: str, money: _FileMoney
) -> AgentDefinition:
    try:
        from .pydantic_ai import definition_from_config
    except ImportError as missing:  # the optional extra is not installed
        raise ConfigError(
            f"{source}: [agents.{name}] has kind 'pydantic_ai', which needs the pydantic-ai "
            f"extra ({missing}); install it with: pip install 'fleet[pydantic-ai]' "
            "(in a clone of fleet: pip install '.[pydantic-ai]')",
            key=f"agents.{name}.kind",
        ) from None
    return definition_from_config(
        name, table, source=source, prices=money.prices, unknown_price=money.unknown_price
    )


@dataclass(frozen=True)
class _FileMoney:
    """An agents file's ``[prices."MODEL"]`` tables and top-level ``unknown_price``."""

    prices: dict[str, ModelPrice]
    unknown_price: UnknownPrice


def _file_money(path: str | Path) -> _FileMoney:
    source, prices = read_agents_file(path, "prices")
    unknown = read_agents_file(path, None)[1].get("unknown_price", "refuse")
    if unknown not in ("refuse", "allow"):
        raise ConfigError(
            f"{source}: unknown_price must be 'refuse' or 'allow', got {unknown!r}",
            key="unknown_price",
        )
    return _FileMoney(parse_prices(prices, source), unknown)


_KINDS: dict[str, Callable[[str, Mapping[str, Any], str, _FileMoney], AgentDefinition]] = {
    "python": _python_agent,
    "openai": _openai_agent,
    "pydantic_ai": _pydantic_ai_agent,
}


def load_limits(path: str | Path) -> dict[str, ProviderLimit]:
    """Read the ``[limits.NAME]`` tables (provider limits) of an agents file.

    Raises:
        ConfigError: the file is missing or unreadable, or a limit is invalid (the
            message names the table and the key).
    """
    with with_line(path):
        source, tables = read_agents_file(path, "limits")
        return parse_limits(tables, source=source)


def _agent_limit(
    name: str, table: dict[str, Any], limits: Mapping[str, ProviderLimit], source: str
) -> ProviderLimit | None:
    """The provider limit an ``[agents.NAME]`` table names with ``limit = "NAME"``."""
    if "limit" not in table:
        return None
    wanted = table.pop("limit")
    if isinstance(wanted, str) and wanted in limits:
        return limits[wanted]
    known = ", ".join(repr(k) for k in sorted(limits)) or "none"
    raise ConfigError(
        f"{source}: [agents.{name}] limit = {wanted!r} names no [limits.NAME] table "
        f"(declared limits: {known}); declare it or fix the name",
        key=f"agents.{name}.limit",
    )


def load_agents(path: str | Path) -> dict[str, AgentDefinition]:
    """Read an agents file (TOML, ``[agents.NAME]`` tables) into a name → definition map.

    An agent's ``limit = "NAME"`` attaches the file's ``[limits.NAME]`` provider limit
    to its definition; the file's ``[prices."MODEL"]`` tables and top-level
    ``unknown_price`` go to its model agents. The result is what
    ``LocalExecutor(agents=...)`` takes.

    Raises:
        ConfigError: the file is missing or unreadable, or a table is invalid (the
            message names the file and the key).
    """
    with with_line(path):
        return _load_agents(path)


def _load_agents(path: str | Path) -> dict[str, AgentDefinition]:
    limits = load_limits(path)
    source, tables = read_agents_file(path, "agents")
    money = _file_money(path)
    agents: dict[str, AgentDefinition] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: agents.{name} must be a table", key=f"agents.{name}")
        table = dict(table)
        limit = _agent_limit(name, table, limits, source)
        kind = table.get("kind", "python")
        builder = _KINDS.get(kind) if isinstance(kind, str) else None
        if builder is None:
            raise ConfigError(
                f"{source}: [agents.{name}] has kind {kind!r}; expected one of "
                + ", ".join(repr(k) for k in _KINDS),
                key=f"agents.{name}.kind",
            )
        if kind == "openai":
            table = _one_concurrency_cap(name, table, limit, source)
        definition = builder(name, table, source, money)
        agents[name] = dataclasses.replace(definition, limit=limit) if limit else definition
    return agents


def _one_concurrency_cap(
    name: str, table: dict[str, Any], limit: ProviderLimit | None, source: str
) -> dict[str, Any]:
    """The agent's calls in flight are capped by its limit's ``max_concurrent``, one cap.

    ``max_concurrent`` on the agent's own table is the older spelling: still read (the
    smaller of the two wins), with a warning saying where it belongs now.
    """
    own = table.get("max_concurrent")
    if own is not None:
        logger.warning(
            "%s: [agents.%s] max_concurrent is deprecated: declare it as max_concurrent in "
            "a [limits.NAME] table (the one concurrency cap, fleet-wide) and name that table "
            'with limit = "NAME"; until then it still caps this agent\'s calls per process',
            source,
            name,
        )
    if limit is None or limit.max_concurrent is None:
        return table
    if isinstance(own, int) and not isinstance(own, bool):
        return {**table, "max_concurrent": min(own, limit.max_concurrent)}
    return {**table, "max_concurrent": limit.max_concurrent}
