"""The event log's writer (coordinator/eventlog/writer.py): one writer per record type, one SQL path.

`persist(r)` is `persist_many([r])`: a batch and the same records one by one run the same statements
and leave the same rows (every column of every table, on real SQLite files), a batch only reorders
records whose tables are disjoint, and a round's Update/Drift stream costs two statements however
long it is."""

from __future__ import annotations

import math
import sqlite3
import typing
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.eventlog import EventLog, writer
from coordinator.eventlog.writer import TABLES, WRITERS
from coordinator.logstore import Cursor, Store
from coordinator.records import (
    DriftRecord,
    DuplicateRecord,
    EvalRecord,
    EventRecord,
    HeartbeatRecord,
    JoinRecord,
    LimitRecord,
    LrRecord,
    OfflineRecord,
    OnlineRecord,
    PlanRecord,
    PlanRow,
    Record,
    RejectRecord,
    ReplanRecord,
    ResultRecord,
    ResultRow,
    SeenRecord,
    UpdateRecord,
    UpdateRow,
)
from shared.prng import derive_seed, raw_u64, u64_at


def _join(c: str, now: float) -> JoinRecord:
    return JoinRecord(c, "joined", "", "ab" * 32, "m", 4, 1.5, {"device": "cpu"}, -1, now)


def _hb(c: str, now: float, eval_round: int | None, loss: float) -> HeartbeatRecord:
    t: dict[str, Any] = {"cpu_pct": 10.0}
    if eval_round is not None:
        t |= {"eval_round": eval_round, "eval_loss": loss, "eval_acc": 0.5, "eval_n": 8}
    return HeartbeatRecord(c, t, now)


def _plan(r: int, now: float) -> PlanRecord:
    return PlanRecord(PlanRow(r, "open", now, now + 10, (r + 1, 2**64 - 1 - r), {"a": 2, "b": 2}, 0.01, 1e-3,
                              "rademacher", 4, r - 1, "0" * 64, 0))  # fmt: skip


def _up(c: str, r: int, now: float, status: str = "accepted", gradip: tuple[float, ...] | None = (0.5, -0.25)) -> UpdateRecord:
    return UpdateRecord(UpdateRow(c, r, 2**64 - 7 - r, (0.1 * r, -1 / 3), 4, 0.75 + r, now, status, None), gradip)


def _drift(c: str, n: int, now: float) -> DriftRecord:
    return DriftRecord(c, n, None if n < 4 else 0.5, None if n < 4 else 0.25, 0.5, 1.5, now)


def records() -> list[Record]:
    """Every record type, with interleavings where reordering would change the result: a Join between
    two Seen of one client, a Limit between Drifts, a repeated eval round, late updates folded later."""
    return [
        _join("a", 1.0), _hb("a", 2.0, 0, 3.0), SeenRecord("a", 5.0), _join("a", 1.0), SeenRecord("a", 9.0),
        _join("b", 3.0), OnlineRecord("a", False, 4.0), _hb("b", 4.0, None, 0.0), _hb("a", 6.0, 0, 9.9),
        OfflineRecord(("a", "b")), OnlineRecord("b", True, 7.0),
        _plan(0, 10.0), ReplanRecord(0, {"a": 1, "b": 2}, 25.0, 1),
        _up("a", 0, 11.0), _drift("a", 2, 11.0), _up("b", 0, 12.0, gradip=None), _drift("b", 2, 12.0),
        LimitRecord("a", 0, 12.5), _drift("a", 4, 13.0), LimitRecord("a", 1, 14.0),
        RejectRecord("bad_update", "x", "up", "nan in g" * 100, 13.0), RejectRecord("bad_update", "y", "up", "d", 13.5),
        RejectRecord("unknown_client", "z", "join", "d", 14.0),
        EventRecord("open", "round 0", 0, 10.0), DuplicateRecord(0), DuplicateRecord(0),
        ResultRecord(ResultRow(0, (1, 2**64 - 1), (0.5, -0.125), 0.01, "rademacher", 2, "c" * 64, 26.0, 16.0),
                     (("a", 0, "accepted"), ("b", 0, "accepted"))),
        LrRecord(0, 0.01, 0.01, 0.02, "grow", "fell", 0.5, {"lr": 0.02, "n": 1}, 26.0),
        EventRecord("close", "round 0", 0, 26.0), EvalRecord(0, 2.5, None, 16, 27.0), EvalRecord(0, 9.0, 0.1, 16, 28.0),
        _plan(1, 30.0), _up("b", 1, 31.0), _up("c", 0, 32.0, status="late"),  # c reports round 0 late
        _drift("b", 4, 31.0), _up("a", 1, 33.0), DuplicateRecord(1),
        ResultRecord(ResultRow(1, (3,), (0.25,), 0.01, "rademacher", 2, "d" * 64, 40.0, 10.0),
                     (("a", 1, "accepted"), ("b", 1, "accepted"), ("c", 0, "folded"))),
        LrRecord(1, 0.02, 0.005, 0.01, "damp", "diverged", math.nan, {"lr": 0.01, "n": 2}, 40.0),
    ]  # fmt: skip


