"""The ``fleet`` command: the Typer app every command module registers on."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from ..config import FleetSettings, load_settings
from ..errors import FleetError

__all__ = ["app", "console", "err_console", "main", "settings"]

app = typer.Typer(
    name="fleet",
    help="Programmable, deterministic multi-agent orchestration on a Celery worker fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Programmable, deterministic multi-agent orchestration on a Celery worker fleet."""


def settings(**overrides: object) -> FleetSettings:
    """Settings for a command: ``config/fleet.toml`` < ``FLEET_*`` < command-line options."""
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def main() -> None:
    """Entry point: run a command; a ``FleetError`` prints its message and exits with 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FleetError as error:
        # soft_wrap: one error stays one line in a log or pipe, whatever the width.
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
