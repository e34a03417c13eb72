"""Names a package exports but imports only when first asked for (PEP 562).

``import fleet`` loads neither Redis nor Celery: the Redis store, ledger, limiter and run
registry are exported by their packages and imported on first use, through one
``__getattr__`` made here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports each of ``names`` when it is first named.

    Args:
        package: the exporting module's ``__name__``.
        names: exported name → ``"module:attribute"``, the module relative to ``package``
            (``".redis:RedisLedger"``).

    Example:
        ``__getattr__ = lazy_exports(__name__, {"RedisLedger": ".redis:RedisLedger"})``
    """
    targets = dict(names)

    def __getattr__(name: str) -> object:
        target = targets.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module, package), attribute)

    return __getattr__
