"""HTTP to the model server: one agent's endpoint and its pooled clients.

An agent keeps one connection pool (:class:`~.connections.Connections`) per event loop,
so the connections of one step are reused by the next; every pool shares one TLS context
(loading the CA bundle is costly in CPU: it is paid once per process instead of once
per step). A loop's pool is closed when the loop shuts down its async generators
(``asyncio.run`` does), or by :meth:`Transport.aclose`.

A step sends its requests through a :class:`~.sender.Sender` (:meth:`Transport.sender`).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable

import httpx

from ...perloop import PerLoop
from .concurrency import Gate, WidthMemory
from .config import OpenAIAgentConfig
from .connections import Connections
from .sender import CallGate, Sender

__all__ = ["Transport", "tls_context"]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every client shares (built once: it loads the CA bundle)."""
    return httpx.create_ssl_context()


async def _close(pool: Connections) -> None:
    # Shielded: a loop shutting down cancels tasks, and a half-closed pool leaves sockets
    # open; the close goes on in the loop's last turns.
    closing = asyncio.ensure_future(pool.aclose())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        pass


class Transport:
    """One agent's way to its server: the endpoint and a pooled client per event loop.

    Args:
        config: the agent's configuration (``base_url``, limits, retries).
        where: the server's address as shown in messages (credentials masked).
    """

    def __init__(self, config: OpenAIAgentConfig, *, where: str) -> None:
        self.config = config
        self.where = where
        self.endpoint = config.base_url.rstrip("/") + "/chat/completions"
        self.gate = Gate(
            config.max_concurrent, endpoint=f"{config.base_url.rstrip('/')} {config.model}"
        )
        # One pool per event loop, closed when that loop shuts down (see fleet.perloop).
        self._pools: PerLoop[Connections] = PerLoop(
            lambda: Connections(ssl_context=tls_context()), close=_close
        )

    def client(self) -> Connections:
        """This event loop's connection pool (made on first use)."""
        return self._pools.get()

    async def aclose(self) -> None:
        """Close this event loop's pool and its connections (a later step makes a new one)."""
        await self._pools.aclose()

    def sender(
        self,
        *,
        key: str | None,
        label: str,
        remaining_s: Callable[[], float | None],
        limit: CallGate | None = None,
        on_text: Callable[[str, bool], None] | None = None,
        memory: WidthMemory | None = None,
    ) -> Sender:
        """What one step sends requests through (its key, deadline, log label, limit)."""
        return Sender(
            self,
            key=key,
            label=label,
            remaining_s=remaining_s,
            limit=limit,
            on_text=on_text,
            memory=memory,
        )
