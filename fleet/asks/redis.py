"""The fleet's ask book, in Redis: a hash per workflow, shared by the host and every answerer.

Key ``{p}:asks:{ROOT}`` (the root id is the hash tag, :mod:`fleet.redis.keys`): field ``NAME``
holds the ask's record as JSON. A swap is one small Lua script, atomic on the server.
"""

from __future__ import annotations

from typing import Any

from ..config import mask_url
from ..redis.clients import broker_call, per_loop
from ..redis.keys import Keys
from ..redis.scripts import script
from ..redis.sentinel import is_sentinel
from .book import AskBook

__all__ = ["RedisAskBook", "asks_key"]


def asks_key(root_id: str, *, key_prefix: str = "fleet") -> str:
    """The hash holding ``root_id``'s asks."""
    return Keys(key_prefix).asks(root_id)


class RedisAskBook(AskBook):
    """Asks in the fleet's Redis.

    Args:
        url: the Redis URL (``redis://``, ``rediss://`` or ``sentinel://``).
        key_prefix: the fleet's key prefix.

    The client connects lazily, one per event loop.
    """

    def __init__(self, url: str, *, key_prefix: str = "fleet") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._clients = per_loop(url, retry=is_sentinel(url))

    def __repr__(self) -> str:
        return f"RedisAskBook({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    @property
    def _client(self) -> Any:  # redis-py's command annotations reject plain str mappings
        return self._clients.get()

    def _key(self, root_id: str) -> str:
        return asks_key(root_id, key_prefix=self.key_prefix)

    async def get(self, root_id: str, name: str) -> str | None:
        """The stored record."""
        raw = await broker_call(
            self.url, "read an ask", self._client.hget(self._key(root_id), name)
        )
        return None if raw is None else bytes(raw).decode()

    async def swap(self, root_id: str, name: str, expected: str | None, new: str) -> bool:
        """Compare and swap (one script)."""
        swap = script("ask_swap").run(
            self._client, [self._key(root_id)], [name, expected or "", new]
        )
        done = await broker_call(self.url, "write an ask", swap)
        return bool(done)

    async def all(self, root_id: str | None = None) -> list[str]:
        """Every record (of ``root_id``); across workflows this uses ``SCAN``."""
        if root_id is not None:
            keys = [self._key(root_id)]
        else:
            pattern = _glob_escape(Keys(self.key_prefix).head("asks")) + "*"
            keys = await broker_call(
                self.url, "list asks", _collect(self._client.scan_iter(match=pattern, count=1000))
            )
        found: list[str] = []
        for key in keys:
            values = await broker_call(self.url, "list asks", self._client.hvals(key))
            found.extend(bytes(value).decode() for value in values)
        return found

    async def clear(self, root_id: str) -> None:
        """Remove ``root_id``'s asks."""
        await broker_call(self.url, "clear asks", self._client.delete(self._key(root_id)))

    async def close(self) -> None:
        """Close this event loop's connections."""
        await self._clients.aclose()


async def _collect(names: Any) -> list[Any]:
    return [name async for name in names]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
