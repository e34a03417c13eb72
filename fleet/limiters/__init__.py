"""Provider limits: requests and tokens per sliding window, shared by a host or a fleet.

:class:`RedisRateLimiter` is imported when it is first named, so ``import fleet`` loads
no Redis client.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .admission import Admission as Admission
from .admission import admit as admit
from .base import AdmitResult as AdmitResult
from .base import AdmitStatus as AdmitStatus
from .base import LimitState as LimitState
from .base import ProviderLimit as ProviderLimit
from .base import RateLimiter as RateLimiter
from .base import parse_limits as parse_limits
from .memory import MemoryRateLimiter as MemoryRateLimiter

if TYPE_CHECKING:
    from .redis import RedisRateLimiter as RedisRateLimiter

__all__ = [
    "AdmitResult",
    "AdmitStatus",
    "Admission",
    "LimitState",
    "MemoryRateLimiter",
    "ProviderLimit",
    "RateLimiter",
    "RedisRateLimiter",
    "admit",
    "parse_limits",
]


__getattr__ = lazy_exports(__name__, {"RedisRateLimiter": ".redis:RedisRateLimiter"})
