"""coordinator/registry.py on its own: rows, the O(1) online count, the join nag and offline marking."""

from __future__ import annotations

import random

from coordinator.actions import Persist, Publish
from coordinator.ratelimit import LruDict
from coordinator.records import ClientRow, OfflineRecord
from coordinator.registry import JOIN_GRACE_S, REJOIN_NAG_S, ClientRegistry
from shared.messages import ErrorCode, ErrorMsg

FP, MASK = "ab" * 32, "0123456789abcdef"


def reg(**kw: object) -> ClientRegistry:
    return ClientRegistry(fingerprint=FP, mask_id=MASK, offline_after_s=30.0, **kw)  # type: ignore[arg-type]


def row(client: str, online: bool = True, fp: str = FP, state: str = "joined", seen: float = 0.0) -> ClientRow:
    return ClientRow(client, state, fp, MASK, 10, online, seen)


def test_online_count_follows_every_change() -> None:
    r = reg(rows=[row("a"), row("b", online=False), row("old", fp="cd" * 32)])
    assert r.online() == ["a"] and r.n_online() == 1  # another model's row is not samplable
    r.put(row("b"))
    assert r.online() == ["a", "b"] and r.n_online() == 2
    assert r.seen("a", 5.0, online=False) and r.n_online() == 1 and r.get("a") == row("a", False, seen=5.0)
    assert not r.seen("ghost", 5.0) and "ghost" not in r.clients  # no row for an id that never joined
    assert r.joined("b") and not r.joined("ghost")


def test_live_without_join_is_nagged_then_forgotten() -> None:
    r = reg()
    r.note_live("dev", 0.0)
    assert r.nag(JOIN_GRACE_S - 0.1) == []
    (nag,) = r.nag(JOIN_GRACE_S)
    assert isinstance(nag, Publish) and nag.to == "dev" and isinstance(nag.message, ErrorMsg)
    assert nag.message.code == ErrorCode.UNKNOWN_CLIENT
    assert r.nag(JOIN_GRACE_S + 1.0) == [] and len(r.nag(JOIN_GRACE_S + REJOIN_NAG_S)) == 1  # asked again
    assert r.nag(100.0) == [] and "dev" not in r.unjoined  # silent for offline_after_s: stop asking


def test_refused_and_joined_ids_are_not_nagged() -> None:
    r = reg()
    r.refuse("bad", 0.0)
    r.note_live("bad", 0.0)
    r.note_live("ok", 0.0)
    r.joining("ok")
    r.put(row("ok"))
    r.note_live("ok", 1.0)
    assert r.nag(10.0) == [] and len(r.unjoined) == 0
    r.joining("bad")  # a later valid Join forgets the refusal
    assert "bad" not in r.refused


def test_unjoined_ids_are_bounded() -> None:
    r = reg()
    n = LruDict().max_keys
    for i in range(n + 10):
        r.note_live(f"x{i}", 0.0)
    assert len(r.unjoined) == n and r.clients == {}


def test_offline_marks_silent_clients_in_one_record() -> None:
    r = reg(rows=[row("a", seen=0.0), row("b", seen=25.0), row("c", online=False)])
    (p,) = r.offline(40.0)
    assert isinstance(p, Persist) and p.record == OfflineRecord(("a",))
    assert r.online() == ["b"] and r.n_online() == 1
    assert r.offline(40.0) == []


def test_offline_finds_what_a_full_scan_finds() -> None:
    """`offline` skips its scan while no online row can be silent: random joins, status changes, activity
    (the clock stepping back now and then, rows never seen) and checks give the same records and rows as
    marking by a scan of every row each time."""
    rng = random.Random(3)
    for _ in range(30):
        r = reg(rows=[row(f"r{i}", online=rng.random() < 0.8, seen=rng.uniform(0, 20)) for i in range(5)])
        now = 20.0
        for _ in range(300):
            now += rng.choice((0.0, 1.0, 5.0, 20.0, -3.0))
            k = f"r{rng.randrange(8)}"
            op = rng.random()
            if op < 0.4:
                r.seen(k, now)
            elif op < 0.5:
                r.seen(k, now, online=rng.random() < 0.5)
            elif op < 0.6:
                r.put(ClientRow(k, "joined", FP, MASK, 10, rng.random() < 0.7, rng.choice((None, now - 40.0, now))))
            else:
                cutoff = now - r.offline_after_s
                want = sorted(c.client for c in r.clients.values() if c.online and (c.seen_at is None or c.seen_at < cutoff))
                got = r.offline(now)
                assert got == ([Persist(OfflineRecord(tuple(want)))] if want else [])
                assert not any(c.online and (c.seen_at is None or c.seen_at < cutoff) for c in r.clients.values())
