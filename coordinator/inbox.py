"""The cluster inbox: what coordinator workers ingested, in one PostgreSQL table, read by the leader in id order.

Every worker (coordinator/workers.py) turns its share of the device messages into inbox rows: it parses
the topic (the client id comes from it), drops retained messages unread, decodes and validates. That is
the boundary: a row holds either the validated message's fields (msgpack, in field order) or the reject
the single coordinator would have counted (reason, ErrorCode, detail, whether the client gets an
ErrorMsg). The leader rebuilds the message from its fields without validating again (`message()`).

    CREATE TABLE inbox (id BIGSERIAL PRIMARY KEY, client, kind, body BYTEA, reason, code, detail, reply, ...)

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

from coordinator.ingest import Reject, decode_reject
from coordinator.logstore import lock_key, pg_create_schema, redact_url
from coordinator.server import INBOUND, NO_RETAIN
from shared.codec import DecodeError, decode
from shared.messages import ErrorCode, Message
from shared.mqtt import Incoming
from shared.topics import Topics

log = logging.getLogger(__name__)

_FIELDS = {kind: tuple(f.name for f in dataclasses.fields(cls)) for kind, cls in INBOUND.items()}

_DDL = """CREATE TABLE IF NOT EXISTS inbox (
    id BIGSERIAL PRIMARY KEY,
    client TEXT NOT NULL,               -- from the topic ('?' when the topic did not parse)
    kind TEXT NOT NULL,                 -- up | join | hb | status | sync, or the topic of a reject
    body BYTEA,                         -- msgpack list of the message's fields (NULL: a reject)
    reason TEXT, code INTEGER, detail TEXT, reply BOOLEAN,   -- the reject (NULL: a message)
    worker TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
)"""


@dataclass(frozen=True)
class InboxRow:
    """One ingested message: `body` (validated fields) or `reject`, never both."""

    client: str
    kind: str
    body: bytes | None = None
    reject: Reject | None = None
    reply: bool = False  # a reject the client is told about (ErrorMsg), as the single coordinator does
    id: int = 0  # set when read back

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


def admit(topics: Topics, msg: Incoming) -> InboxRow | None:
    """The row for one incoming MQTT message, or None when it is dropped unread (a retained message on a
    topic that is never retained; a retained status being cleared): the single coordinator's `_feed`."""
    try:
        kind, arg = topics.parse(msg.topic)
    except ValueError as exc:
        return InboxRow("?", msg.topic, reject=Reject("bad_topic", ErrorCode.INTERNAL, str(exc)))
    client = str(arg)
    if kind == "status" and not msg.payload:
        return None
    if kind not in INBOUND:
        return InboxRow(client, kind, reject=Reject("bad_topic", ErrorCode.INTERNAL, f"{kind} is not for the coordinator"))
    if msg.retain and kind in NO_RETAIN:
        log.warning("retained message on %s dropped unread (%d bytes)", msg.topic, len(msg.payload))
        return None
    try:
        m = decode(msg.payload, INBOUND[kind], client=client)
    except DecodeError as exc:
        return InboxRow(client, kind, reject=decode_reject(exc), reply=kind in ("up", "join", "sync"))
    body = msgpack.packb([getattr(m, n) for n in _FIELDS[kind]], use_bin_type=True)
    return InboxRow(client, kind, body=body)


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
                    "INSERT INTO inbox(client, kind, body, reason, code, detail, reply, worker, received_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [_row_args(r, self.worker, now) for r in rows],
                )

    def after(self, position: int, limit: int) -> list[InboxRow]:
        """Up to `limit` rows with id > position, in id order."""
        cur = self.db.execute(
            "SELECT id, client, kind, body, reason, code, detail, reply FROM inbox WHERE id > %s ORDER BY id LIMIT %s",
            (position, limit),
        )
        out = []
        for rid, client, kind, body, reason, code, detail, reply in cur.fetchall():
            rej = None if reason is None else Reject(str(reason), ErrorCode(code), str(detail))
            out.append(InboxRow(client, kind, None if body is None else bytes(body), rej, bool(reply), int(rid)))
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
        r.client, r.kind, r.body, None if j is None else j.reason, None if j is None else int(j.code),
        None if j is None else j.detail, r.reply, worker, now,
    )  # fmt: skip
