"""The clients' update counters folded once per round (coordinator/eventlog/writer.py `fold_clients`), and
the `updates` key led by the round.

An Update no longer rewrites its client's row (`updates`, `last_update_at`, `seen_at`); each round's close
and each prune add the rows after the mark, and the readers (`EventLog.clients`, `LogViews.client_status`)
add those not folded yet. Checked against the row-by-row writer it replaced, read after every committed
batch (so after a kill -9 at any commit), across closes, late updates, prunes and reopens, and on a log
an older build wrote (no mark: it counted every row already)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from coordinator.eventlog import DB_NAME, EventLog, writer
from coordinator.eventlog.rows import FOLD_KEY, last_rowid
from coordinator.eventlog.schema import SCHEMA
from coordinator.logstore import Store
from coordinator.records import (
    HeartbeatRecord,
    JoinRecord,
    PlanRecord,
    PlanRow,
    Record,
    ResultRecord,
    ResultRow,
    SeenRecord,
    UpdateRecord,
    UpdateRow,
)
from shared.prng import derive_seed, raw_u64
from tests.coordinator.test_eventlog_writer import dump, records

CLIENTS = ("a", "b", "c", "d", "e", "f")


def _row_by_row(db: Store, recs: Sequence[UpdateRecord]) -> None:
    """The writer before the fold: the row, then the client's counters row by row."""
    _new_updates(db, recs)
    db.executemany(
        "UPDATE clients SET last_update_at=?, seen_at=?, updates=updates+1 WHERE client=?",
        [(r.update.received_at, r.update.received_at, r.update.client) for r in recs],
    )


def _old_updates(db: Store, recs: Sequence[UpdateRecord]) -> None:
    """The row-by-row writer with the mark on its last row (every row counted: the readers add nothing)."""
    _row_by_row(db, recs)
    writer.set_meta(db, FOLD_KEY, str(last_rowid(db)))


_new_updates = writer.WRITERS[UpdateRecord]
OLD_TABLES = frozenset({"updates", "clients"})  # what an Update wrote before: a Seen or Join kept its place


def _stream(seed: int) -> list[tuple[str, Any]]:
    """Batches of records, prunes and reopens of a small fleet over 8 rounds, drawn from shared.prng:
    updates in random order and batch sizes, late updates of the round before, heartbeats and Seen
    records between them, the close (ResultRecord) inside a batch of updates."""
    out: list[tuple[str, Any]] = []
    now = 1.0
    out.append(("batch", [JoinRecord(c, "joined", "", "f", "m", 4, 1.0, {}, -1, now) for c in CLIENTS]))
    for r in range(8):
        u = raw_u64(derive_seed(seed, r), 80)
        now += 1.0
        out.append(("batch", [PlanRecord(PlanRow(r, "open", now, now + 9, (r,), dict.fromkeys(CLIENTS, 2), 0.01, 1e-3,
                                                 "rademacher", 4, r - 1, "0" * 64, 0))]))  # fmt: skip
        order = sorted(CLIENTS, key=lambda c: int(u[CLIENTS.index(c)]))
        sending, late = order[: 2 + int(u[8] % 4)], order[5:] if r else []
        batch: list[Record] = []
        for i, c in enumerate(sending):
            now += 0.25 + int(u[10 + i] % 4) * 0.125
            batch.append(
                UpdateRecord(
                    UpdateRow(c, r, int(u[20 + i]), (0.5, 0.25), 4, 1.0, now, "accepted", None), None
                )
            )
            if u[30 + i] % 3 == 0:
                batch.append(SeenRecord(order[int(u[40 + i] % 6)], now))
            if u[50 + i] % 3 == 0:
                batch.append(
                    HeartbeatRecord(order[int(u[41 + i] % 6)], {"round": r}, now - 0.5)
                )  # held: older
            if u[70 + i] % 2 == 0:
                out.append(("batch", batch))
                batch = []
        now += 1.0
        used = tuple((c, r, "accepted") for c in sorted(sending))
        batch.append(
            ResultRecord(ResultRow(r, (r,), (0.5,), 0.01, "rademacher", len(used), "0" * 64, now, 1.0), used)
        )
        for c in late:  # late updates of this round after its close: folded at the next close
            now += 0.25
            batch.append(UpdateRecord(UpdateRow(c, r, 7, (0.5, 0.25), 4, 1.0, now, "late", None), None))
        out.append(("batch", batch))
        if r in (3, 6):
            out.append(("prune", r - 1))
        if u[61] % 3 == 0:
            out.append(("reopen", None))
    return out


def _run(tmp: Path, stream: list[tuple[str, Any]]) -> list[tuple[Any, ...]]:
    """What the readers see after each step: client_status and the registry rows recovery reads."""
    log = EventLog(tmp)
    seen: list[tuple[Any, ...]] = []
    for kind, arg in stream:
        if kind == "batch":
            with log.transaction():
                log.persist_many(arg)
        elif kind == "prune":
            with log.transaction():
                log.prune(arg, 0, 1)
        else:  # a kill -9 after the last commit: a new connection on the same file, the old one dropped
            log = EventLog(tmp)
        seen.append((tuple(log.views.client_status()), tuple(log.clients())))
    return seen


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_folded_counters_read_as_the_row_by_row_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    stream = _stream(seed)
    assert sum(k == "reopen" for k, _ in stream) and sum(k == "prune" for k, _ in stream) == 2
    new = _run(tmp_path / "new", stream)
    monkeypatch.setitem(writer.WRITERS, UpdateRecord, _old_updates)
    monkeypatch.setitem(writer.TABLES, UpdateRecord, OLD_TABLES)
    monkeypatch.setattr(writer, "fold_clients", lambda db: None)
    old = _run(tmp_path / "old", stream)
    assert len(new) == len(old)
    for i, (got, want) in enumerate(zip(new, old, strict=True)):
        assert got == want, (i, stream[i][0])
    assert any(c.updates > 2 for c in new[-1][0])


