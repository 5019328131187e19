"""coordinator/intake.py: the six intake decisions, made once for the single pump and the cluster leader."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_rounds_core import FP, MASK, book, config, records

from coordinator.actions import Dropped as DropAction
from coordinator.actions import Persist, Publish
from coordinator.intake import (
    CLEARED,
    INBOUND,
    NO_RETAIN,
    Admitted,
    Dropped,
    Rejected,
    admit,
    clear_topic,
    feed,
)
from coordinator.records import JoinRecord, RejectRecord
from shared.codec import encode
from shared.messages import ErrorMsg, Heartbeat, Join, Status
from shared.mqtt import Incoming
from shared.topics import Topics

T = Topics("f")
JOIN = Join("", FP, MASK, 5, 1.0, {"compact_plan": True}, -1)


def _in(topic: str, payload: bytes, retain: bool = False) -> Incoming:
    return Incoming(topic, payload, 1, 1, retain)


def test_the_six_decisions() -> None:
    ok = admit(T, _in(T.join("c1"), encode(JOIN)))
    assert isinstance(ok, Admitted) and ok.message == Join("c1", FP, MASK, 5, 1.0, {"compact_plan": True}, -1)
    assert ok.nbytes == len(encode(JOIN))
    bad_topic = admit(T, _in("elsewhere/x", b"abc"))
    assert isinstance(bad_topic, Rejected) and bad_topic.reject.reason == "bad_topic" and bad_topic.nbytes is None
    cleared = admit(T, _in(T.status("c1"), b"", retain=True))
    assert cleared == Dropped("c1", "status", CLEARED, 0)
    outbound = admit(T, _in(T.plan, b"xyz"))
    assert isinstance(outbound, Rejected) and not outbound.reply and outbound.nbytes == 3
    retained = admit(T, _in(T.up("c1"), b"bomb", retain=True))
    assert retained == Dropped("c1", "up", "retained", 4)
    assert clear_topic(T, retained) == T.up("c1") and clear_topic(T, cleared) is None  # cleared, not just ignored
    # the coordinator's own clear comes back as an empty live message: nothing to decode, nothing to answer
    assert admit(T, _in(T.up("c1"), b"")) == Dropped("c1", "up", CLEARED, 0)
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


def test_single_pump_and_cluster_leader_count_the_same(tmp_path: Path) -> None:
    """The same messages, fed as `admit` decides them (one coordinator) and through inbox rows (a cluster
    leader): the same actions and the same received/bytes counters (retained drops and unparsed topics too)."""
    from coordfakes import make_config, synthetic_mask, synthetic_v0

    from coordinator.inbox import row_of
    from coordinator.server import Coordinator

    mask = synthetic_mask((50,))
    msgs = [
        _in(T.join("c1"), encode(Join("", mask.meta.fingerprint, mask.mask_id, 5, 1.0, {"compact_plan": True}, -1))),
        _in(T.hb("c1"), encode(Heartbeat("", 0.0, 1.0, 1))),
        _in(T.up("c1"), b"bomb", retain=True),
        _in(T.status("c1"), b"", retain=True),
        _in(T.up("c1"), b"\x00junk"),
        _in(T.plan, b"xyz"),
        _in("elsewhere/x", b"abc"),
    ]
    counts = []
    for i, via_inbox in enumerate((False, True)):
        coord = Coordinator(make_config(tmp_path / str(i), "mqtt://127.0.0.1:1", fleet="f"), mask=mask,
                            initial_values=synthetic_v0(mask.nnz), clock=lambda: 5.0)  # fmt: skip
        try:
            acts = [coord.feed(row_of(admit(T, m)).decision() if via_inbox else admit(T, m)) for m in msgs]
            coord.tally.apply()
            reg = coord.metrics.registry
            counts.append((acts, {
                (name, kind): reg.get_sample_value(name, {"kind": kind})
                for name in ("meerkat_messages_received_total", "meerkat_bytes_received_total")
                for kind in ("join", "hb", "up", "status", "plan")
            }))  # fmt: skip
        finally:
            coord.log.close()
    assert counts[0] == counts[1]
    got = counts[0][1]
    assert got[("meerkat_messages_received_total", "up")] == 2 and got[("meerkat_bytes_received_total", "up")] == 9
    assert got[("meerkat_messages_received_total", "status")] == 1 and got[("meerkat_messages_received_total", "plan")] == 1
    assert [DropAction("c1", "up", "retained")] in counts[0][0]
