"""``fleet gc``: prune what ended workflows left in Redis, and abandoned ones when told to.

Retention (:mod:`fleet.retention`) sets the expiry of an ended workflow's records when it
ends. What escapes it is pruned here: a run whose end could not reach Redis, a record a
late worker wrote after the end (a settle, a journal write), workflows that ended before
retention existed, and — only with ``older_than_s`` — workflows that never ended (their
host died, or stopped without finishing) and have been idle that long.

How it works, safe while the fleet runs:

* ``SCAN MATCH {prefix}:*`` in batches (never ``KEYS``, never ``FLUSH*``); only keys of
  the namespaces a workflow owns (:func:`~fleet.retention.workflow_keys`) under exactly
  this prefix are considered, grouped by root id;
* a root with nothing but budget keys is a shared account (``fleet budget set``), never
  touched, unless its ``account`` hash is gone (parts a late settle wrote after the
  workflow's account expired); an account others draw from (its ``children`` key
  exists) is never touched;
* a root's state comes from its run record (``{prefix}:workflow:{R}``), else from the
  ``end`` entry of its event stream; a running or closed run is left alone unless
  ``older_than_s`` is given and it shows no sign of life for that long: not in its run
  record's times (start, end, a heartbeat), not in its last event, not in any other of
  its keys (``OBJECT IDLETIME``, which gc's own reads leave alone);
* the delete of one root, and the restore of the expiry of an ended one within its
  retention, is one script that first checks the run record is still the one gc judged (a
  run that began again meanwhile is left alone), then deletes (``UNLINK``) or expires;
* a host's reply list or a pipeline's hash with no expiry (a push after its host had
  gone, by a worker older than the one-round-trip push) gets :data:`REPLY_TTL_S`: a live
  one always has an expiry, and its host deletes it as it reads it;
* an account's per-child breakdown (its ``children`` hash, ``t:W``/``u:W``) loses the
  fields of child workflows whose own account is gone (expired or pruned): the account's
  totals are in its ``account`` hash, so they stay right, and a team account above many
  runs stops growing with every run (``gc_children.lua``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .redis.keys import BUDGET_PARTS, REPLY_TTL_S, Keys, untagged
from .redis.scripts import script
from .retention import ENDED, OWNED_NAMESPACES

__all__ = ["LOOSE_NAMESPACES", "GcReport", "RootState", "collect", "parse_duration"]

NAMESPACES = OWNED_NAMESPACES
"""Key namespaces a workflow owns: those of :func:`fleet.retention.workflow_keys`."""

LOOSE_NAMESPACES = ("reply", "pipe")
"""A host's keys, not a workflow's: always written with an expiry; gc gives one to any
that has none (:data:`REPLY_TTL_S`)."""


@dataclass
class RootState:
    """What gc found of one root id."""

    root_id: str
    keys: list[str] = field(default_factory=list)
    run_id: str = ""
    status: str = ""
    """From the run record ('' = none), else the event stream's ``end`` entry."""
    touched_at: float = 0.0
    """The newest time in its run record (started, ended, a heartbeat)."""
    ended_at: float | None = None
    record: tuple[str, str] = ("", "")
    """The run record's ``(run, status)`` as read (``("", "")``: none): the delete checks it."""
    idle_s: float = 0.0
    """Seconds since any of its keys was touched (read before gc touched them)."""


