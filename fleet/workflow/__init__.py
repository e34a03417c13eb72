"""The workflow facade: the verbs a program is written in, durable phases and live events.

A :class:`Workflow` wraps one executor with the grammar (``agent``, ``parallel``,
``phase``, ``pipeline``, ``loop``, ``log``) and an event bus::

    store = open_store("sqlite:.fleet/journal.db")
    workflow = Workflow.builder(executor).with_store(store).with_root_id("nightly").build()
    async with workflow:                      # finish() on success
        drafts = await workflow.phase("draft", specs)
        reviews = await workflow.phase("review", review_specs(drafts))

With a store, each phase is journaled under ``"{root_id}/{name}"`` and stays journaled
until the workflow finishes, so running the same program again with the same root id
after a crash serves every completed step from the journal instead of re-running it.

Events (:data:`fleet.events.WorkflowEvent`) go to every in-process subscriber and,
when configured, to a capped Redis stream ``{key_prefix}:events:{root_id}`` that another
process can follow (``fleet watch ROOT_ID``). Delivery never blocks the workflow: a
subscriber that falls behind loses its oldest events and is told how many
(:class:`Lagged`).

The package, by responsibility:

- :mod:`fleet.workflow.facade`: :class:`Workflow` (its handles and properties,
  ``subscribe``, ``log``) and :class:`WorkflowBuilder`;
- :mod:`fleet.workflow.verbs`: the verbs (``agent``, ``parallel``, ``phase``, ``pipeline``,
  ``loop``, ``ask``) and the ``budget_exhausted`` report after each;
- :mod:`fleet.workflow.lifecycle`: how a run begins, watches its cancel board, is
  cancelled, and finishes or closes;
- :mod:`fleet.workflow.run`: :class:`~fleet.workflow.run.WorkflowRun`, the state every
  handle on one run shares.
"""

from ..errors import WorkflowClosedError
from ..eventbus import (
    DEFAULT_DELTA_SUBSCRIBER_CAPACITY,
    DEFAULT_SUBSCRIBER_CAPACITY,
    Lagged,
    Subscription,
    event_stream_key,
)
from .facade import Workflow, WorkflowBuilder

__all__ = [
    "DEFAULT_DELTA_SUBSCRIBER_CAPACITY",
    "DEFAULT_SUBSCRIBER_CAPACITY",
    "Lagged",
    "Subscription",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowClosedError",
    "event_stream_key",
]
