"""Code named by a dotted path ``"package.module:attribute"`` (agents, tools, stages).

Its own module so that what names code (the registry, the OpenAI agent's tools, the
pydantic-ai agent, the Celery app's stages) imports it without importing each other.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["import_target", "resolve_target"]


def import_target(target: str, *, what: str = "agent") -> Any:
    """Import ``"package.module:attribute"`` and return the attribute, whatever it is.

    Raises:
        ConfigError: the path is malformed, or the module or attribute is missing.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"{what} target {target!r} is not of the form 'package.module:function'", key=target
        )
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as error:  # TypeError: a relative ".mod"
        raise ConfigError(
            f"{what} target {target!r}: cannot import module {module_name!r} ({error}); "
            "is it installed and on PYTHONPATH?",
            key=target,
        ) from None
    except Exception as error:  # the module's own code failed: one line, not a traceback
        raise ConfigError(
            f"{what} target {target!r}: importing module {module_name!r} failed at "
            f"{_where_raised(error)}: {type(error).__name__}: {_first_line(error)}",
            key=target,
        ) from error
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{what} target {target!r}: module {module_name!r} has no attribute {attribute!r}",
                key=target,
            ) from None
    return obj


def _where_raised(error: BaseException) -> str:
    """``file:line`` of the innermost frame outside installed packages and the importer."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if "site-packages" not in frame.filename and not frame.filename.startswith("<")
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "import"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def resolve_target(target: str, *, what: str = "agent") -> Callable[..., Any]:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises:
        ConfigError: the path is malformed, the module or attribute is missing, or the
            attribute is not callable.
    """
    obj = import_target(target, what=what)
    if not callable(obj):
        raise ConfigError(f"{what} target {target!r} is not callable", key=target)
    return obj  # type: ignore[no-any-return]
