"""Importing fleet is cheap and clean: no broker client at import, no circle among its modules."""

from __future__ import annotations

import ast
import graphlib
import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest


def _modules_after(statement: str) -> set[str]:
    code = textwrap.dedent(
        f"""
        import sys
        {statement}
        print("\\n".join(sorted({{name.split(".")[0] for name in sys.modules}})))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(done.stdout.split())


def test_import_fleet_loads_neither_redis_nor_celery() -> None:
    """`import fleet` (and the combinators, the local host, the stores) loads no broker client."""
    loaded = _modules_after(
        "import fleet; from fleet.stores import open_store, MemoryCheckpointStore; "
        "from fleet.ledgers import MemoryLedger"
    )
    assert "fleet" in loaded
    assert not loaded & {"redis", "celery", "kombu"}, sorted(loaded & {"redis", "celery", "kombu"})


def test_redis_store_and_ledger_import_when_named() -> None:
    """Naming the Redis store or ledger imports them (and then Redis) on demand."""
    loaded = _modules_after(
        "import fleet; fleet.RedisCheckpointStore; from fleet.ledgers import RedisLedger"
    )
    assert "redis" in loaded
    assert "celery" not in loaded


def test_celery_host_imports_from_its_package() -> None:
    """The public Celery host name still imports from `fleet.celery`."""
    loaded = _modules_after("from fleet.celery import CeleryExecutor")
    assert {"celery", "redis"} <= loaded


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``body``, at any depth, except under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        for name in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, name, None)
            if isinstance(inner, list):
                yield from _imports(inner)


def _import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (deferred imports in functions too)."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        if "demo_project" in path.parts:  # sample code the demo reviews, never imported
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            # ``from pkg import sub`` imports the submodule; ``from mod import name``, mod.
            names = [f"{module}.{alias.name}" for alias in node.names]
            submodules = [name for name in names if name in modules]
            targets.update(submodules or [module])
        graph[name] = set()
        for target in targets:
            while target and target not in modules:  # a name in a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


@pytest.mark.parametrize(
    ("package", "importer", "imported"),
    [
        ("fleet", "fleet.local", "fleet.agents.registry"),
        ("workers", "workers.app", "workers.tasks"),
    ],
)
def test_modules_import_no_circle(package: str, importer: str, imported: str) -> None:
    """No module of fleet (or workers) imports one that imports it back, even deferred.

    A circle (agents/registry <-> agents/openai, config <-> sentinel, telemetry -> fleet)
    is what a deferred import inside a function hides; each shared piece lives below both
    (agents/targets.py, urls.py, version.py). Imports under ``TYPE_CHECKING`` are not
    followed: they never run.
    """
    root = importlib.import_module(package).__file__
    assert root is not None
    graph = _import_graph(Path(root).parent)
    assert imported in graph[importer]  # the graph sees real imports
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        circle = " imports ".join(reversed(error.args[1]))
        raise AssertionError(f"import circle: {circle}") from None