def dump(log: EventLog) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, every column (SQLite: rowid first, so insertion order counts too)."""
    return {t: log.db.execute(f'SELECT rowid, * FROM "{t}" ORDER BY rowid').fetchall() for t in log.db.tables()}


def write(log: EventLog, batches: Iterable[Sequence[Record]], one_by_one: bool) -> None:
    for batch in batches:
        with log.transaction():
            if one_by_one:
                for rec in batch:
                    log.persist(rec)
            else:
                log.persist_many(batch)


class Counting:
    """A Store that records the SQL text of each statement it runs (to see which path a write takes)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.kind, self.where, self.readonly = inner, inner.kind, inner.where, inner.readonly
        self.sql: list[str] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        self.sql.append(sql)
        return self.inner.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        self.sql.append(sql)
        return self.inner.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:  # begin, commit, rollback, tables, close
        return getattr(self.inner, name)


def test_every_record_type_has_exactly_one_writer() -> None:
    kinds = set(typing.get_args(Record))
    assert set(WRITERS) == kinds and set(TABLES) == kinds


def test_persist_and_persist_many_leave_identical_rows(tmp_path: Path) -> None:
    recs = records()
    logs = {name: EventLog(tmp_path / name) for name in ("single", "batch", "halves")}
    write(logs["single"], [recs], one_by_one=True)
    write(logs["batch"], [recs], one_by_one=False)
    write(logs["halves"], [recs[:17], recs[17:]], one_by_one=False)
    want = dump(logs["single"])
    assert want["evals"] and want["reject_log"] and want["round_counts"] and want["drift"]
    for name in ("batch", "halves"):
        got = dump(logs[name])
        for table in want:
            assert got[table] == want[table], (name, table)
    clients = {c.client: c for c in logs["batch"].views.client_status()}
    assert clients["a"].seen_at == 33.0 and not clients["a"].online  # Join(1.0) did not jump the Seen(9.0)
    assert logs["batch"].limited_clients() == {"a": 0}  # the first limit sticks
    assert [(e.source, e.loss) for e in logs["batch"].views.evals()] == [("@coordinator", 2.5), ("a", 3.0)]
    assert {(u.client, u.round): (u.status, u.used_in) for u in logs["batch"].updates()}[("c", 0)] == ("folded", 1)
    for log in logs.values():
        log.close()


def test_a_result_using_every_accepted_update_marks_them_in_one_statement(tmp_path: Path) -> None:
    """ResultRecord.all_accepted (the round book sets it when no spike was left out): the same rows as one
    lookup per used update, late folds included, with one UPDATE over the round for the on-time ones."""
    recs = records()
    whole = [replace(r, all_accepted=True) if isinstance(r, ResultRecord) else r for r in recs]
    logs = {name: EventLog(tmp_path / name) for name in ("per_row", "whole")}
    write(logs["per_row"], [recs], one_by_one=False)
    logs["whole"].db = spy = Counting(logs["whole"].db)
    write(logs["whole"], [whole], one_by_one=False)
    assert dump(logs["whole"]) == dump(logs["per_row"])
    assert spy.sql.count("UPDATE updates SET used_in=? WHERE round=? AND status='accepted'") == 2
    assert sum("WHERE client=? AND round=?" in q for q in spy.sql) == 1  # round 1's folded late update only
    for log in logs.values():
        log.close()


def _groups_reference(recs: Sequence[Record]) -> list[tuple[type, list[Record]]]:
    """persist_many's grouping rule spelled out: each record joins the newest group of its type unless a
    group after that one writes one of its tables."""
    groups: list[tuple[type, list[Record]]] = []
    for rec in recs:
        i = len(groups) - 1
        while i >= 0 and groups[i][0] is not type(rec) and not (TABLES[groups[i][0]] & TABLES[type(rec)]):
            i -= 1
        if i >= 0 and groups[i][0] is type(rec):
            groups[i][1].append(rec)
        else:
            groups.append((type(rec), [rec]))
    return groups