def test_a_close_folds_the_rows_into_the_stored_row(tmp_path: Path) -> None:
    """After the close the stored clients row holds the counts (the reader adds nothing): the fold ran."""
    stream = [s for s in _stream(5) if s[0] == "batch"]
    log = EventLog(tmp_path / "f")
    for _, batch in stream:
        with log.transaction():
            log.persist_many(batch)
    assert int(str(log.get_meta(FOLD_KEY))) < last_rowid(log.db)  # the late updates after the last close
    with log.transaction():  # a close that used none of them
        log.persist(ResultRecord(ResultRow(8, (8,), (0.5,), 0.01, "rademacher", 0, "0" * 64, 99.0, 1.0), ()))
    stored = {
        c: (n, at) for c, n, at in log.db.execute("SELECT client, updates, last_update_at FROM clients")
    }
    assert {c.client: (c.updates, c.last_update_at) for c in log.views.client_status()} == stored
    assert int(str(log.get_meta(FOLD_KEY))) == last_rowid(log.db)
    log.close()


def test_a_log_of_an_older_build_opens_with_its_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older build counted each row when written and kept no mark: opening marks every row folded."""
    stream = [s for s in _stream(6) if s[0] == "batch"]
    half = len(stream) // 2
    ref = _run(tmp_path / "ref", [("batch", b) for _, b in stream])  # this build from the start
    with monkeypatch.context() as m:  # the older build: row by row, no mark
        m.setitem(writer.WRITERS, UpdateRecord, _row_by_row)
        m.setitem(writer.TABLES, UpdateRecord, OLD_TABLES)
        m.setattr(writer, "fold_clients", lambda db: None)
        log = EventLog(tmp_path / "old")
        with log.transaction():
            log.delete_meta(FOLD_KEY)
        for _, batch in stream[:half]:
            with log.transaction():
                log.persist_many(batch)
        log.close()
    ro = EventLog(tmp_path / "old", readonly=True)  # a reader that cannot mark: every row is folded
    assert ro.get_meta(FOLD_KEY) is None and ro.views.client_status() == list(ref[half - 1][0])
    ro.close()
    log = EventLog(tmp_path / "old")
    assert int(str(log.get_meta(FOLD_KEY))) == last_rowid(log.db) > 0
    assert tuple(log.views.client_status()) == ref[half - 1][0]
    for i, (_, batch) in enumerate(stream[half:], start=half):
        with log.transaction():
            log.persist_many(batch)
        assert (tuple(log.views.client_status()), tuple(log.clients())) == ref[i]
    log.close()


def test_a_prune_of_the_last_rows_lets_their_rowids_be_reused(tmp_path: Path) -> None:
    """SQLite gives a new row the largest rowid + 1: after a prune deleted the last rows, new rows reuse
    rowids at or below the old mark, so the prune moves the mark back to the last row left."""
    log = EventLog(tmp_path / "p")
    ups: list[Record] = [
        UpdateRecord(UpdateRow(c, 0, 1, (0.5,), 4, 1.0, 2.0 + i, "accepted", None), None)
        for i, c in enumerate(CLIENTS)
    ]
    with log.transaction():
        log.persist_many(
            [*(JoinRecord(c, "joined", "", "f", "m", 4, 1.0, {}, -1, 1.0) for c in CLIENTS), *ups]
        )
        log.persist(ResultRecord(ResultRow(0, (0,), (0.5,), 0.01, "rademacher", 6, "0" * 64, 9.0, 1.0), ()))
    with log.transaction():
        assert log.prune(1, 0, 1)["updates"] == len(CLIENTS)
    assert last_rowid(log.db) == 0 == int(str(log.get_meta(FOLD_KEY)))
    with log.transaction():
        log.persist(UpdateRecord(UpdateRow("a", 1, 1, (0.5,), 4, 1.0, 10.0, "accepted", None), None))
    assert last_rowid(log.db) == 1  # reused
    a = log.views.client_status()[0]
    assert (a.client, a.updates, a.last_update_at, a.seen_at) == ("a", 2, 10.0, 10.0)
    log.close()


def test_updates_are_keyed_round_first_and_an_older_layout_writes_the_same_rows(tmp_path: Path) -> None:
    """A new log's `updates` key leads with the round (a batch's rows share the open round's index pages);
    a log an older build created keeps (client, round) and takes the same records to the same rows."""
    new = EventLog(tmp_path / "new")
    pk = [r[2] for r in new.db.execute("PRAGMA index_info(sqlite_autoindex_updates_1)").fetchall()]
    assert pk == ["round", "client"]
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    con = sqlite3.connect(old_dir / DB_NAME)
    con.executescript(SCHEMA.replace("PRIMARY KEY (round, client)", "PRIMARY KEY (client, round)"))
    con.close()
    old = EventLog(old_dir)
    assert [r[2] for r in old.db.execute("PRAGMA index_info(sqlite_autoindex_updates_1)").fetchall()] == ["client", "round"]
    for log in (new, old):
        with log.transaction():
            log.persist_many(records())
    assert dump(old) == dump(new)
    assert old.views.latest_gradips() == new.views.latest_gradips() == {
        c: g for c in ("a", "b", "c") if (g := new.views.latest_gradip(c)) is not None}  # fmt: skip
    assert set(new.views.latest_gradips()) == {"a", "b", "c"}
    new.close()
    old.close()
