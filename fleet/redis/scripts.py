"""Every Lua script fleet runs, loaded one way.

Each script is a file ``fleet/redis/lua/NAME.lua`` that opens with a comment naming
its ``KEYS`` and ``ARGV``. A line ``--!include OTHER.lua`` is replaced by that file's
text, so scripts share a prelude without Lua in Python strings. :func:`script` returns
a :class:`Script`; it runs as one ``EVALSHA`` on a blocking client (``script(...)(client,
keys, args)``) or an asyncio one (``await script(...).run(client, keys, args)``), and
queues on a pipeline of either kind (:meth:`Script.queue`, then :func:`execute` or
:func:`execute_async`). When Redis does not know the script (a restart, a failover,
``SCRIPT FLUSH``) it is loaded once and the command sent again: nothing ran the first
time, so the second send is the only run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["Script", "execute", "execute_async", "names", "script"]

_INCLUDE = re.compile(r"^--!include (\S+)\.lua$", re.MULTILINE)


def _source(name: str) -> str:
    return resources.files("fleet.redis").joinpath("lua", f"{name}.lua").read_text("utf-8")


def names() -> list[str]:
    """Every script and fragment in ``fleet/redis/lua/`` (file names without ``.lua``)."""
    folder = resources.files("fleet.redis").joinpath("lua")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


def header(name: str) -> str:
    """The comment that opens ``NAME.lua`` (its leading ``--`` lines)."""
    lines = []
    for line in _source(name).splitlines():
        if not line.startswith("--") or line.startswith("--!"):
            break
        lines.append(line)
    return "\n".join(lines)


class Script:
    """One Lua script, by its SHA1, with the one ``NOSCRIPT`` fallback.

    Args:
        name: the file name under ``fleet/redis/lua/`` without ``.lua``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = _INCLUDE.sub(lambda m: _source(m.group(1)).rstrip("\n"), _source(name))
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r})"

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run on a blocking client: one ``EVALSHA`` (loading the script if Redis lacks it)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.text)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def run(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run on an asyncio client: one ``EVALSHA`` (loading the script if Redis lacks it)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.text)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> None:
        """Queue one ``EVALSHA`` on a pipeline (blocking or asyncio).

        Send the pipeline with :func:`execute` or :func:`execute_async`, which load the
        script if Redis lacks it.
        """
        pipe.evalsha(self.sha, len(keys), *keys, *args)


@cache
def script(name: str) -> Script:
    """The script ``fleet/redis/lua/NAME.lua`` (read and hashed once per process)."""
    return Script(name)


def _by_sha() -> dict[str, Script]:
    return {s.sha: s for s in map(script, names()) if not s.name.startswith("_")}


def _missing(replies: list[Any]) -> int | None:
    """Index of the first reply that is a ``NOSCRIPT`` error, if any."""
    return next((i for i, r in enumerate(replies) if isinstance(r, NoScriptError)), None)


def _resend(pipe: Any, stack: list[Any], first: int) -> None:
    """Queue the loads of the scripts from ``first`` on, then those commands again."""
    known = _by_sha()
    shas = {args[1] for args, _ in stack[first:] if str(args[0]).upper() == "EVALSHA"}
    for sha in sorted(s for s in shas if isinstance(s, str) and s in known):
        pipe.script_load(known[sha].text)
    for args, options in stack[first:]:
        pipe.execute_command(*args, **options)


def _finish(replies: list[Any], raise_on_error: bool) -> list[Any]:
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


def execute(pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
    """Send a blocking pipeline that holds queued scripts, loading any Redis lacks.

    From the first command that found its script missing on, the commands are sent
    again after the loads (in order, in one more round trip): queue only commands that
    may run twice after a script (the script itself did not run).
    """
    stack = list(pipe.command_stack)
    replies = pipe.execute(raise_on_error=False)
    first = _missing(replies)
    if first is not None:
        _resend(pipe, stack, first)
        again = pipe.execute(raise_on_error=False)
        replies = replies[:first] + again[len(again) - (len(stack) - first) :]
    return _finish(replies, raise_on_error)


async def execute_async(pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
    """:func:`execute` for an asyncio pipeline."""
    stack = list(pipe.command_stack)
    replies = await pipe.execute(raise_on_error=False)
    first = _missing(replies)
    if first is not None:
        _resend(pipe, stack, first)
        again = await pipe.execute(raise_on_error=False)
        replies = replies[:first] + again[len(again) - (len(stack) - first) :]
    return _finish(replies, raise_on_error)
