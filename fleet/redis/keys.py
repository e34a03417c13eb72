"""Every Redis key fleet writes, named in one place, with its Redis Cluster hash tag.

Redis Cluster puts a key in the slot of the text between its first ``{`` and the next
``}``. fleet wraps a workflow's root id in braces in every key that belongs to it, so the
keys of one workflow land in one slot and a Lua script over them stays cluster-safe.
Under the key prefix ``P`` (``key_prefix``, ``fleet`` by default):

==========================================  =============================================
``P:budget:{A}:account`` (and 4 more)       the ledger's keys of account ``A`` (a workflow's
                                            own account is its workflow id; see
                                            :mod:`fleet.ledgers.redis`)
``P:journal:{ROOT}/PHASE``                  a phase's journal (``ROOT/PHASE`` is its id)
``P:events:{ROOT}``                         the run's event stream
``P:deltas:{ROOT}``                         the run's output deltas (capped, expiring)
``P:workflow:{ROOT}``                       the run record of the cancel board
``P:asks:{ROOT}``                           the run's asks and answers (:mod:`fleet.asks`)
``P:steps:{OWNER}``                         the step record of a workflow or a bare round
``P:cancel:MARKER``                         a cancel marker (a run id or a round's marker)
``P:lease:TID``                             a worker's claim on a running step
``P:result:TID:NONCE``                      the outcome of one dispatch
``P:reply:NAME``                            a Celery host's reply list
``P:pipe:PIPE``                             a pipeline run's context and items
``P:limit:NAME:calls`` (and 3 more)         a provider limit's windows (:mod:`fleet.limiters`)
``P:endpoint:DIGEST:width``                 an endpoint's learned concurrency
==========================================  =============================================

A reservation under ancestor accounts (a team's budget above the workflow's) touches the
keys of several accounts in one script, so it spans slots by nature (docs/RELIABILITY.md,
"Redis Cluster"). The Celery broker's own keys (the queue, kombu's ``unacked``) are
kombu's, not named here.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["BUDGET_PARTS", "LIMIT_PARTS", "REPLY_TTL_S", "Keys", "tagged", "untagged"]

BUDGET_PARTS = ("account", "held", "leases", "settled", "children")
"""The five keys of one ledger account, in the order its Lua scripts take them."""

LIMIT_PARTS = ("calls", "cost", "meta", "flight")
"""The four keys of one provider limit, in the order its Lua scripts take them."""

REPLY_TTL_S = 3600
"""A reply list (and a pipeline's hash left behind) expires this long after its last write:
every write to one sets it in the same round trip, since its host may be gone."""


def tagged(workflow_id: str) -> str:
    """``workflow_id`` with its root (the part before the first ``/``) as the hash tag.

    ``"nightly/review#2"`` becomes ``"{nightly}/review#2"``; ``"nightly"`` becomes
    ``"{nightly}"``.
    """
    root, sep, rest = workflow_id.partition("/")
    return f"{{{root}}}{sep}{rest}"


def untagged(text: str) -> str:
    """The workflow id :func:`tagged` made ``text`` from (``text`` as is if it is not tagged)."""
    if not text.startswith("{"):
        return text
    head, sep, rest = text[1:].partition("/")
    if not head.endswith("}"):
        return text
    return f"{head[:-1]}{sep}{rest}"


_TAG = r"\{[^{}]*\}"
_ANY = r".+"
_SHAPES = {
    "budget": rf"{_TAG}:(?:{'|'.join(BUDGET_PARTS)})",
    "journal": rf"{_TAG}(?:/.*)?",
    "events": _TAG,
    "deltas": _TAG,
    "workflow": _TAG,
    "asks": _TAG,
    "steps": _TAG,
    "cancel": _ANY,
    "lease": _ANY,
    "result": r"[^:]+:.+",
    "reply": _ANY,
    "pipe": _ANY,
    "limit": rf".+:(?:{'|'.join(LIMIT_PARTS)})",
    "endpoint": r"[0-9a-f]{24}:width",
}
"""What follows ``P:NAMESPACE:`` in each namespace (a regular expression)."""


class Keys:
    """The Redis key layout of one fleet (host, workers and tools), under one prefix.

    Args:
        prefix: the fleet's key prefix (``key_prefix``).
    """

    NAMESPACES = tuple(_SHAPES)
    """Every namespace fleet writes under its prefix."""

    def __init__(self, prefix: str = "fleet") -> None:
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    def head(self, namespace: str) -> str:
        """``P:NAMESPACE:``, what every key of ``namespace`` starts with (for ``SCAN``)."""
        return f"{self.prefix}:{namespace}:"

    def pattern(self) -> re.Pattern[str]:
        """A regular expression that matches every key fleet writes under this prefix."""
        shapes = "|".join(f"{name}:(?:{shape})" for name, shape in _SHAPES.items())
        return re.compile(rf"{re.escape(self.prefix)}:(?:{shapes})", re.DOTALL)

    # ------------------------------------------------------- a workflow's (hash-tagged)

    def budget(self, account: str) -> tuple[str, ...]:
        """The five keys of a ledger account (:data:`BUDGET_PARTS`, in order)."""
        base = f"{self.prefix}:budget:{tagged(account)}"
        return tuple(f"{base}:{part}" for part in BUDGET_PARTS)

    def journal(self, workflow_id: str) -> str:
        """A journal (a phase's: ``ROOT/PHASE``), tagged by its root."""
        return f"{self.prefix}:journal:{tagged(workflow_id)}"

    def events(self, root_id: str) -> str:
        """A workflow's event stream."""
        return f"{self.prefix}:events:{tagged(root_id)}"

    def deltas(self, root_id: str) -> str:
        """A workflow's output deltas: a capped, expiring stream (see :mod:`fleet.deltas`).

        ``deltas("")`` is the prefix every delta stream starts with.
        """
        if not root_id:
            return self.head("deltas")
        return f"{self.prefix}:deltas:{tagged(root_id)}"

    def workflow(self, root_id: str) -> str:
        """The cancel board's record of the latest run of ``root_id`` (a hash)."""
        return f"{self.prefix}:workflow:{tagged(root_id)}"

    def asks(self, root_id: str) -> str:
        """The hash holding ``root_id``'s asks."""
        return f"{self.prefix}:asks:{tagged(root_id)}"

    def steps(self, owner: str) -> str:
        """The step record of a workflow (``owner``: its root id) or of a bare round (its nonce).

        One hash for every step the owner dispatches, so what exactly-once needs after a
        step's result has been read costs a field, not a key: ``done:{tid}`` a journaled
        success (for a resumed host, until its round ends), ``ran:{tid}`` the nonce of a
        dispatch whose result the host read (until its round ends), ``over:{nonce}`` a
        round that ended. A workflow's record expires with its retention
        (:mod:`fleet.retention`); a bare round's ``result_expires_s`` after its end.
        """
        return f"{self.prefix}:steps:{tagged(owner)}"

    # ------------------------------------------------------------- a step's and a host's

    def cancel(self, marker: str) -> str:
        """A cancel marker: its presence cancels every step that names it.

        It holds JSON with a ``reason`` (see :mod:`fleet.cancel.markers`);
        ``cancel("")`` is the prefix every marker starts with.
        """
        return f"{self.prefix}:cancel:{marker}"

    def lease(self, tid: str) -> str:
        """A worker's claim on a running step (``SET NX PX``, renewed while it runs)."""
        return f"{self.prefix}:lease:{tid}"

    def result(self, tid: str, nonce: str) -> str:
        """The outcome of one dispatch: every duplicate of that dispatch is served it."""
        return f"{self.prefix}:result:{tid}:{nonce}"

    def reply(self, name: str) -> str:
        """A host's reply list (``reply("")`` is the prefix every reply list starts with)."""
        return f"{self.prefix}:reply:{name}"

    def pipe(self, pipe: str) -> str:
        """A pipeline run's hash: its context and items."""
        return f"{self.prefix}:pipe:{pipe}"

    # ---------------------------------------------------------------- provider limits

    def limit(self, name: str) -> tuple[str, ...]:
        """The four keys of provider limit ``name`` (:data:`LIMIT_PARTS`, in order)."""
        base = f"{self.prefix}:limit:{name}"
        return tuple(f"{base}:{part}" for part in LIMIT_PARTS)

    def endpoint_width(self, endpoint: str) -> str:
        """An endpoint's learned width (a digest: no URL in a key name)."""
        digest = hashlib.sha256(endpoint.encode()).hexdigest()[:24]
        return f"{self.prefix}:endpoint:{digest}:width"
