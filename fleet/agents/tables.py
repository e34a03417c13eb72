"""Reading the agents file: its TOML, one table into its typed config, the line of a key.

Errors name the file and the line of the key at fault (``bad.toml:7: [agents.writer] ...``).
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..spec import describe_validation_error

__all__ = ["read_agents_file", "validate_agent_table", "with_line"]

Config = TypeVar("Config", bound=BaseModel)


def validate_agent_table(
    model: type[Config], table: Mapping[str, Any], *, where: str, kind: str, name: str
) -> Config:
    """The table (less its ``kind``) as ``model``, or one line naming the table and the field.

    Args:
        model: the kind's config model (``extra="forbid"``: a mistyped key is an error).
        table: the table as read from TOML.
        where: ``"FILE: [agents.NAME]"``, the start of every message.
        kind: the table's kind, named in the message.
        name: the agent's name, for the error's key.

    Raises:
        ConfigError: a key is missing, unknown or of the wrong type.
    """
    options = {key: value for key, value in table.items() if key != "kind"}
    try:
        return model.model_validate(options)
    except ValidationError as problem:
        first = problem.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(
            f"{where} (kind {kind!r}) is invalid: "
            + describe_validation_error(problem, "agent").removeprefix("invalid agent: "),
            key=f"agents.{name}.{field}",
        ) from None


def read_agents_file(path: str | Path, section: str | None) -> tuple[str, dict[str, Any]]:
    """Read an agents file and return ``(path as text, its [section.NAME] tables)``.

    ``section=None`` returns the whole document.

    Raises:
        ConfigError: the file is missing or unreadable, or ``section`` is not a table.
    """
    source = str(path)
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"agents file {source!r} does not exist; create it or point FLEET_AGENTS_FILE "
            "at the right file",
            key=source,
        ) from None
    except tomllib.TOMLDecodeError as error:
        found = _TOML_POSITION.search(str(error))
        line = found.group(1) if found else "?"
        message = _TOML_POSITION.sub("", str(error)).strip()
        raise ConfigError(
            f"{source}:{line}: the agents file is not valid TOML: {message}", key=source
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"agents file {source!r} cannot be read: {error}", key=source) from None
    if section is None:
        return source, document
    tables = document.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(
            f"{source}: {section!r} must be a table of [{section}.NAME] tables", key=source
        )
    return source, tables


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)")
_TABLE_NAMED = re.compile(r"^\[([^\]]+)\]")
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")


def _line_of(text: str, key: str) -> int | None:
    """The line of ``key`` (``agents.writer.modle``, ``prices.MODEL``) in a TOML text.

    The line of the key inside the longest table header that ``key`` starts with, else the
    header's own line; ``None`` when no header matches.
    """
    lines = text.splitlines()
    key = key.replace('"', "").replace("'", "")
    best: tuple[int, str] | None = None
    for index, line in enumerate(lines):
        found = _HEADER.match(line)
        if found is None:
            continue
        name = re.sub(r"\s*\.\s*", ".", found.group(1)).replace('"', "").replace("'", "")
        if (key == name or key.startswith(name + ".")) and (
            best is None or len(name) > len(best[1])
        ):
            best = (index, name)
    if best is None:
        return None
    start, name = best
    field = key[len(name) + 1 :].split(".")[0]
    assignment = re.compile(rf"^\s*[\"']?{re.escape(field)}[\"']?\s*=")
    for index in range(start + 1, len(lines)) if field else ():
        if lines[index].lstrip().startswith("["):
            break
        if assignment.match(lines[index]):
            return index + 1
    return start + 1


@contextlib.contextmanager
def with_line(path: str | Path) -> Iterator[None]:
    """Prefix a table's error with ``FILE:LINE`` (``bad.toml:7: [agents.writer] ...``)."""
    source = str(path)
    try:
        yield
    except ConfigError as error:
        message = str(error)
        if not message.startswith(f"{source}: "):
            raise
        rest = message.removeprefix(f"{source}: ")
        table = _TABLE_NAMED.match(rest)
        keys = [error.key or "", table.group(1) if table else ""]
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise error from None
        line = next(filter(None, (_line_of(text, key) for key in keys if key)), None)
        if line is None:
            raise
        raise ConfigError(f"{source}:{line}: {rest}", key=error.key) from error
