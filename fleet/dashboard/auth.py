"""The dashboard's door: basic auth on every route but ``/healthz``, and security headers.

:func:`dashboard_auth` reads the user and password from settings (and refuses to start
without a password); :class:`BasicAuth` is the middleware that checks them and adds the
security headers to every answer.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import FleetSettings
from ..errors import ConfigError

__all__ = ["BasicAuth", "dashboard_auth"]


def dashboard_auth(settings: FleetSettings) -> tuple[str, str]:
    """``(user, password)`` of the dashboard's basic auth, from settings.

    Raises:
        ConfigError: no password is configured, or the user contains ``:``.
    """
    if not settings.dashboard_password:
        raise ConfigError(
            "the dashboard needs a password and none is configured: set "
            "FLEET_DASHBOARD_PASSWORD (or dashboard_password in the config file); the user "
            f"is {settings.dashboard_user!r} (dashboard_user)",
            key="dashboard_password",
        )
    if ":" in settings.dashboard_user or not settings.dashboard_user:
        raise ConfigError(
            f"dashboard_user must be non-empty without ':', got {settings.dashboard_user!r}",
            key="dashboard_user",
        )
    return settings.dashboard_user, settings.dashboard_password


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class BasicAuth:
    """Pure ASGI middleware (it must not buffer the server-sent event streams)."""

    def __init__(self, app: ASGIApp, *, user: str, password: str) -> None:
        self.app = app
        self._expected = f"{user}:{password}".encode()

    def _allowed(self, scope: Scope) -> bool:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an authenticated request on, with the security headers; else answer 401."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        if scope["path"] == "/healthz" or self._allowed(scope):
            await self.app(scope, receive, send_with_headers)
            return
        refusal = JSONResponse(
            {"error": "authentication required (basic auth: dashboard_user / password)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="fleet dashboard", charset="UTF-8"'},
        )
        await refusal(scope, receive, send_with_headers)
