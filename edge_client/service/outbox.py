"""SQLite outbox: an update is written durably BEFORE it is published and deleted only on PUBACK.

The outbox shares the state database (`StateStore.db`), so "this round's update is queued" and "the data
pointer moved past this round's batches" commit in one transaction (`StateStore.finish_training`).
After a crash every row still here is published again; the coordinator dedupes on (client, round,
msg_id), so a re-send never counts twice. paho's in-flight resend covers reconnects within one process;
`due()` re-publishes rows that were never sent by this process or not PUBACKed for `resend_after_s`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

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
    UNIQUE (round, msg_id)
);
"""


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


class Outbox:
    """Rows of queued messages plus, in memory, which paho mids carry which row."""

    def __init__(self, db: sqlite3.Connection, resend_after_s: float = 30.0) -> None:
        self.db = db
        self.resend_after_s = resend_after_s
        self._mid_to_row: dict[int, int] = {}
        self._sent_at: dict[int, float] = {}  # row id -> monotonic time of the last publish
        db.executescript(SCHEMA)

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
        cur = self.db.execute("SELECT id, round, msg_id, topic, qos, payload FROM outbox ORDER BY id")
        return [OutboxRow(int(i), int(r), to_u64(int(m)), str(t), int(q), bytes(p)) for i, r, m, t, q, p in cur]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def due(self, now: float | None = None) -> list[OutboxRow]:
        """Rows to publish now: never sent by this process, or sent more than resend_after_s ago."""
        now = time.monotonic() if now is None else now
        return [r for r in self.rows() if now - self._sent_at.get(r.id, -1e18) >= self.resend_after_s]

    def sent(self, row: OutboxRow, mid: int, now: float | None = None) -> None:
        self._mid_to_row[mid] = row.id
        self._sent_at[row.id] = time.monotonic() if now is None else now

    def acked(self, mid: int) -> OutboxRow | None:
        """PUBACK for `mid`: delete its row (committed at once); None when the mid is not an outbox row."""
        row_id = self._mid_to_row.pop(mid, None)
        if row_id is None:
            return None
        cur = self.db.execute("SELECT id, round, msg_id, topic, qos, payload FROM outbox WHERE id = ?", (row_id,))
        found = cur.fetchone()
        self.db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))  # autocommit: durable on return
        self._sent_at.pop(row_id, None)
        for m in [m for m, r in self._mid_to_row.items() if r == row_id]:
            del self._mid_to_row[m]  # other publishes of the same row are moot now
        if found is None:
            return None
        i, r, m, t, q, p = found
        return OutboxRow(int(i), int(r), to_u64(int(m)), str(t), int(q), bytes(p))