@dataclass
class GcReport:
    """What one gc pass removed (or, in a dry run, would remove)."""

    dry_run: bool
    workflows: list[str] = field(default_factory=list)
    """Root ids whose records were removed."""
    abandoned: list[str] = field(default_factory=list)
    """Of those, the ones that had never ended."""
    keys: int = 0
    bytes: int = 0
    """``MEMORY USAGE`` of the removed keys, summed."""
    expiry_set: int = 0
    """Keys of ended workflows (within retention) that had lost their expiry and got it."""
    loose_expired: int = 0
    """Reply lists and pipeline hashes that had no expiry and got :data:`REPLY_TTL_S`."""
    children_pruned: int = 0
    """Fields of gone child workflows dropped from accounts' per-child breakdowns."""
    scanned: int = 0
    """Keys under the prefix looked at."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` as seconds.

    Raises:
        ValueError: anything else (the message shows the accepted forms).
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    body = text.strip().lower()
    scale = units.get(body[-1:], None)
    number = body[:-1] if scale is not None else body
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"duration {text!r} is not valid; use seconds or a number with s, m, h, d or w "
            "(e.g. 90, 15m, 7d)"
        )
    return value


def _root_of(key: str, head: str) -> tuple[str, str] | None:
    """``(namespace, id)`` of a workflow-owned key under ``head`` (``prefix:``), else ``None``."""
    if not key.startswith(head):
        return None
    namespace, _, rest = key[len(head) :].partition(":")
    if namespace not in NAMESPACES or not rest.startswith("{"):
        return None
    if namespace == "budget":
        account, _, part = rest.rpartition(":")
        return (namespace, untagged(account)) if part in BUDGET_PARTS else None
    return namespace, untagged(rest)


def _group(keys: Iterable[str], head: str) -> dict[str, RootState]:
    """Keys by root id; a journal goes to the longest root id it extends (``ROOT/PHASE``)."""
    roots: dict[str, RootState] = {}
    journals: list[tuple[str, str]] = []
    for key in keys:
        found = _root_of(key, head)
        if found is None:
            continue
        namespace, name = found
        if namespace == "journal":
            journals.append((key, name))
        else:
            roots.setdefault(name, RootState(name)).keys.append(key)
    for key, name in journals:
        owners = [root for root in roots if name.startswith(root + "/")]
        owner = max(owners, key=len) if owners else name.partition("/")[0]
        roots.setdefault(owner, RootState(owner)).keys.append(key)
    return roots


def _is_account_only(state: RootState, head: str) -> bool:
    return all(key.startswith(f"{head}budget:") for key in state.keys)


def _judge(client: Any, state: RootState, head: str) -> None:
    """Fill in the run id, status and times of ``state`` from its record or its stream."""
    record_key = next((k for k in state.keys if k.startswith(f"{head}workflow:")), None)
    if record_key is not None:
        fields = {
            k.decode(): v.decode(errors="replace") for k, v in client.hgetall(record_key).items()
        }
        state.run_id, state.status = fields.get("run", ""), fields.get("status", "")
        state.record = (state.run_id, state.status)
        times = [_number(v) for k, v in fields.items() if k not in ("run", "status", "reason")]
        state.touched_at = max((t for t in times if t is not None), default=0.0)
        state.ended_at = _number(fields.get("ended"))
    stream = next((k for k in state.keys if k.startswith(f"{head}events:")), None)
    if stream is None:
        return
    last = client.xrevrange(stream, count=1)
    if not last:
        return
    entry_id, raw = last[0]
    # A stream entry's id starts with the millisecond it was added.
    added = int(entry_id.split(b"-")[0]) / 1000
    state.touched_at = max(state.touched_at, added)
    if record_key is not None:
        return
    entry = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    if entry.get("control") == "end" and entry.get("status") in ENDED:
        state.status, state.ended_at = entry["status"], _number(entry.get("at")) or added


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _idle_s(client: Any, keys: list[str], head: str) -> float:
    """Seconds since any of ``keys`` was last touched (``OBJECT IDLETIME``).

    The run record and the event stream are left out: gc reads them, which touches them
    (their own times say when the run was last active).
    """
    pipe = client.pipeline(transaction=False)
    read = (f"{head}workflow:", f"{head}events:")
    others = [key for key in keys if not key.startswith(read)]
    if not others:
        return float("inf")
    for key in others:
        pipe.object("idletime", key)
    idle = [value for value in pipe.execute(raise_on_error=False) if isinstance(value, int)]
    return float(min(idle)) if idle else 0.0


def _shared_accounts(client: Any, state: RootState, head: str) -> list[str]:
    """The budget keys of ``state`` that belong to an account others draw from."""
    children = [k for k in state.keys if k.startswith(f"{head}budget:") and k.endswith(":children")]
    shared: list[str] = []
    for key in children:
        if client.exists(key):
            base = key.removesuffix("children")
            shared.extend(f"{base}{part}" for part in BUDGET_PARTS)
    return shared


def collect(
    client: Any,
    *,
    key_prefix: str,
    retention_s: float,
    older_than_s: float | None = None,
    dry_run: bool = False,
    batch: int = 500,
    now: float | None = None,
) -> GcReport:
    """One gc pass over the keys under ``key_prefix`` (see the module docstring).

    Args:
        client: a blocking ``redis.Redis`` (one server, or a Sentinel master).
        key_prefix: the fleet's key prefix; no other key is ever touched.
        retention_s: how long an ended workflow is kept after its end.
        older_than_s: also prune workflows that never ended, idle this long (``None``: never).
        dry_run: remove nothing; report what would go.
        batch: ``SCAN COUNT`` hint and keys per round trip.
        now: the current time (seconds since the epoch), for tests.
    """
    named = Keys(key_prefix)
    head = f"{key_prefix}:"
    pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in head) + "*"
    keys = []
    for raw in client.scan_iter(match=pattern, count=batch):
        keys.append(raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))
    report = GcReport(dry_run=dry_run, scanned=len(keys))
    now = time.time() if now is None else now
    prune = script("gc_prune")
    for state in _group(keys, head).values():
        if _is_account_only(state, head):
            account = named.budget(state.root_id)[0]
            if account not in state.keys:  # parts a late settle left after the account went
                _remove(client, prune, state, state.keys, report, guard=account, orphan=True)
            continue
        if older_than_s is not None:
            state.idle_s = _idle_s(client, state.keys, head)
        _judge(client, state, head)
        keep = set(_shared_accounts(client, state, head))
        owned = [k for k in state.keys if k not in keep]
        if state.status in ENDED:
            ended = state.ended_at if state.ended_at is not None else state.touched_at
            left = ended + retention_s - now
            if left > 0:
                if not dry_run:
                    report.expiry_set += _restore_expiry(client, state, owned, left, named)
                continue
            abandoned = False
        else:
            if older_than_s is None:
                continue
            idle = now - max(state.touched_at, now - state.idle_s)
            if idle < older_than_s:
                continue
            abandoned = True
        record = named.workflow(state.root_id)
        _remove(client, prune, state, owned, report, abandoned=abandoned, guard=record)
    if not dry_run:  # after the removals: the fields of a workflow removed above go too
        report.loose_expired = _expire_loose(client, keys, head, batch)
        report.children_pruned = _prune_children(client, named, keys, head, batch)
    return report


def _restore_expiry(
    client: Any, state: RootState, keys: list[str], left_s: float, named: Keys
) -> int:
    """Give the keys among ``keys`` that have no expiry the ``left_s`` their workflow has left.

    Only while the run record is still the ended one gc judged (``gc_restore.lua``): a run
    that began again meanwhile keeps its records without an expiry.
    """
    guard = named.workflow(state.root_id)
    args = [*state.record, max(int(left_s), 1)]
    touched = int(script("gc_restore")(client, [guard, *keys], args))
    return max(touched, 0)


def _expire_loose(client: Any, keys: list[str], head: str, batch: int) -> int:
    """Give every reply list and pipeline hash without an expiry :data:`REPLY_TTL_S`."""
    loose = [key for key in keys if key.startswith(tuple(f"{head}{n}:" for n in LOOSE_NAMESPACES))]
    expired = 0
    for start in range(0, len(loose), batch):
        chunk = loose[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.ttl(key)
        missing = [key for key, ttl in zip(chunk, pipe.execute(), strict=True) if ttl == -1]
        for key in missing:
            pipe.expire(key, REPLY_TTL_S)
        expired += sum(bool(done) for done in pipe.execute())
    return expired


def _prune_children(client: Any, named: Keys, keys: list[str], head: str, batch: int) -> int:
    """Drop the fields of child workflows whose account is gone from every ``children`` hash."""
    pruned = 0
    prune = script("gc_children")
    for key in keys:
        if not (key.startswith(f"{head}budget:") and key.endswith(":children")):
            continue
        children: dict[str, None] = {}
        for raw, _value in client.hscan_iter(key, count=batch):
            name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            children[name.partition(":")[2]] = None
        ids = list(children)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            accounts = [named.budget(child)[0] for child in chunk]
            pruned += int(prune(client, [key, *accounts], chunk))
    return pruned


def _remove(
    client: Any,
    prune: Any,
    state: RootState,
    keys: list[str],
    report: GcReport,
    *,
    guard: str,
    abandoned: bool = False,
    orphan: bool = False,
) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
    sizes = [
        size or 0 for size in pipe.execute(raise_on_error=False) if not isinstance(size, Exception)
    ]
    if report.dry_run:
        removed = len(keys)
    else:
        args = [*state.record, "orphan" if orphan else ""]
        removed = int(prune(client, [guard, *keys], args))
        if removed < 0:  # the run began again meanwhile: not ours to remove
            return
    report.workflows.append(state.root_id)
    if abandoned:
        report.abandoned.append(state.root_id)
    report.keys += removed
    report.bytes += sum(sizes)
