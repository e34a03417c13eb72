"""Redis Cluster hash tags for the keys of one workflow.

Redis Cluster puts a key in the slot of the text between its first ``{`` and the next
``}``. fleet wraps a workflow's root id in braces in every key that belongs to it, so the
keys of one workflow land in one slot and a Lua script over them stays cluster-safe:

==========================================  =============================================
``{p}:budget:{A}:account`` (and 4 more)     the ledger's keys of account ``A`` (a workflow's
                                            own account is its workflow id)
``{p}:journal:{ROOT}/PHASE``                a phase's journal (``ROOT/PHASE`` is its id)
``{p}:events:{ROOT}``                       the run's event stream
``{p}:deltas:{ROOT}``                       the run's output deltas (capped, expiring)
``{p}:workflow:{ROOT}``                     the run record of the cancel board
``{p}:asks:{ROOT}``                         the run's asks and answers (:mod:`fleet.asks`)
==========================================  =============================================

A reservation under ancestor accounts (a team's budget above the workflow's) touches the
keys of several accounts in one script, so it spans slots by nature (docs/RELIABILITY.md,
"Redis Cluster").
"""

from __future__ import annotations

__all__ = ["tagged", "untagged"]


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
