"""Provider limits: requests and tokens per sliding window, shared by a host or a fleet."""

from .admission import Admission as Admission
from .admission import admit as admit
from .base import AdmitResult as AdmitResult
from .base import AdmitStatus as AdmitStatus
from .base import LimitState as LimitState
from .base import ProviderLimit as ProviderLimit
from .base import RateLimiter as RateLimiter
from .base import parse_limits as parse_limits
from .memory import MemoryRateLimiter as MemoryRateLimiter
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
