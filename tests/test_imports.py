"""Importing fleet is cheap and clean: the grammar loads neither Redis nor Celery."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
