"""SQLite outbox: an update is written durably BEFORE it is published, and kept until its round is over.

The outbox shares the state database (`StateStore.db`), so "this round's update is queued" and "the data
pointer moved past this round's batches" commit in one transaction (`StateStore.finish_training`).

A row's life:
- `add` (inside the caller's transaction)            -> pending: `due()` publishes it
- PUBACK of any of its publishes (`acked(mid)`)       -> acked: not published again while connected
- reconnect (`reconnected()`), or process restart     -> pending again: published once more
- the round's result applied (`prune(round)`)         -> deleted
A broker PUBACK only says the BROKER holds the message; a broker that crashes before persisting it
would lose it. Re-publishing after every reconnect until the round's result arrives closes that gap;
the coordinator dedupes on (client, round, msg_id), so a re-send never counts twice. Within one
connection `due()` also re-publishes a pending row not PUBACKed after `resend_after_s`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,          -- u64 stored as signed i64 (two's complement)
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0, -- 1 after a PUBACK on the current connection
    UNIQUE (round, msg_id)
);
"""
_COLS = "id, round, msg_id, topic, qos, payload, acked"


def to_i64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def to_u64(i: int) -> int:
    return i + (1 << 64) if i < 0 else i


@dataclass(frozen=True)
class OutboxRow:
    id: int
    round: int
    msg_id: int
    topic: str
    qos: int
    payload: bytes
    acked: bool = False


def _row(r: tuple[int, int, int, str, int, bytes, int]) -> OutboxRow:
    i, rnd, m, t, q, p, a = r
    return OutboxRow(int(i), int(rnd), to_u64(int(m)), str(t), int(q), bytes(p), bool(a))


class Outbox:
    """Rows of queued updates plus, in memory, which paho mids carry which row."""

    def __init__(self, db: sqlite3.Connection, resend_after_s: float = 30.0, *, writable: bool = True) -> None:
        self.db = db
        self.resend_after_s = resend_after_s
        self._mid_to_row: dict[int, OutboxRow] = {}
        self._sent_at: dict[int, float] = {}  # row id -> monotonic time of the last publish
        if writable:  # (a read-only StateStore only lists rows)
            db.executescript(SCHEMA)
            self.reconnected()  # a restart is a reconnect: every row is published again

    def add(self, round: int, msg_id: int, topic: str, payload: bytes, qos: int = 1) -> int:
        """Insert inside the caller's transaction; returns the row id (idempotent on (round, msg_id))."""
        self.db.execute(
            "INSERT OR IGNORE INTO outbox (round, msg_id, topic, qos, payload, created) VALUES (?,?,?,?,?,?)",
            (round, to_i64(msg_id), topic, qos, payload, time.time()),
        )
        row = self.db.execute(
            "SELECT id FROM outbox WHERE round = ? AND msg_id = ?", (round, to_i64(msg_id))
        ).fetchone()
        return int(row[0])

    def rows(self) -> list[OutboxRow]:
        return [_row(r) for r in self.db.execute(f"SELECT {_COLS} FROM outbox ORDER BY id")]

    def pending(self) -> int:
        """Rows not PUBACKed on this connection."""
        return int(self.db.execute("SELECT COUNT(*) FROM outbox WHERE acked = 0").fetchone()[0])

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def due(self, now: float | None = None) -> list[OutboxRow]:
        """Pending rows to publish now: never sent on this connection, or sent resend_after_s ago."""
        now = time.monotonic() if now is None else now
        return [
            r for r in self.rows()
            if not r.acked and now - self._sent_at.get(r.id, -1e18) >= self.resend_after_s
        ]  # fmt: skip

    def sent(self, row: OutboxRow, mid: int, now: float | None = None) -> None:
        self._mid_to_row[mid] = row
        self._sent_at[row.id] = time.monotonic() if now is None else now

    def acked(self, mid: int) -> OutboxRow | None:
        """PUBACK for `mid`: mark its row acked (committed at once) and return it; None for other mids.

        The row may already be gone (its round's result was applied first): it is returned all the same."""
        row = self._mid_to_row.pop(mid, None)
        if row is None:
            return None
        self.db.execute("UPDATE outbox SET acked = 1 WHERE id = ?", (row.id,))  # autocommit: durable on return
        self._sent_at.pop(row.id, None)
        for m in [m for m, r in self._mid_to_row.items() if r.id == row.id]:
            del self._mid_to_row[m]  # other publishes of the same row are moot now
        return replace(row, acked=True)

    def reconnected(self) -> None:
        """A new connection: the broker may have lost what it acked; make every row due again."""
        self.db.execute("UPDATE outbox SET acked = 0 WHERE acked = 1")
        self._sent_at.clear()
        self._mid_to_row.clear()

    def discard(self, round: int) -> int:
        """Delete the rows of `round` now (autocommit): the coordinator refused that update for good
        (UNKNOWN_ROUND, CONFLICT, STALE_ROUND ...), so re-sending it can only be refused again."""
        cur = self.db.execute("DELETE FROM outbox WHERE round = ?", (round,))
        for m in [m for m, r in self._mid_to_row.items() if r.round == round]:
            self._sent_at.pop(self._mid_to_row.pop(m).id, None)  # a late PUBACK of it is then ignored
        return int(cur.rowcount)

    def prune(self, upto_round: int) -> int:
        """Delete rows of rounds <= upto_round (their result is applied); call inside a transaction."""
        cur = self.db.execute("DELETE FROM outbox WHERE round <= ?", (upto_round,))
        return int(cur.rowcount)
