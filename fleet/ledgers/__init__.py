"""Budget ledgers: where a workflow's token account lives (in memory, a SQLite file, or Redis).

:class:`RedisLedger` is imported when it is first named, so ``import fleet`` loads no
Redis client.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .base import KEEP as KEEP
from .base import BudgetLedger as BudgetLedger
from .base import ChildUsage as ChildUsage
from .base import HeldReservation as HeldReservation
from .base import Keep as Keep
from .base import LedgerState as LedgerState
from .base import ReserveResult as ReserveResult
from .memory import MemoryLedger as MemoryLedger
from .sqlite import SQLiteLedger as SQLiteLedger

if TYPE_CHECKING:
    from .redis import RedisLedger as RedisLedger

__all__ = [
    "KEEP",
    "BudgetLedger",
    "ChildUsage",
    "HeldReservation",
    "Keep",
    "LedgerState",
    "MemoryLedger",
    "RedisLedger",
    "ReserveResult",
    "SQLiteLedger",
]


__getattr__ = lazy_exports(__name__, {"RedisLedger": ".redis:RedisLedger"})
