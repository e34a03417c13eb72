"""URLs: :data:`REDIS_SCHEMES` names a Redis URL; :func:`mask_url` hides its passwords.

Its own module so that the settings (which check a Sentinel URL) and the Sentinel
module (which names a URL in its errors) both use it without importing each other.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDIS_SCHEMES", "mask_url"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
"""How a URL of a Redis (a journal, a run log, a broker) begins."""

_SECRET_QUERY = re.compile(r"((?:^|[?&])sentinel_password=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and errors).

    A sentinel URL (``sentinel://...;sentinel://...``) has each part masked, and a
    ``sentinel_password=`` in its query too.
    """
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    url = _SECRET_QUERY.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
