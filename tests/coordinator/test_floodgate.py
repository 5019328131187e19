"""coordinator/floodgate.py: per-device limits before decode, updates before heartbeats (no broker)."""

from __future__ import annotations

import queue

import pytest

from coordinator.floodgate import GATE_FACTOR, FloodGate
from shared.mqtt import Incoming
from shared.topics import Topics

T = Topics("f")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_from_one_id_is_refused_at_the_door_and_others_pass() -> None:
    clock = Clock()
    gate = FloodGate(rate_per_s=10.0, burst=5, clock=clock)
    acked: list[Incoming] = []
    gate.ack = acked.append
    for i in range(1000):
        gate.put(Incoming(T.hb("flood"), b"x", i, 0, False))
    assert gate.qsize() == GATE_FACTOR * 5 and gate.refused == {"hb": 1000 - GATE_FACTOR * 5}
    up = Incoming(T.up("honest"), b"u", 7, 1, False)
    gate.put(up)  # another id's bucket is full
    assert gate.get_nowait() is up  # and it is served before the queued heartbeats
    for i in range(100):
        gate.put(Incoming(T.sync("flood"), b"s", 2000 + i, 1, False))  # QoS 1 refused: acked, nothing queued
    assert len(acked) == 100 - GATE_FACTOR * 5 and all(m.qos == 1 for m in acked)
    clock.t = 1.0  # refilled at GATE_FACTOR x rate_per_s
    gate.put(Incoming(T.hb("flood"), b"x", 1, 0, False))
    assert gate.refused_total() == 1000 - GATE_FACTOR * 5 + 100 - GATE_FACTOR * 5


def test_retained_messages_pass_and_lanes_keep_their_order() -> None:
    gate = FloodGate(rate_per_s=1.0, burst=1, clock=Clock())
    for i in range(5):
        gate.put(Incoming(T.up("bomber"), b"b", i, 1, True))  # retained: the intake drops and clears them
    assert gate.qsize() == 5
    while gate.qsize():
        gate.get_nowait()
    hb = [Incoming(T.hb(f"d{i}"), b"h", i, 0, False) for i in range(3)]
    ups = [Incoming(T.up(f"d{i}"), b"u", 10 + i, 1, False) for i in range(3)]
    for h, u in zip(hb, ups, strict=True):
        gate.put(h)
        gate.put(u)
    assert [gate.get_nowait() for _ in range(6)] == ups + hb  # each lane first in, first out
    with pytest.raises(queue.Empty):
        gate.get(timeout=0.01)


def test_put_many_and_get_many_decide_as_one_by_one() -> None:
    """A network turn's batch (`put_many`) meets the same buckets, lane order and heartbeat bound as the
    same messages put one at a time; `get_many` serves the fast lane first and waits only for the first."""
    msgs = [Incoming(T.hb(f"d{i % 4}"), b"h", i, 0, False) for i in range(40)]
    msgs += [Incoming(T.up(f"d{i % 4}"), b"u", 100 + i, 1, False) for i in range(40)]
    msgs += [Incoming(T.up("bomber"), b"b", 999, 1, True)]
    one, many = FloodGate(rate_per_s=1.0, burst=2, clock=Clock()), FloodGate(rate_per_s=1.0, burst=2, clock=Clock())
    acked_one: list[Incoming] = []
    acked_many: list[Incoming] = []
    one.ack, many.ack = acked_one.append, acked_many.append
    for m in msgs:
        one.put(m)
    many.put_many(msgs)
    assert acked_many == acked_one and many.refused == one.refused and many.qsize() == one.qsize()
    got = many.get_many(10, timeout=0.0)
    assert len(got) == 10 and all("/up/" in m.topic for m in got)
    assert got + many.get_many(1000, timeout=0.0) == [one.get_nowait() for _ in range(one.qsize())]
    assert many.get_many(10, timeout=0.01) == []
    bound = FloodGate(rate_per_s=1000.0, burst=1000, clock=Clock(), max_slow=5)
    bound.put_many([Incoming(T.hb(f"d{i}"), b"h", i, 0, False) for i in range(8)])
    assert bound.qsize() == 5 and bound.refused == {"hb": 3}  # the lane's bound counts the batch's own


def test_heartbeats_gather_until_not_before_and_any_other_message_ends_the_wait() -> None:
    """`get_many(n, timeout, not_before)`: only heartbeats waiting, it waits until `not_before` for more (the
    pump's SETTLE_S); a QoS 1 message (the broker sends only so many unacked) ends the wait at once."""
    import threading
    import time

    gate = FloodGate(rate_per_s=1000.0, burst=1000)
    gate.put(Incoming(T.hb("d0"), b"h", 0, 0, False))
    t0 = time.monotonic()
    got = gate.get_many(10, timeout=1.0, not_before=t0 + 0.3)
    assert len(got) == 1 and time.monotonic() - t0 >= 0.29
    gate.put(Incoming(T.hb("d1"), b"h", 0, 0, False))
    up = Incoming(T.up("d2"), b"u", 5, 1, False)
    threading.Timer(0.05, gate.put, (up,)).start()
    t0 = time.monotonic()
    got = gate.get_many(10, timeout=1.0, not_before=t0 + 5.0)
    assert got[0] is up and len(got) == 2 and time.monotonic() - t0 < 2.0
    gate.put(Incoming(T.up("d3"), b"u", 6, 1, False))
    t0 = time.monotonic()
    assert len(gate.get_many(10, timeout=1.0, not_before=t0 + 5.0)) == 1 and time.monotonic() - t0 < 1.0
