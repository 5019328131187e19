"""The cluster inbox: what coordinator workers ingested, in one PostgreSQL table, read by the leader in id order.

Every worker (coordinator/workers.py) turns its share of the device messages into inbox rows: the
intake decision (coordinator/intake.py `admit`: parse, drop, decode, validate) stored as a row
(`row_of`). That is the boundary: a row holds the validated message's fields (msgpack, in field order),
the reject the single coordinator counts (reason, ErrorCode, detail, whether the client gets an
ErrorMsg), or a drop (reason, no code), with the payload size the metrics count. The leader turns a row
back into the same decision (`InboxRow.decision()`, the message rebuilt without validating again) and
feeds it as the single coordinator does: the same actions, the same counters.

    CREATE TABLE inbox (id BIGSERIAL PRIMARY KEY, client, kind, body BYTEA, reason, code, detail, reply, nbytes, ...)

Order: ids are taken and committed in the same order (`append` holds a per-fleet transaction-scoped
advisory lock), so a reader that saw id n has seen every row below n. Without it, a batch with smaller
ids committing after a larger one would be skipped by a leader that already moved past them.

Delivery: a worker acks its MQTT messages only after `append` committed (the rows are durable); the
leader writes its position (`meta.inbox_done`) in the same transaction as the records of the rows it fed
the round book, and `forget`s the rows up to it afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from coordinator.ingest import Reject
from coordinator.intake import INBOUND, Admitted, Decision, Dropped, Rejected
from coordinator.logstore import lock_key, pg_create_schema, redact_url
from shared.messages import ErrorCode, Message

log = logging.getLogger(__name__)

_FIELDS = {kind: tuple(f.name for f in dataclasses.fields(cls)) for kind, cls in INBOUND.items()}

_DDL = """CREATE TABLE IF NOT EXISTS inbox (
    id BIGSERIAL PRIMARY KEY,
    client TEXT NOT NULL,               -- from the topic ('?' when the topic did not parse)
    kind TEXT NOT NULL,                 -- up | join | hb | status | sync, or the topic of a reject
    body BYTEA,                         -- msgpack list of the message's fields (NULL: a reject)
    reason TEXT, code INTEGER, detail TEXT, reply BOOLEAN,   -- the reject (NULL: a message); code NULL: a drop
    worker TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS nbytes INTEGER  -- payload bytes (NULL: the topic did not parse)
"""


@dataclass(frozen=True)
class InboxRow:
    """One ingested message: `body` (validated fields), `reject` or `drop`, exactly one."""

    client: str
    kind: str
    body: bytes | None = None
    reject: Reject | None = None
    reply: bool = False  # a reject the client is told about (ErrorMsg), as the single coordinator does
    id: int = 0  # set when read back
    drop: str | None = None  # the reason of an intake.Dropped
    nbytes: int | None = 0  # the payload's size (None: the topic did not parse, counted nowhere)

    def decision(self) -> Decision:
        """The intake decision this row stores (the leader feeds it as the single pump feeds `admit`'s)."""
        if self.reject is not None:
            return Rejected(self.client, self.kind, self.reject, self.reply, self.nbytes)
        n = self.nbytes or 0
        if self.drop is not None:
            return Dropped(self.client, self.kind, self.drop, n)
        try:
            return Admitted(self.client, self.kind, self.message(), n)
        except ValueError as exc:  # a row another version wrote: counted as internal, the leader goes on
            return Rejected(self.client, self.kind, Reject("internal", ErrorCode.INTERNAL, str(exc)), False, n)

    def message(self) -> Message:
        """The message this row holds, rebuilt from its validated fields (no second validation)."""
        if self.body is None:
            raise ValueError(f"inbox row {self.id} is a reject, not a message")
        cls = INBOUND[self.kind]
        values = msgpack.unpackb(self.body, use_list=False, raw=False)
        names = _FIELDS[self.kind]
        if len(values) != len(names):
            raise ValueError(f"inbox row {self.id}: {len(values)} fields, {cls.__name__} has {len(names)}")
        msg = object.__new__(cls)
        msg.__dict__.update(zip(names, values, strict=True))  # frozen dataclass: built validated by the worker
        return msg


def row_of(d: Decision) -> InboxRow:
    """The row that stores an intake decision (a message as its validated fields, msgpack)."""
    if isinstance(d, Rejected):
        return InboxRow(d.client, d.kind, reject=d.reject, reply=d.reply, nbytes=d.nbytes)
    if isinstance(d, Dropped):
        return InboxRow(d.client, d.kind, drop=d.reason, nbytes=d.nbytes)
    body = msgpack.packb([getattr(d.message, n) for n in _FIELDS[d.kind]], use_bin_type=True)
    return InboxRow(d.client, d.kind, body=body, nbytes=d.nbytes)


class Inbox:
    """The `inbox` table on its own PostgreSQL connection (each worker has one; the leader reads through its own)."""

    def __init__(self, url: str, fleet: str, worker: str) -> None:
        import psycopg

        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cluster inbox {redact_url(url)}: cannot connect: {str(exc).strip()}") from exc
        self.worker = worker
        self._order_key = lock_key("inbox", fleet)
        pg_create_schema(self.db, _DDL, "inbox")  # every worker runs it, possibly at the same moment

    def append(self, rows: Sequence[InboxRow]) -> None:
        """Write `rows` in ONE transaction and commit (ids taken and committed in order, see the module doc)."""
        if not rows:
            return
        now = time.time()
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (self._order_key,))
            with self.db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO inbox(client, kind, body, reason, code, detail, reply, worker, received_at, nbytes) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [_row_args(r, self.worker, now) for r in rows],
                )

    def after(self, position: int, limit: int) -> list[InboxRow]:
        """Up to `limit` rows with id > position, in id order."""
        cur = self.db.execute(
            "SELECT id, client, kind, body, reason, code, detail, reply, nbytes FROM inbox WHERE id > %s "
            "ORDER BY id LIMIT %s",
            (position, limit),
        )
        out = []
        for rid, client, kind, body, reason, code, detail, reply, nbytes in cur.fetchall():
            rej = None if reason is None or code is None else Reject(str(reason), ErrorCode(code), str(detail))
            drop = str(reason) if reason is not None and code is None else None
            out.append(InboxRow(client, kind, None if body is None else bytes(body), rej, bool(reply), int(rid), drop,
                                None if nbytes is None else int(nbytes)))  # fmt: skip
        return out

    def forget(self, upto: int) -> int:
        """Delete the rows the leader consumed (id <= upto, its committed position); returns how many."""
        return int(self.db.execute("DELETE FROM inbox WHERE id <= %s", (upto,)).rowcount)

    def pending(self, position: int) -> int:
        row = self.db.execute("SELECT count(*) FROM inbox WHERE id > %s", (position,)).fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        self.db.close()


def _row_args(r: InboxRow, worker: str, now: float) -> tuple[Any, ...]:
    j = r.reject
    return (
        r.client, r.kind, r.body, r.drop if j is None else j.reason, None if j is None else int(j.code),
        None if j is None else j.detail, r.reply, worker, now, r.nbytes,
    )  # fmt: skip
