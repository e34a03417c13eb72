"""A ledger in a SQLite file: shared accounts on the embedded default, without Redis.

The embedded default keeps its journal in ``.fleet/journal.db``; its budget ledger lives
beside it, in ``.fleet/ledger.db`` (:func:`ledger_path_for`). ``fleet budget set
team:x --usd 1`` writes an account there, and ``fleet run --account team:x`` reserves
from it, from any number of processes on the machine.

The rules are :class:`~fleet.ledgers.MemoryLedger`'s, applied to accounts loaded from
the file and written back in one ``BEGIN IMMEDIATE`` transaction per operation, so a
reservation across a workflow and its ancestors is atomic across processes too. Leases
are kept in wall-clock seconds, since they outlive the process that took them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BudgetError
from ..sqlite_file import connect, write_transaction
from .memory import MemoryLedger, _Account, _Held

__all__ = ["SQLiteLedger", "ledger_path_for"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS fleet_ledger (account TEXT PRIMARY KEY, data TEXT NOT NULL)"


def ledger_path_for(journal: str | Path) -> Path:
    """The ledger file beside a SQLite journal file: ``ledger.db`` in its directory."""
    return Path(journal).parent / "ledger.db"


def _dump(account: _Account) -> str:
    return json.dumps(
        {
            "limit": [account.limit, account.limit_set],
            "limit_micros": [account.limit_micros, account.limit_micros_set],
            "consumed": [account.consumed, account.consumed_micros],
            "parents": list(account.parents),
            "held": {
                rid: [h.tokens, h.micros, h.holder, h.expires] for rid, h in account.held.items()
            },
            "settled": sorted(account.settled),
            "children": account.children,
        }
    )


def _load(text: str) -> _Account:
    data: dict[str, Any] = json.loads(text)
    held = {
        rid: _Held(int(t), int(m), str(who), float(e))
        for rid, (t, m, who, e) in data["held"].items()
    }
    return _Account(
        limit=data["limit"][0],
        limit_set=bool(data["limit"][1]),
        limit_micros=data["limit_micros"][0],
        limit_micros_set=bool(data["limit_micros"][1]),
        consumed=int(data["consumed"][0]),
        consumed_micros=int(data["consumed"][1]),
        reserved=sum(h.tokens for h in held.values()),
        reserved_micros=sum(h.micros for h in held.values()),
        parents=tuple(data["parents"]),
        held=held,
        settled=set(data["settled"]),
        children={wid: [int(t), int(m)] for wid, (t, m) in data["children"].items()},
    )


class SQLiteLedger(MemoryLedger):
    """Budget accounts in a SQLite file, shared by every process on the machine.

    Args:
        path: the file (created with its directory when missing).
        busy_timeout_s: how long an operation waits for another process's transaction.

    Raises:
        BudgetError: the file cannot be opened or is not a ledger.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self._db = connect(
                self.path, schema=_SCHEMA, busy_timeout_s=busy_timeout_s, synchronous="NORMAL"
            )
        except (OSError, sqlite3.Error) as error:
            raise BudgetError(
                f"cannot open the budget ledger {str(self.path)!r} ({error}); check the path "
                "beside the journal (--store) and its permissions"
            ) from None
        self._loaded: set[str] = set()

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    def _clock(self) -> float:
        return time.time()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with super()._transaction():
            self._accounts, self._loaded = {}, set()
            with write_transaction(self._db):
                yield
                self._save()

    def _account(self, account_id: str) -> _Account:
        if account_id not in self._accounts and account_id not in self._loaded:
            self._loaded.add(account_id)
            row = self._db.execute(
                "SELECT data FROM fleet_ledger WHERE account = ?", (account_id,)
            ).fetchone()
            if row is not None:
                self._accounts[account_id] = _load(row[0])
        return super()._account(account_id)

    def _forget(self, account_id: str) -> None:
        self._loaded.add(account_id)
        self._accounts.pop(account_id, None)

    def _save(self) -> None:
        for account_id in self._loaded - set(self._accounts):
            self._db.execute("DELETE FROM fleet_ledger WHERE account = ?", (account_id,))
        for account_id, account in self._accounts.items():
            if account == _Account():
                continue  # only looked at: nothing to keep
            self._db.execute(
                "INSERT OR REPLACE INTO fleet_ledger (account, data) VALUES (?, ?)",
                (account_id, _dump(account)),
            )

    async def close(self) -> None:
        """Close the file (the accounts stay in it)."""
        with self._lock:
            self._db.close()
