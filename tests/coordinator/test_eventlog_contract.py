"""The EventLog contract, run against every backend (`event_log = "sqlite"` and the real local
PostgreSQL through psycopg 3): what a round book persisted reads back identically, batched writes equal
one-by-one writes, a rolled back transaction leaves nothing, and a book recovered from either backend
continues with the same actions as the book that never stopped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from coordfakes import synthetic_v0

from coordinator.actions import Action, Duplicate, Persist
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor
from coordinator.eventlog import EventLog
from coordinator.records import DuplicateRecord, HeartbeatRecord, RejectRecord, SeenRecord
from coordinator.recovery import recover
from coordinator.rounds import RoundBook
from shared.fingerprint import fp_tag
from shared.messages import Heartbeat, Join, Status, Update
from shared.prng import raw_u64

FP, MASK = "ab" * 32, "0123456789abcdef"
NNZ = 128


def cfg() -> CoordinatorConfig:
    return CoordinatorConfig(fleet="f", steps=2, lr=0.01, min_clients=2, min_updates=1, round_deadline_s=10.0,
                             metrics=False, straggler="next", replay_max=3, drift_window=2, drift_min_steps=4)  # fmt: skip


def new_book(c: CoordinatorConfig, log: EventLog | None = None) -> RoundBook:
    grad = torch.from_numpy((raw_u64(5, NNZ) >> 40).astype("float64") / 2**24 - 0.5)
    drift = DriftMonitor(grad, "rademacher", c.drift_thresholds(), keep_history=False)
    rec = None if log is None else recover(log, synthetic_v0(NNZ), MASK, FP, c.replay_max)
    return RoundBook(c, fingerprint=FP, mask_id=MASK, values=synthetic_v0(NNZ), drift=drift, recovered=rec)


def script(b: RoundBook) -> list[list[Action]]:
    """Every kind of record: joins, a refused join, heartbeats, status, plans, on-time, late, duplicate and
    conflicting updates, results with late folding, MEERKAT-VP drift rows, events, rejects."""
    out = []
    for k, n in (("a", 2), ("b", 6), ("c", 3)):
        out.append(b.handle(Join(k, FP, MASK, n, 1.0, {"gpu": k == "a", "compact_plan": True}, -1), 0.0))
    out.append(b.handle(Join("x", "cd" * 32, MASK, 1, 1.0, {}, -1), 0.0))  # refused: wrong model
    for r in range(6):
        t = 20.0 * r
        out.append(b.tick(t))
        for i, k in enumerate(("a", "b", "c")):
            if k == "c" and r % 2 == 0:
                continue  # c is late every other round
            grads = (math.sin(r + i), math.cos(r * i) / (1 + r))
            out.append(b.handle(Update(r, 7 * r + i, grads, 4, fp_tag(FP), 0.5 + r, client=k), t + 1 + i))
        out.append(b.handle(Heartbeat("a", t + 2, 40.0 + r, 1 << 20, None, 51.5, None, 0.1, None, r), t + 2))
        out.append(b.handle(Update(r, 7 * r, (9.0, 9.0), 4, fp_tag(FP), 0.5, client="a"), t + 3))  # same msg_id: a duplicate
        out.append(b.tick(t + 11))  # closes at the deadline
        if r % 2 == 0:
            out.append(b.handle(Update(r, 99 + r, (0.25, -0.5), 3, fp_tag(FP), 1.0, client="c"), t + 12))  # late
    out.append(b.handle(Status("b", False, 130.0), 130.0))
    return out


def readers(log: EventLog) -> dict[str, Any]:
    return {
        "meta": log.views.meta(), "clients": log.clients(), "status": log.views.client_status(), "results": log.results(),
        "updates": log.updates(), "late": log.updates(status="late"), "plans": log.plans(since=0),
        "open_plan": log.open_plan(), "open_round": log.views.open_round(), "keys": log.update_keys(since=0),
        "gradip": list(log.gradip_history()), "drift": log.drift_rows(), "limited": log.limited_clients(),
        "rejects": log.views.reject_counts(), "round_counts": log.views.round_counts(), "events": log.views.events(),
        "last": log.views.last_result_round(), "checkpoints": log.checkpoints(), "latest_gradip": log.views.latest_gradip("b"),
    }  # fmt: skip


def write(log: EventLog, batches: list[list[Action]], batched: bool) -> None:
    for acts in batches:
        recs = [a.record for a in acts if isinstance(a, Persist)]
        recs += [DuplicateRecord(a.round) for a in acts if isinstance(a, Duplicate)]  # as the pump writes them
        with log.transaction():
            if batched:
                log.persist_many(recs)
            else:
                for rec in recs:
                    log.persist(rec)


def test_backend_reads_back_what_sqlite_reads_back(tmp_path: Path, event_log: str) -> None:
    """The same records give the same typed rows on this backend as on SQLite written one by one."""
    batches = script(new_book(cfg()))
    ref = EventLog(tmp_path / "ref")
    write(ref, batches, batched=False)
    log = EventLog(tmp_path / "st", event_log=event_log)
    write(log, batches, batched=True)
    with log.transaction():
        log.add_checkpoint(3, "/x/ck3", "c" * 64, 5.0)
        log.add_checkpoint(3, "/x/ck3b", "d" * 64, 6.0)  # replaced
        log.set_meta("k", "v1")
        log.set_meta("k", "v2")
    with ref.transaction():
        ref.add_checkpoint(3, "/x/ck3b", "d" * 64, 6.0)
        ref.set_meta("k", "v2")
    got, want = readers(log), readers(ref)
    for key in want:
        assert got[key] == want[key], key
    assert any(u.status == "folded" for u in want["updates"]) and want["gradip"] and want["rejects"] and want["results"]
    assert [c.get("duplicate") for c in want["round_counts"].values()] == [1] * 6  # a's re-sent msg_id 7r
    log.close()
    ref.close()


def test_rollback_leaves_nothing_and_reject_log_is_bounded(tmp_path: Path, event_log: str) -> None:
    log = EventLog(tmp_path / "st", event_log=event_log)
    with pytest.raises(RuntimeError), log.transaction():
        log.persist(RejectRecord("x", "c1", "up", "d", 1.0))
        raise RuntimeError("boom")
    assert log.views.reject_counts() == {}
    with log.transaction():
        log.persist_many([RejectRecord("bad", f"c{i}", "up", "d", float(i)) for i in range(1250)])
        log.persist_many([HeartbeatRecord("nobody", {"t": 1}, 2.0), SeenRecord("nobody", 3.0)])
    assert log.views.reject_counts() == {"bad": 1250}
    assert log.views.table_rows()["reject_log"] <= 1100
    log.close()


def test_recovery_from_backend_continues_identically(tmp_path: Path, event_log: str) -> None:
    c = cfg()
    live = new_book(c)
    log = EventLog(tmp_path / "st", event_log=event_log)
    write(log, script(live), batched=True)
    write(log, [live.tick(200.0)], batched=True)  # round 6 open
    again = new_book(c, log)
    assert again.last_round == live.last_round and torch.equal(again.values, live.values)
    assert again.plan == live.plan and again.late == live.late and again.stored == live.stored
    for k in ("a", "b", "c"):
        assert again.drift is not None and live.drift is not None
        assert again.drift.stats(k) == live.drift.stats(k)
    ups = [Update(6, 60 + i, (0.5, -0.25), 4, fp_tag(FP), 1.0, client=k) for i, k in enumerate(("a", "c"))]
    for u in ups:
        assert again.handle(u, 201.0) == live.handle(u, 201.0)
    assert again.tick(215.0) == live.tick(215.0)
    log.close()
