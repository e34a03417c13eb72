"""Reading one ``[agents.NAME]`` table of the agents file into its typed config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..spec import describe_validation_error

__all__ = ["validate_agent_table"]

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
