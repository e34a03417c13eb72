"""Loading a workflow program for ``fleet run``: ``path/to/flow.py:main`` or ``module:main``.

A file inside a package (a directory with ``__init__.py``) is imported under its dotted
name, so its own imports work; any other file is loaded on its own. A program may define
``AGENTS = {name: agent}``, registered with the local executor beside the agents file.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping
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
    path = path.resolve()
    root, dotted = _package_root(path)
    sys.path.insert(0, str(root))
    if "." in dotted:  # inside a package: import it as such, so its relative imports work
        return importlib.import_module(dotted)
    name = f"fleet_program_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {str(path)!r} as Python", key=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
        try:
            module = importlib.import_module(location)
        except (ImportError, TypeError, ValueError) as error:  # "" or a relative ".mod"
            raise ConfigError(
                f"cannot import workflow module {location!r} ({error}); give a file path "
                "(flow.py:main) or a module importable from this directory",
                key=target,
            ) from None
    program = getattr(module, attribute, None)
    if program is None or not inspect.iscoroutinefunction(program):
        raise ConfigError(
            f"{target!r}: expected `async def {attribute}(workflow)` in {module.__name__!r}",
            key=target,
        )
    return program, module


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
