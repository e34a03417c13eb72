"""The ``fleet`` command: the Typer app every command module registers on."""

from __future__ import annotations

import inspect
import logging
import sys
import traceback
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..config import FleetSettings, load_settings
from ..errors import FleetError

__all__ = ["app", "command", "console", "debugging", "err_console", "main", "settings"]

app = typer.Typer(
    name="fleet",
    help="Programmable, deterministic multi-agent orchestration on a Celery worker fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

_debug = False


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback behind an error (and a failed part's log)."
    ),
) -> None:
    """Programmable, deterministic multi-agent orchestration on a Celery worker fleet."""
    global _debug
    _debug = debug


def debugging() -> bool:
    """Whether ``fleet --debug`` was given: errors show their traceback."""
    return _debug


def settings(**overrides: object) -> FleetSettings:
    """Settings for a command: ``config/fleet.toml`` < ``FLEET_*`` < command-line options."""
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def _polish(command: Any) -> None:
    """One style for every help page: arguments in capitals, no value shown for a flag.

    Typer prints a flag's type (``<bool>``) as if it took a value, and an argument's
    Python name as written (``root_id``) beside the capitals of those given a metavar.
    Duck-typed: Typer builds on Click or on its own copy of it, depending on its version.
    """
    for attr in ("help", "short_help"):
        text = getattr(command, attr, None)
        if text:
            setattr(command, attr, _plain(text))
    for param in command.params:
        _polish_param(param)
    made = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = made(ctx)
        if option is not None:
            _polish_param(option)
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _polish(sub)


def _plain(text: str) -> str:
    """Help text as a terminal shows it: no reST quoting, no Rich markup, paragraphs reflowed.

    Docstrings quote names the reST way (````x````) and mention tables such as
    ``[limits.NAME]``, which Typer's Rich formatting would otherwise take as markup and
    drop. A paragraph's hard line breaks are joined so the terminal wraps it once; a
    paragraph of list items or indented lines keeps its breaks.
    """
    paragraphs = []
    for paragraph in inspect.cleandoc(text).replace("``", "").split("\n\n"):
        lines = paragraph.splitlines()
        if not any(line.startswith((" ", "-", "*")) for line in lines):
            paragraph = " ".join(line.strip() for line in lines)
        paragraphs.append(escape(paragraph))
    return "\n\n".join(paragraphs)


def _polish_param(param: Any) -> None:
    if getattr(param, "help", None):
        param.help = _plain(param.help)
    if getattr(param, "is_flag", False):
        param.metavar = ""
    elif getattr(param, "param_type_name", None) == "argument" and param.name:
        param.metavar = (param.metavar or param.name).strip("[]{}").upper()


def command() -> Any:
    """The ``fleet`` command as Click runs it (help pages polished, see :func:`_polish`)."""
    built = typer.main.get_command(app)
    _polish(built)
    return built


def _report(error: BaseException) -> None:
    """Print a fleet error: one line, or its traceback (and detail) under ``--debug``."""
    if _debug:
        traceback.print_exception(error, file=sys.stderr)
        detail = getattr(error, "detail", None)
        if detail:
            print(detail, file=sys.stderr)
    # soft_wrap: one error stays one line in a log or pipe, whatever the width; escape: a
    # message quoting "[agents.NAME]" is text, not Rich markup.
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    if not _debug and getattr(error, "detail", None):
        err_console.print("(fleet --debug ... shows more)", highlight=False, markup=False)


def main() -> None:
    """Entry point: run a command; a ``FleetError`` prints its message and exits with 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        command()(standalone_mode=True)
    except FleetError as error:
        _report(error)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
