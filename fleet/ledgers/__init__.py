"""Budget ledgers: where a workflow's token account lives (in memory, or in Redis)."""

from .base import KEEP as KEEP
from .base import BudgetLedger as BudgetLedger
from .base import ChildUsage as ChildUsage
from .base import HeldReservation as HeldReservation
from .base import Keep as Keep
from .base import LedgerState as LedgerState
from .base import ReserveResult as ReserveResult
from .memory import MemoryLedger as MemoryLedger
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
]