def test_grouping_follows_the_rule_on_random_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of one type, Update/Drift interleavings and records between them that share a table: the
    groups (and their order) are the rule's, on 2,000 random batches (shared.prng draws)."""
    pool: list[Record] = [_up("a", 0, 1.0), _drift("a", 2, 1.0), LimitRecord("a", 0, 1.0), SeenRecord("a", 1.0),
                          _hb("a", 1.0, None, 0.0), EventRecord("late", "d", 0, 1.0), DuplicateRecord(0)]  # fmt: skip
    got: list[tuple[type, list[Record]]] = []
    monkeypatch.setattr(writer, "WRITERS", {k: (lambda db, recs, k=k: got.append((k, list(recs)))) for k in WRITERS})
    for b in range(2000):
        picks = raw_u64(derive_seed(31, b), 1 + int(u64_at(derive_seed(32, b), 0) % 12)) % len(pool)
        recs = [pool[int(i)] for i in picks]
        got.clear()
        writer.persist_many(None, recs)  # type: ignore[arg-type]
        assert [(k, [id(r) for r in g]) for k, g in got] == [
            (k, [id(r) for r in g]) for k, g in _groups_reference(recs)], [type(r).__name__ for r in recs]


def test_one_record_takes_the_batch_path(tmp_path: Path) -> None:
    """Each record alone runs exactly the statements its type runs in a batch (no second INSERT path)."""
    recs = records()
    for kind in WRITERS:
        of_kind = [r for r in recs if type(r) is kind]
        log = EventLog(tmp_path / kind.__name__)
        log.db = spy = Counting(log.db)
        with log.transaction():
            log.persist_many(recs[: recs.index(of_kind[0])])  # the rows they depend on
            spy.sql.clear()
            log.persist(of_kind[0])
            alone = list(spy.sql)
            spy.sql.clear()
            log.persist_many(of_kind[1:] or of_kind)
            batched = list(spy.sql)
        assert alone and sorted(set(alone)) == sorted(set(batched)), kind.__name__
        log.close()


def test_a_round_of_updates_costs_two_statements(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "st")
    with log.transaction():
        log.persist_many([_join(c, 1.0) for c in "abcdefgh"] + [_plan(0, 2.0)])
    log.db = spy = Counting(log.db)
    batch: list[Record] = []
    for i, c in enumerate("abcdefgh"):
        batch += [_up(c, 0, 3.0 + i), _drift(c, 2, 3.0 + i)]
    with log.transaction():
        log.persist_many(batch)
    assert len(spy.sql) == 2  # INSERT updates, upsert drift: the clients' counters are folded at the close
    assert len(log.updates(round=0)) == 8
    assert {(c.client, c.updates, c.last_update_at) for c in log.views.client_status()} == {
        (c, 1, 3.0 + i) for i, c in enumerate("abcdefgh")}  # the unfolded rows counted by the reader
    log.close()


def test_event_is_an_event_record(tmp_path: Path) -> None:
    a, b = EventLog(tmp_path / "a"), EventLog(tmp_path / "b")
    with a.transaction():
        a.event("leader", "worker w1 leads", now=5.0)
    with b.transaction():
        b.persist(EventRecord("leader", "worker w1 leads", None, 5.0))
    assert dump(a)["events"] == dump(b)["events"]
    with pytest.raises(RuntimeError, match="outside EventLog.transaction"):
        a.persist(SeenRecord("a", 1.0))
    with pytest.raises(TypeError, match="not a record"), a.transaction():
        a.persist_many([("not", "a record")])  # type: ignore[list-item]
    a.close()
    b.close()


def test_read_only_views_of_a_log_without_round_counts(tmp_path: Path) -> None:
    """A log from before the round_counts table opens read-only (nothing created) and reads as no counts:
    the views ask the store for its tables instead of catching an engine's error."""
    log = EventLog(tmp_path)
    with log.transaction():
        log.persist_many([DuplicateRecord(3), _join("a", 1.0)])
    log.close()
    con = sqlite3.connect(tmp_path / "events.sqlite")
    con.execute("DROP TABLE round_counts")
    con.close()
    ro = EventLog(tmp_path, readonly=True)
    assert ro.views.round_counts() == {} and [c.client for c in ro.views.client_status()] == ["a"]
    ro.close()
    assert "round_counts" not in sqlite3.connect(tmp_path / "events.sqlite").execute(
        "SELECT name FROM sqlite_master").fetchall()  # fmt: skip
