"""How a request to the model server fails: :class:`Transient` (retried) or :class:`Refused`.

Which HTTP answers are which is :meth:`~.sender.Sender.refusal`.
"""

from __future__ import annotations

from ...errors import AgentError

__all__ = ["Refused", "Transient"]


class Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, dropped connection)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        congestion: bool = False,
        abandoned: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.congestion = congestion
        """The server is saturated (a timeout, 429 or 503)."""
        self.abandoned = abandoned
        """We hung up on a request the server may still be working on (a timeout)."""


class Refused(AgentError):
    """The server refused the request with an HTTP status we do not retry.

    Attributes:
        status: the HTTP status.
        rejected: the request field a validation error named, if any.
        detail: the server's error message (for choosing a fallback; never logged).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        kind: str = "provider",
        rejected: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message, kind=kind)
        self.status = status
        self.rejected = rejected
        self.detail = detail
