"""Loading a workflow program for ``fleet run``: ``path/to/flow.py:main`` or ``module:main``.

A file inside a package (a directory with ``__init__.py``) is imported under its dotted
name, so its own imports work; any other file is loaded on its own. A program may define
``AGENTS = {name: agent}``, registered with the local executor beside the agents file.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from ..agents import load_agents
from ..config import FleetSettings
from ..errors import ConfigError
from ..workflow import Workflow

__all__ = ["Program", "load_program", "program_agents"]

Program = Callable[[Workflow], Awaitable[Any]]
"""A workflow program: ``async def main(workflow)``."""


def _package_root(path: Path) -> tuple[Path, str]:
    """The directory to import from and the dotted module name of ``path``."""
    parts = [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file():
        parts.insert(0, directory.name)
        directory = directory.parent
    return directory, ".".join(parts)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"workflow program {str(path)!r} does not exist", key=str(path))
    given, path = str(path), path.resolve()
    root, dotted = _package_root(path)
    sys.path.insert(0, str(root))
    if "." in dotted:  # inside a package: import it as such, so its relative imports work
        with _user_errors(given, root):
            return importlib.import_module(dotted)
    name = f"fleet_program_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {str(path)!r} as Python", key=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _user_errors(given, root):
        spec.loader.exec_module(module)
    return module


def _shown(filename: str) -> str:
    """``filename`` relative to this directory when it lies under it."""
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd()))
    except (OSError, ValueError):
        return filename


def _where_raised(error: BaseException, root: Path) -> str:
    """``file:line`` of the user's code that raised ``error``.

    The deepest frame under ``root``, else the deepest frame in a real file.
    """
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<")
    ]
    mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(root.resolve())]
    chosen = mine or frames
    if not chosen:
        return "?"
    return f"{_shown(chosen[-1].filename)}:{chosen[-1].lineno}"


@contextlib.contextmanager
def _user_errors(what: str, root: Path) -> Iterator[None]:
    """Turn an error raised while importing the user's program into one line.

    The line names the file and line (``flow.py:3: SyntaxError: ...``); the original
    exception stays chained for ``fleet --debug``.
    """
    try:
        yield
    except SyntaxError as error:
        where = f"{_shown(error.filename or what)}:{error.lineno or '?'}"
        raise ConfigError(
            f"{where}: SyntaxError: {error.msg} (in the workflow program {what!r}); fix the "
            "file and run again",
            key=what,
        ) from error
    except Exception as error:
        if isinstance(error, ConfigError) and error.key == what:
            raise
        raise ConfigError(
            f"{_where_raised(error, root)}: {type(error).__name__}: {error} (while importing "
            f"the workflow program {what!r})",
            key=what,
        ) from error


def _import_module(location: str) -> ModuleType:
    try:
        return importlib.import_module(location)
    except (ModuleNotFoundError, TypeError, ValueError) as error:  # "" or a relative ".mod"
        if isinstance(error, ModuleNotFoundError) and not _names_part_of(error, location):
            raise  # a module the program itself imports is missing: the program's error
        raise ConfigError(
            f"cannot import workflow module {location!r} ({error}); give a file path "
            "(flow.py:main) or a module importable from this directory",
            key=location,
        ) from None


def _names_part_of(error: ModuleNotFoundError, location: str) -> bool:
    """Whether the missing module is ``location`` or one of its parent packages."""
    missing = error.name or ""
    return location == missing or location.startswith(missing + ".")


def load_program(target: str) -> tuple[Program, ModuleType]:
    """Import ``path/to/flow.py:main`` or ``package.module:main`` (``:main`` is the default).

    Raises:
        ConfigError: the file or module is missing, or ``main`` is not an async function.
    """
    location, sep, attribute = target.rpartition(":")
    if not sep or not attribute or "/" in attribute or attribute.endswith(".py"):
        location, attribute = target, "main"
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(Path(location))
    else:
        sys.path.insert(0, str(Path.cwd()))
        with _user_errors(location, Path.cwd()):
            module = _import_module(location)
    program = getattr(module, attribute, None)
    if program is None or not inspect.iscoroutinefunction(program):
        raise ConfigError(_not_a_program(target, location, attribute, program), key=target)
    return program, module


def _not_a_program(target: str, location: str, attribute: str, found: object) -> str:
    """Why ``attribute`` of ``location`` cannot be run, and what to write instead."""
    want = f"expected `async def {attribute}(workflow)`"
    if found is None:
        return f"{target!r}: {location} defines no {attribute!r}; {want}"
    if inspect.isfunction(found):
        return f"{target!r}: {attribute!r} is a plain function (not async); {want}"
    return f"{target!r}: {attribute!r} is a {type(found).__name__}; {want}"


def program_agents(
    module: ModuleType, agents_file: Path | None, config: FleetSettings
) -> dict[str, Any]:
    """The agents a program runs with.

    Those of ``agents_file`` (else of the configured agents file, if it exists), then the
    program's own ``AGENTS``.
    """
    found: dict[str, Any] = {}
    if agents_file is not None:
        found.update(load_agents(agents_file))
    elif config.agents_file.is_file():
        found.update(load_agents(config.agents_file))
    declared = getattr(module, "AGENTS", None)
    if declared is not None:
        if not isinstance(declared, Mapping):
            raise ConfigError(f"{module.__name__}.AGENTS must map agent names to agents")
        found.update(declared)
    return found
