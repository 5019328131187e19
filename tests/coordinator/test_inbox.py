"""The cluster inbox (coordinator/inbox.py): what a worker admits, the message the leader rebuilds from a
row, and the table's order on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from coordinator.inbox import Inbox, InboxRow, row_of
from coordinator.intake import CLEARED, Dropped, Rejected, admit
from coordinator.logstore import lock_key
from shared.codec import decode, encode
from shared.messages import ErrorCode, Heartbeat, Join, Message, Status, SyncRequest, Update
from shared.mqtt import Incoming
from shared.topics import Topics

T = Topics("fleet1")
MSGS: list[tuple[str, Message]] = [
    ("up", Update(3, 2**64 - 1, (0.5, -1.25e-7, 3.0), 10, 0xDEADBEEF, 0.75)),
    ("join", Join("", "ab" * 32, "0123abcd" * 2, 12, 1.5, {"cpu": True, "quant": "nf4", "n": 3}, -1)),
    ("hb", Heartbeat("", 1.7e9, 12.5, 300 << 20, None, 51.5, None, 0.4, 400 << 20, 2, 1, 0.5, 0.75, 64)),
    ("status", Status("", True, 1.7e9)),
    ("sync", SyncRequest("", 7)),
]


def _in(topic: str, payload: bytes, retain: bool = False) -> Incoming:
    return Incoming(topic, payload, 1, 1, retain)


@pytest.mark.parametrize("kind,msg", MSGS, ids=[k for k, _ in MSGS])
def test_a_row_rebuilds_the_decoded_message(kind: str, msg: Message) -> None:
    topic = getattr(T, kind)("dev-1")
    row = row_of(admit(T, _in(topic, encode(msg))))
    assert row.reject is None and row.drop is None and row.nbytes == len(encode(msg)) and (row.client, row.kind) == ("dev-1", kind)
    want = decode(encode(msg), type(msg), client="dev-1")
    got = row.message()
    assert got == want and type(got) is type(want)
    assert [type(getattr(got, f)) for f in vars(want)] == [type(getattr(want, f)) for f in vars(want)]


def test_rejects_and_drops_are_the_single_coordinators() -> None:
    bad = row_of(admit(T, _in(T.up("dev-1"), b"\x00junk")))
    assert bad.body is None and bad.reply and bad.nbytes == 5
    assert bad.reject is not None and (bad.reject.reason, bad.reject.code) == ("decode_bad_magic", ErrorCode.BAD_MAGIC)
    hb = row_of(admit(T, _in(T.hb("dev-1"), b"\xb1\x00")))
    assert hb.reject is not None and not hb.reply  # no ErrorMsg for a heartbeat
    topic = row_of(admit(T, _in("meerkat/v1/fleet1/nonsense", b"")))
    assert topic.client == "?" and topic.reject is not None and topic.reject.reason == "bad_topic"
    assert topic.nbytes is None  # an unparsed topic is counted nowhere
    retained = row_of(admit(T, _in(T.up("dev-1"), encode(MSGS[0][1]), retain=True)))  # retained update: unread
    assert (retained.body, retained.reject, retained.drop) == (None, None, "retained")
    assert bad.decision() == admit(T, _in(T.up("dev-1"), b"\x00junk"))
    assert retained.decision() == Dropped("dev-1", "up", "retained", len(encode(MSGS[0][1])))
    cleared = admit(T, _in(T.status("dev-1"), b"", retain=True))  # a retained status being cleared
    assert cleared == Dropped("dev-1", "status", CLEARED, 0) and row_of(cleared).decision() == cleared
    with pytest.raises(ValueError, match="reject"):
        bad.message()
    short = InboxRow("dev-1", "up", body=b"\x91\x01", nbytes=3)  # one field where Update has six
    d = short.decision()
    assert isinstance(d, Rejected) and d.reject.reason == "internal" and not d.reply


def test_inbox_order_and_forget_on_postgresql(pg_url: str) -> None:
    a, b = Inbox(pg_url, "fleet1", "w1"), Inbox(pg_url, "fleet1", "w2")
    try:
        rows = [row_of(admit(T, _in(T.up(f"dev-{i}"), encode(MSGS[0][1])))) for i in range(5)]
        junk = row_of(admit(T, _in(T.hb("dev-9"), b"\xb1\x00")))
        dropped = row_of(admit(T, _in(T.join("dev-8"), b"x", retain=True)))
        nonsense = row_of(admit(T, _in("meerkat/v1/fleet1/nonsense", b"")))
        a.append(rows[:3])
        b.append([*rows[3:], junk, dropped, nonsense])
        got = a.after(0, 100)
        assert [r.client for r in got] == [f"dev-{i}" for i in range(5)] + ["dev-9", "dev-8", "?"]
        # every decision survives the table: the leader feeds what the worker decided, counted the same
        assert [r.decision() for r in got[3:]] == [rows[3].decision(), rows[4].decision(), junk.decision(),
                                                   dropped.decision(), nonsense.decision()]  # fmt: skip
        assert [r.id for r in got] == sorted(r.id for r in got)
        assert [r.client for r in b.after(got[2].id, 2)] == ["dev-3", "dev-4"]
        assert got[0].message() == decode(encode(MSGS[0][1]), Update, client="dev-0")
        assert a.forget(got[2].id) == 3 and a.pending(0) == 5
    finally:
        a.close()
        b.close()
    assert lock_key("leader", "fleet1") != lock_key("inbox", "fleet1") != lock_key("leader", "fleet2")


def test_workers_starting_together_create_the_inbox_once(pg_url: str) -> None:
    """Every worker creates the inbox table at start; without the advisory lock around the DDL, two
    CREATE TABLE IF NOT EXISTS at the same moment on a fresh schema fail one of them with UniqueViolation
    (pg_type), which killed the standby in tests/coordinator/test_cluster.py on an idle machine."""
    import threading

    from coordinator.logstore import PostgresStore

    def all_at_once(calls: list[Callable[[], object]]) -> list[object]:
        """Run every call in its own thread, released together by a barrier; raise the first failure."""
        go = threading.Barrier(len(calls))
        got: list[object] = []
        errors: list[BaseException] = []

        def run(call: Callable[[], object]) -> None:
            try:
                go.wait()
                got.append(call())
            except BaseException as exc:  # noqa: BLE001 - the test reports every failure
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(got) == len(calls)
        return got

    made = all_at_once([partial(Inbox, pg_url, "fleet1", f"w{k}") for k in range(6)])
    for ib in made:
        ib.close()  # type: ignore[attr-defined]
    stores = [PostgresStore(pg_url) for _ in range(4)]
    try:
        all_at_once([partial(s.create_schema, "CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, v TEXT);")
                     for s in stores])
    finally:
        for s in stores:
            s.close()
