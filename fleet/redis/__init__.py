"""fleet's one Redis layer: clients, key names and Lua scripts.

* :mod:`fleet.redis.clients` makes every client: the process-wide factories
  (:func:`~fleet.redis.clients.async_client`, :func:`~fleet.redis.clients.sync_client`,
  Sentinel URLs included) and per-event-loop clients
  (:func:`~fleet.redis.clients.per_loop`); :mod:`fleet.redis.sentinel` reads Sentinel URLs.
* :mod:`fleet.redis.keys` names every key fleet writes (:class:`~fleet.redis.keys.Keys`),
  hash tags included.
* :mod:`fleet.redis.scripts` runs every Lua script (``lua/*.lua``, each opening with its
  KEYS and ARGV) one way: ``EVALSHA`` with one ``NOSCRIPT`` fallback, on a client or a
  pipeline, blocking or asyncio.

Nothing is imported here, so that importing a submodule loads no more than it needs
(``import fleet`` loads no redis-py). Inside this package ``import redis`` is absolute:
it still reaches redis-py.
"""
