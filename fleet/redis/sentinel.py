"""Sentinel URLs: one ``FLEET_REDIS_URL`` naming a Sentinel-managed Redis.

The form (kombu's, with the master's name in the query)::

    sentinel://[:PASSWORD@]HOST:PORT;sentinel://HOST:PORT;.../DB?master_name=NAME

Each ``;``-separated part names one sentinel; the database, password (and user) may be
written on any part and apply to all. The password is the *data nodes'* (``requirepass``
of the master and replica); the sentinels themselves are reached without one unless
``sentinel_password=...`` is in the query. :func:`parse_sentinel_url` reads it,
:func:`check_redis` proves at start that the URL reaches a master (one clear line per
problem), and :func:`celery_options` turns it into kombu's and Celery's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..errors import BrokerError, ConfigError
from ..urls import mask_url

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "SentinelURL",
    "celery_options",
    "check_redis",
    "is_sentinel",
    "parse_sentinel_url",
]

DEFAULT_SENTINEL_PORT = 26379
"""The port of a sentinel written without one."""

_QUERY_KEYS = ("master_name", "sentinel_password")


def _no_retry(asynchronous: bool = False) -> Any:
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return (AsyncRetry if asynchronous else Retry)(NoBackoff(), 0)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names a Sentinel-managed Redis (``sentinel://...``)."""
    return url.strip().lower().startswith("sentinel://")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed sentinel URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    """``(host, port)`` of every sentinel, in the URL's order."""
    master_name: str
    """The name the sentinels monitor the master under."""
    db: int = 0
    """The database number on the data nodes."""
    username: str | None = None
    """ACL user of the data nodes, if any."""
    password: str | None = None
    """Password of the data nodes, if any."""
    sentinel_password: str | None = None
    """Password of the sentinels themselves, if any."""

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a connection to the master (redis-py)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def sentinel_kwargs(
        self, *, timeout_s: float = 1.0, asynchronous: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments for a connection to a sentinel (redis-py).

        No retries: redis-py's default (3, backing off from 1 s) made every master lookup
        that met a dead sentinel first cost seconds; the next sentinel is the retry.
        """
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": _no_retry(asynchronous),
        }
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def celery_url(self) -> str:
        """The URL in the form kombu and Celery read: every part carries auth and database.

        kombu takes the database and password from the first part, Celery's result
        backend from the first host; writing them on every part makes the order of the
        sentinels (and which of them is down) irrelevant.
        """
        auth = ""
        if self.password:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.password, safe='')}@"
        return ";".join(
            f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels
        )


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``sentinel://`` URL.

    Raises:
        ConfigError: the URL is malformed or names no master (the message says the fix
            and masks the password).
    """
    shown = mask_url(url)
    parts = [part.strip() for part in url.strip().split(";") if part.strip()]
    sentinels: list[tuple[str, int]] = []
    db: int | None = None
    username = password = None
    query: dict[str, list[str]] = {}
    for part in parts:
        try:
            split = urlsplit(part)
            port = split.port or DEFAULT_SENTINEL_PORT
        except ValueError as error:
            raise ConfigError(f"invalid sentinel URL {shown}: {error}", key="redis_url") from None
        if split.scheme.lower() != "sentinel" or not split.hostname:
            raise ConfigError(
                f"invalid sentinel URL {shown}: every ';'-separated part must read "
                "sentinel://HOST:PORT",
                key="redis_url",
            )
        sentinels.append((split.hostname, port))
        if split.password is not None:
            username = unquote(split.username) if split.username else None
            password = unquote(split.password)
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(
                    f"invalid sentinel URL {shown}: the database must be a number, got {path!r}",
                    key="redis_url",
                )
            db = int(path)
        for key, values in parse_qs(split.query).items():
            query.setdefault(key, []).extend(values)
    unknown = sorted(set(query) - set(_QUERY_KEYS))
    if unknown:
        raise ConfigError(
            f"sentinel URL {shown}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(_QUERY_KEYS)}",
            key="redis_url",
        )
    master_name = (query.get("master_name") or [""])[-1]
    if not master_name:
        raise ConfigError(
            f"sentinel URL {shown} names no master: add ?master_name=NAME (the name in "
            "the sentinels' 'sentinel monitor NAME ...' line), e.g. "
            "sentinel://h1:26379;sentinel://h2:26379/0?master_name=fleet",
            key="redis_url",
        )
    sentinel_passwords = query.get("sentinel_password")
    sentinel_password = sentinel_passwords[-1] if sentinel_passwords else None
    return SentinelURL(
        tuple(sentinels), master_name, db or 0, username, password, sentinel_password
    )


def celery_options(url: str) -> dict[str, Any]:
    """``Celery.conf`` entries for a fleet URL: broker, backend and their transport options.

    For ``redis://`` and ``rediss://`` the URL is used as it is; a sentinel URL becomes
    kombu's ``sentinel://`` broker and Celery's sentinel result backend, both told the
    master's name (celery#5538: every part carries the database and password, so a
    first sentinel that is down does not matter).
    """
    if not is_sentinel(url):
        return {"broker_url": url, "result_backend": url}
    target = parse_sentinel_url(url)
    transport: dict[str, Any] = {
        "master_name": target.master_name,
        "sentinel_kwargs": target.sentinel_kwargs(),
    }
    return {
        "broker_url": target.celery_url(),
        "result_backend": target.celery_url(),
        "broker_transport_options": transport,
        "result_backend_transport_options": {**transport},
    }


def check_redis(url: str, *, timeout_s: float = 2.0, setting: str = "FLEET_REDIS_URL") -> None:
    """Prove that ``url`` reaches a writable Redis, or fail with one line saying why.

    For a sentinel URL: at least one sentinel answers, one of them knows a master under
    ``master_name``, and the master accepts the password. No retries: this runs at start
    (``fleet worker``, ``fleet run``, a Celery host's first round). ``setting`` is what
    the message tells the user to fix (``--store``, ``FLEET_REDIS_URL``, ...).

    Raises:
        ConfigError: the URL is malformed or names no master.
        BrokerError: nothing answers, the master is unknown, or the password is wrong.
    """
    import redis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    shown = mask_url(url)
    if not is_sentinel(url):
        try:
            with redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=_no_retry()
            ) as client:
                client.ping()
        except ValueError as error:
            raise ConfigError(f"invalid Redis URL {shown}: {error}", key="redis_url") from None
        except AuthenticationError:
            raise BrokerError(
                f"Redis at {shown} refused the password: fix the password in {setting}"
            ) from None
        except (RedisError, OSError) as error:
            raise BrokerError(
                f"cannot reach Redis at {shown} ({_first_line(error)}): start it, or fix {setting}"
            ) from None
        return
    target = parse_sentinel_url(url)
    master, answered = _ask_sentinels(target, timeout_s, setting)
    where = ", ".join(f"{host}:{port}" for host, port in target.sentinels)
    if not answered:
        raise BrokerError(
            f"no sentinel reachable at {where} ({setting} {shown}): start the "
            "sentinels, or fix the host:port list in the URL"
        )
    if master is None:
        raise BrokerError(
            f"the sentinels at {where} know no master named {target.master_name!r}: fix "
            f"master_name in {setting} to the name in 'sentinel monitor NAME ...'"
        )
    try:
        with redis.Redis(
            host=master[0],
            port=master[1],
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=_no_retry(),
            **target.connection_kwargs(),
        ) as client:
            client.ping()
    except AuthenticationError:
        raise BrokerError(
            f"the master {target.master_name!r} at {master[0]}:{master[1]} refused the "
            f"password in {setting} {shown}: fix the password (it is the data "
            "nodes' requirepass, not the sentinels')"
        ) from None
    except ResponseError as error:
        if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
            raise BrokerError(
                f"the master {target.master_name!r} at {master[0]}:{master[1]} needs a "
                f"password and {setting} {shown} has none or a wrong one: add "
                "sentinel://:PASSWORD@host:port..."
            ) from None
        raise BrokerError(f"the master at {master[0]}:{master[1]}: {error}") from None
    except (RedisError, OSError) as error:
        raise BrokerError(
            f"the sentinels name {master[0]}:{master[1]} as master {target.master_name!r} "
            f"but it does not answer ({_first_line(error)}); a failover may be under way: "
            "retry in a few seconds"
        ) from None


def _ask_sentinels(
    target: SentinelURL, timeout_s: float, setting: str
) -> tuple[tuple[str, int] | None, int]:
    """The master's address as the first sentinel that knows it says, and how many answered."""
    import redis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    answered = 0
    for host, port in target.sentinels:
        try:
            with redis.Redis(
                host=host,
                port=port,
                **target.sentinel_kwargs(timeout_s=timeout_s),
            ) as client:
                reply = client.sentinel_get_master_addr_by_name(target.master_name)
        except AuthenticationError:
            raise BrokerError(
                f"the sentinel at {host}:{port} refused sentinel_password: fix it in {setting}"
            ) from None
        except ResponseError as error:
            if "NOAUTH" in str(error):
                raise BrokerError(
                    f"the sentinel at {host}:{port} needs a password: add "
                    f"&sentinel_password=... to {setting}"
                ) from None
            answered += 1
            continue
        except (RedisError, OSError):
            continue
        answered += 1
        if reply:
            address, master_port = reply
            name = address.decode() if isinstance(address, bytes) else str(address)
            return (name, int(master_port)), answered
    return None, answered


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
