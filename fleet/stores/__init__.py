"""Journal stores: where resumable workflows record their completed steps.

``MemoryCheckpointStore`` (this process only), ``SQLiteCheckpointStore`` (the embedded
default, one local file) and ``RedisCheckpointStore`` (the fleet's journal, shared by every
machine) all implement :class:`CheckpointStore`. :func:`open_store` builds one from the
``store`` setting (``FLEET_STORE``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..lazy import lazy_exports
from .base import CheckpointStore as CheckpointStore
from .memory import MemoryCheckpointStore as MemoryCheckpointStore
from .sqlite import SQLiteCheckpointStore as SQLiteCheckpointStore

if TYPE_CHECKING:
    from .redis import RedisCheckpointStore as RedisCheckpointStore

__all__ = [
    "CheckpointStore",
    "MemoryCheckpointStore",
    "RedisCheckpointStore",
    "SQLiteCheckpointStore",
    "open_store",
    "sqlite_path",
]


def sqlite_path(target: str) -> str | None:
    """The file a ``sqlite:PATH`` (or URL-style ``sqlite:///abs``) target names; else ``None``."""
    text = target.strip()
    if not text.startswith("sqlite:"):
        return None
    path = text[len("sqlite:") :]
    return path[2:] if path.startswith("///") else path


__getattr__ = lazy_exports(__name__, {"RedisCheckpointStore": ".redis:RedisCheckpointStore"})


def open_store(target: str, *, key_prefix: str = "fleet") -> CheckpointStore:
    """Build the store a ``store`` setting names.

    Args:
        target: ``"memory"``, ``"sqlite:PATH"`` (relative or absolute path), or a
            ``redis://`` / ``rediss://`` URL.
        key_prefix: prefix of Redis keys (ignored by the other stores).

    Raises:
        ConfigError: ``target`` is none of the above.
    """
    text = target.strip()
    if text == "memory":
        return MemoryCheckpointStore()
    path = sqlite_path(text)
    if path is not None:
        if not path:
            raise ConfigError(
                "journal store 'sqlite:' names no file; use e.g. 'sqlite:.fleet/journal.db'",
                key="store",
            )
        return SQLiteCheckpointStore(path)
    if text.startswith(("redis://", "rediss://", "sentinel://")):
        from .redis import RedisCheckpointStore

        return RedisCheckpointStore(text, key_prefix=key_prefix)
    shown = "<a URL with a password>" if "@" in text else repr(text)
    raise ConfigError(
        f"unknown journal store {shown}; use 'memory', 'sqlite:PATH', or a redis:// or "
        "rediss:// URL (setting 'store', FLEET_STORE)",
        key="store",
    )
