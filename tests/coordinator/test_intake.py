"""coordinator/intake.py: the six intake decisions, made once for the single pump and the cluster leader."""

from __future__ import annotations

import pytest
from test_rounds_core import FP, MASK, book, config, records

from coordinator.actions import Dropped as DropAction
from coordinator.actions import Persist, Publish
from coordinator.intake import CLEARED, INBOUND, NO_RETAIN, Admitted, Dropped, Rejected, admit, feed
from coordinator.records import JoinRecord, RejectRecord
from shared.codec import encode
from shared.messages import ErrorMsg, Heartbeat, Join, Status
from shared.mqtt import Incoming
from shared.topics import Topics

T = Topics("f")
JOIN = Join("", FP, MASK, 5, 1.0, {}, -1)


def _in(topic: str, payload: bytes, retain: bool = False) -> Incoming:
    return Incoming(topic, payload, 1, 1, retain)


def test_the_six_decisions() -> None:
    ok = admit(T, _in(T.join("c1"), encode(JOIN)))
    assert isinstance(ok, Admitted) and ok.message == Join("c1", FP, MASK, 5, 1.0, {}, -1)
    assert ok.nbytes == len(encode(JOIN))
    bad_topic = admit(T, _in("elsewhere/x", b"abc"))
    assert isinstance(bad_topic, Rejected) and bad_topic.reject.reason == "bad_topic" and bad_topic.nbytes is None
    cleared = admit(T, _in(T.status("c1"), b"", retain=True))
    assert cleared == Dropped("c1", "status", CLEARED, 0)
    outbound = admit(T, _in(T.plan, b"xyz"))
    assert isinstance(outbound, Rejected) and not outbound.reply and outbound.nbytes == 3
    retained = admit(T, _in(T.up("c1"), b"bomb", retain=True))
    assert retained == Dropped("c1", "up", "retained", 4)
    status = admit(T, _in(T.status("c1"), encode(Status("", True, 1.0)), retain=True))  # retained by design
    assert isinstance(status, Admitted)
    for kind, reply in (("up", True), ("join", True), ("sync", True), ("hb", False), ("status", False)):
        junk = admit(T, _in(getattr(T, kind)("c1"), b"\x00junk"))
        assert isinstance(junk, Rejected) and junk.reply is reply and junk.reject.reason.startswith("decode_")
    assert set(NO_RETAIN) == set(INBOUND) - {"status"}


def test_feed_hands_each_decision_to_the_book() -> None:
    b = book(config())
    joined = feed(b, admit(T, _in(T.join("c1"), encode(JOIN))), 0.0)
    assert records(joined, JoinRecord)
    assert feed(b, Dropped("c1", "status", CLEARED, 0), 0.0) == []  # nothing lost: not a drop
    assert feed(b, Dropped("c1", "up", "retained", 4), 0.0) == [DropAction("c1", "up", "retained")]
    rej = feed(b, admit(T, _in(T.up("c1"), b"\x00junk")), 0.0)
    assert [r.reason for r in records(rej, RejectRecord)] == ["decode_bad_magic"]
    assert [a.to for a in rej if isinstance(a, Publish) and isinstance(a.message, ErrorMsg)] == ["c1"]


def test_a_bug_in_the_book_is_a_counted_internal_reject(monkeypatch: pytest.MonkeyPatch) -> None:
    b = book(config())

    def boom(*_a: object) -> list[Persist]:
        raise RuntimeError("bug")

    monkeypatch.setattr(b, "handle", boom)
    acts = feed(b, Admitted("c1", "hb", Heartbeat("c1", 0.0, 1.0, 1), 10), 0.0)
    assert [r.reason for r in records(acts, RejectRecord)] == ["internal"]
    assert not [a for a in acts if isinstance(a, Publish)]  # no reply for an internal error
