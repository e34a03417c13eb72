"""``fleet dashboard``: the workflow page and its JSON API (see :mod:`fleet.dashboard`)."""

from __future__ import annotations

import typer

from .app import app, err_console, settings

__all__ = ["dashboard"]


@app.command()
def dashboard(
    address: str = typer.Option(
        "127.0.0.1", "--address", help="Address to listen on (0.0.0.0 in a container)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (default: dashboard_port, 8080)."
    ),
) -> None:
    """Serve the workflow dashboard, with basic auth from settings (FLEET_DASHBOARD_PASSWORD).

    Lists the workflows logged in the fleet's Redis (FLEET_REDIS_URL) and the journal's
    SQLite file (FLEET_STORE); shows each one live, and cancels it on request.
    """
    import uvicorn

    from ..dashboard.app import create_app

    config = settings()
    web = create_app(config)  # refuses to start without a password
    chosen = port or config.dashboard_port
    err_console.print(
        f"fleet dashboard: http://{address}:{chosen} (user {config.dashboard_user!r}, "
        "password from dashboard_password)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    uvicorn.run(web, host=address, port=chosen, log_level="warning", access_log=False)
