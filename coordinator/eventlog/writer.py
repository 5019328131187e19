"""Every write to the event log: one writer per record type of the round book, each taking a list.

`persist_many(db, records)` groups a batch into runs of one record type and hands each run to its
writer, which issues one statement (usually one `executemany`) per table it writes; one record is a run
of one (`EventLog.persist(r)` = `persist_many([r])`), so there is exactly one SQL path per record type.
The callers (`EventLog`) check that a transaction is open; nothing here commits.

Below the record writers: the writes that are not round-book records (meta, checkpoints, retention).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.eventlog.rows import (
    FOLD_KEY,
    UNFOLDED,
    UNFOLDED_WITH,
    f64_blob,
    folded_rowid,
    last_rowid,
    opt,
    steps_json,
)
from coordinator.logstore import Store
from coordinator.records import (
    COORDINATOR_EVAL,
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
    Record,
    RejectRecord,
    ReplanRecord,
    ResultRecord,
    SeenRecord,
    UpdateRecord,
)

REJECT_LOG_KEEP = 1000  # reject_log keeps about the newest this many rows (pruned every 100th)


def persist_many(db: Store, records: Sequence[Record]) -> None:
    """Write a batch of records, one writer call per run of one type.

    The final state is the same as writing each record alone, in order: a record may only move ahead of
    records that write none of its tables (`TABLES`), so records of one type are gathered while nothing
    between them touches their tables. During a round the batch is Update, Drift, Update, Drift, ...:
    two statements instead of three per update."""
    groups: list[tuple[type, list[Record]]] = []
    last: type | None = None
    into: list[Record] = []  # the group the record before went to
    for rec in records:
        kind = type(rec)
        if kind is last:  # the same type as the record before: nothing in between, the same group
            into.append(rec)
            continue
        tables = TABLES.get(kind)
        if tables is None:
            raise TypeError(f"EventLog.persist_many: not a record: {rec!r}")
        target = None
        for i in range(len(groups) - 1, -1, -1):
            gk = groups[i][0]
            if gk is kind:
                target = i
                break
            if not TABLES[gk].isdisjoint(tables):  # a record in between writes one of our tables: keep the order
                break
        if target is None:
            groups.append((kind, []))
            target = len(groups) - 1
        last, into = kind, groups[target][1]
        into.append(rec)
    for kind, recs in groups:
        WRITERS[kind](db, recs)


# -- one writer per record type ---------------------------------------------------------------------
# a heartbeat may be written after records that saw the client later (the pump batches heartbeats,
# coordinator/server.py): seen_at only moves forward
_HEARTBEAT = """INSERT INTO clients(client, state, online, seen_at, hb_at, telemetry) VALUES (?, 'unknown', 1, ?, ?, ?)
   ON CONFLICT(client) DO UPDATE SET online=1, hb_at=excluded.hb_at, telemetry=excluded.telemetry,
       seen_at=CASE WHEN clients.seen_at IS NULL OR clients.seen_at < excluded.seen_at THEN excluded.seen_at
                    ELSE clients.seen_at END"""


def _joins(db: Store, recs: Sequence[JoinRecord]) -> None:
    db.executemany(
        """INSERT INTO clients(client, state, reason, fingerprint, mask_id, n_samples, budget_gib, capabilities,
               last_round, joined_at, online, seen_at)
           VALUES (?,?,?,?,?,?,?,?,?,?,1,?)
           ON CONFLICT(client) DO UPDATE SET state=excluded.state, reason=excluded.reason,
               fingerprint=excluded.fingerprint, mask_id=excluded.mask_id, n_samples=excluded.n_samples,
               budget_gib=excluded.budget_gib, capabilities=excluded.capabilities,
               last_round=excluded.last_round, joined_at=excluded.joined_at, online=1, seen_at=excluded.seen_at""",
        [(r.client, r.state, r.reason, r.fingerprint, r.mask_id, r.n_samples, r.budget_gib, json.dumps(r.capabilities),
          r.last_round, r.now, r.now) for r in recs],
    )  # fmt: skip


def _online(db: Store, recs: Sequence[OnlineRecord]) -> None:
    db.executemany(
        """INSERT INTO clients(client, state, online, seen_at) VALUES (?, 'unknown', ?, ?)
           ON CONFLICT(client) DO UPDATE SET online=excluded.online, seen_at=excluded.seen_at""",
        [(r.client, int(r.online), r.now) for r in recs],
    )


def _heartbeats(db: Store, recs: Sequence[HeartbeatRecord]) -> None:
    db.executemany(_HEARTBEAT, [(r.client, r.now, r.now, json.dumps(r.telemetry)) for r in recs])
    # a heartbeat repeats the device's latest evaluation (every eval_every rounds): the first one per
    # (client, round) is stored, as `_evals` stores the coordinator's own
    evals = [(r.client, int(t["eval_round"]), float(t["eval_loss"]), opt(t.get("eval_acc")), int(t.get("eval_n") or 0),
              r.now) for r in recs if (t := r.telemetry).get("eval_round") is not None and t.get("eval_loss") is not None]  # fmt: skip
    if evals:
        _insert_evals(db, evals)
    db.executemany(
        "INSERT INTO resources(client, round, ts, rss_bytes, peak_mem_bytes, cpu_pct, step_time_s, peak_rss_bytes) "
        "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(client, round) DO UPDATE SET ts=excluded.ts, "
        "rss_bytes=excluded.rss_bytes, peak_mem_bytes=excluded.peak_mem_bytes, cpu_pct=excluded.cpu_pct, "
        "step_time_s=excluded.step_time_s, peak_rss_bytes=CASE WHEN excluded.peak_rss_bytes IS NULL OR "
        "resources.peak_rss_bytes > excluded.peak_rss_bytes THEN resources.peak_rss_bytes ELSE excluded.peak_rss_bytes END",
        # the round's last heartbeat (its step peak covers the round); the largest process peak of the round (a
        # client restarted within the round reports a fresh, lower high-water mark)
        [(r.client, int(t.get("round", -1)), r.now, t.get("rss_bytes"), t.get("peak_mem_bytes"), t.get("cpu_pct"),
          t.get("step_time_s"), t.get("peak_rss_bytes")) for r in recs if (t := r.telemetry)],
    )  # fmt: skip


def _seen(db: Store, recs: Sequence[SeenRecord]) -> None:
    db.executemany("UPDATE clients SET seen_at=? WHERE client=?", [(r.now, r.client) for r in recs])


def _offline(db: Store, recs: Sequence[OfflineRecord]) -> None:
    db.executemany("UPDATE clients SET online=0 WHERE client=?", [(c,) for r in recs for c in r.clients])


def _plans(db: Store, recs: Sequence[PlanRecord]) -> None:
    db.executemany(
        """INSERT INTO rounds(round, state, opened_at, deadline, seeds, steps, lr, eps, dist, batch_size,
               base_round, base_checksum, extensions) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
        [(p.round, p.state, p.opened_at, p.deadline, json.dumps(list(p.seeds)), steps_json(p.steps, p.sample_max),
          p.lr, p.eps, p.dist, p.batch_size, p.base_round, p.base_checksum, p.extensions) for p in (r.plan for r in recs)],
    )  # fmt: skip


def _replans(db: Store, recs: Sequence[ReplanRecord]) -> None:
    db.executemany(
        "UPDATE rounds SET steps=?, deadline=?, extensions=? WHERE round=?",
        [(steps_json(r.steps, r.sample_max), r.deadline, r.extensions, r.round) for r in recs],
    )


def _updates(db: Store, recs: Sequence[UpdateRecord]) -> None:
    db.executemany(
        """INSERT INTO updates(client, round, msg_id, grads, n_samples, loss, received_at, status, gradip)
           VALUES (?,?,?,?,?,?,?,?,?)""",
        [(u.client, u.round, str(u.msg_id), f64_blob(u.grads), u.n_samples, u.loss, u.received_at, u.status,
          None if r.gradip is None else f64_blob(r.gradip)) for r in recs for u in (r.update,)],
    )  # fmt: skip
    # the client's counters (updates, last_update_at, seen_at) are not written here: `fold_clients` adds the
    # rows to them when a round closes, and the readers add the rows not folded yet (`rows.client_sql`)


def _results(db: Store, recs: Sequence[ResultRecord]) -> None:
    fold_clients(db)  # before the marks: a fold reads only the rows' client and received_at
    db.executemany(
        """INSERT INTO results(round, seeds, scalars, lr, dist, n_clients, values_checksum, closed_at, duration_s)
           VALUES (?,?,?,?,?,?,?,?,?)""",
        [(x.round, json.dumps(list(x.seeds)), f64_blob(x.scalars), x.lr, x.dist, x.n_clients, x.values_checksum,
          x.closed_at, x.duration_s) for x in (r.result for r in recs)],
    )  # fmt: skip
    db.executemany(
        "UPDATE rounds SET state='closed', closed_at=? WHERE round=?", [(r.result.closed_at, r.result.round) for r in recs]
    )
    # the updates each result used: record by record, its on-time ones before its folded late ones; when a
    # record used every update stored `accepted` for its round (no spike left out), those by one statement
    for r in recs:
        rd = r.result.round
        if r.all_accepted:
            db.execute("UPDATE updates SET used_in=? WHERE round=? AND status='accepted'", (rd, rd))
        used = [(rd, st, c, ur) for status in ("accepted", "folded") for c, ur, st in r.used
                if st == status and not (r.all_accepted and st == "accepted" and ur == rd)]  # fmt: skip
        if used:
            db.executemany("UPDATE updates SET used_in=?, status=? WHERE client=? AND round=?", used)


def _drift(db: Store, recs: Sequence[DriftRecord]) -> None:
    db.executemany(
        """INSERT INTO drift(client, n_steps, early, late, rho_later, rho_quie, updated_at) VALUES (?,?,?,?,?,?,?)
           ON CONFLICT(client) DO UPDATE SET n_steps=excluded.n_steps, early=excluded.early, late=excluded.late,
               rho_later=excluded.rho_later, rho_quie=excluded.rho_quie, updated_at=excluded.updated_at""",
        [(r.client, r.n_steps, r.early, r.late, r.rho_later, r.rho_quie, r.now) for r in recs],
    )


def _limits(db: Store, recs: Sequence[LimitRecord]) -> None:
    """The (sticky) MEERKAT-VP flag; a client already limited keeps its first round."""
    db.executemany(
        """INSERT INTO drift(client, n_steps, limited_round, limited_at, updated_at) VALUES (?, 0, ?, ?, ?)
           ON CONFLICT(client) DO UPDATE SET limited_round=COALESCE(drift.limited_round, excluded.limited_round),
               limited_at=COALESCE(drift.limited_at, excluded.limited_at)""",
        [(r.client, r.round, r.now, r.now) for r in recs],
    )


def _rejects(db: Store, recs: Sequence[RejectRecord]) -> None:
    db.executemany(
        "INSERT INTO rejects(reason, count) VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count=rejects.count+1",
        [(r.reason,) for r in recs],
    )
    for r in recs:  # one by one: every 100th row trims the log to its newest REJECT_LOG_KEEP
        db.execute(
            "INSERT INTO reject_log(ts, client, topic, reason, detail) VALUES (?,?,?,?,?)",
            (r.now, r.client, r.topic, r.reason, r.detail[:500]),
        )
        last = db.execute("SELECT MAX(id) FROM reject_log").fetchone()[0]
        if last is not None and int(last) % 100 == 0:
            db.execute("DELETE FROM reject_log WHERE id <= ?", (int(last) - REJECT_LOG_KEEP,))


def _events(db: Store, recs: Sequence[EventRecord]) -> None:
    db.executemany(
        "INSERT INTO events(ts, round, kind, detail) VALUES (?,?,?,?)", [(r.now, r.round, r.kind, r.detail) for r in recs]
    )


def _evals(db: Store, recs: Sequence[EvalRecord]) -> None:
    _insert_evals(db, [(COORDINATOR_EVAL, r.round, r.loss, r.accuracy, r.n, r.now) for r in recs])


def _insert_evals(db: Store, rows: Sequence[tuple[str, int, float, float | None, int, float]]) -> None:
    db.executemany(
        "INSERT INTO evals(source, round, loss, accuracy, n, ts) VALUES (?,?,?,?,?,?) "
        "ON CONFLICT(source, round) DO NOTHING",  # the first evaluation of a (source, round) stays
        rows,
    )


def _duplicates(db: Store, recs: Sequence[DuplicateRecord]) -> None:
    """Per-round counter "duplicate" (re-sent updates acked and ignored)."""
    db.executemany(
        "INSERT INTO round_counts(round, kind, count) VALUES (?, 'duplicate', 1) "
        "ON CONFLICT(round, kind) DO UPDATE SET count=round_counts.count+excluded.count",
        [(r.round,) for r in recs],
    )


def _lr(db: Store, recs: Sequence[LrRecord]) -> None:
    """One row per round; only the newest keeps the controller's state (older ones are cleared)."""
    db.executemany(
        "INSERT INTO lr_decisions(round, lr_used, lr_step, lr_next, action, reason, loss, state, ts) "
        "VALUES (?,?,?,?,?,?,?,?,?)",
        [(r.round, r.lr_used, r.lr_step, r.lr_next, r.action, r.reason, r.loss if math.isfinite(r.loss) else None,
          json.dumps(r.state, sort_keys=True, allow_nan=False), r.now) for r in recs],
    )  # fmt: skip
    db.execute("UPDATE lr_decisions SET state=NULL WHERE round < ? AND state IS NOT NULL", (recs[-1].round,))


# the tables each record writes: persist_many reorders two records only when these are disjoint
TABLES: dict[type, frozenset[str]] = {
    JoinRecord: frozenset({"clients"}), OnlineRecord: frozenset({"clients"}),
    HeartbeatRecord: frozenset({"clients", "evals", "resources"}), SeenRecord: frozenset({"clients"}),
    OfflineRecord: frozenset({"clients"}), PlanRecord: frozenset({"rounds"}), ReplanRecord: frozenset({"rounds"}),
    UpdateRecord: frozenset({"updates"}), ResultRecord: frozenset({"results", "rounds", "updates", "clients", "meta"}),
    DriftRecord: frozenset({"drift"}), LimitRecord: frozenset({"drift"}),
    RejectRecord: frozenset({"rejects", "reject_log"}), EventRecord: frozenset({"events"}),
    EvalRecord: frozenset({"evals"}), DuplicateRecord: frozenset({"round_counts"}),
    LrRecord: frozenset({"lr_decisions"}),
}  # fmt: skip
WRITERS: dict[type, Callable[[Store, Sequence[Any]], None]] = {
    JoinRecord: _joins, OnlineRecord: _online, HeartbeatRecord: _heartbeats, SeenRecord: _seen,
    OfflineRecord: _offline, PlanRecord: _plans, ReplanRecord: _replans, UpdateRecord: _updates,
    ResultRecord: _results, DriftRecord: _drift, LimitRecord: _limits, RejectRecord: _rejects,
    EventRecord: _events, EvalRecord: _evals, DuplicateRecord: _duplicates, LrRecord: _lr,
}  # fmt: skip


# -- the clients' update counters, folded once per round ------------------------------------------
# `clients.updates`, `last_update_at` and the update's `seen_at` cover the `updates` rows up to rowid
# meta[FOLD_KEY]; a row after it counts through `rows.client_sql` (the readers) until the next fold. An
# Update then writes one table, not a random `clients` page per update (docs/SCALING.md "Seventh pass").
def fold_clients(db: Store) -> None:
    """Add the updates rows after the mark to their clients' counters, then move the mark to the last row:
    the same values as counting each row when it was written (`seen_at` only moves forward, as a
    heartbeat's). Run by each round's close (`_results`) and by `prune` before it deletes rows."""
    db.execute(
        f"""{UNFOLDED_WITH}UPDATE clients SET updates = clients.updates + u.n, last_update_at = u.at,
               seen_at = CASE WHEN clients.seen_at IS NULL OR clients.seen_at < u.at THEN u.at ELSE clients.seen_at END
           FROM ({UNFOLDED}) AS u WHERE clients.client = u.client""",
        (folded_rowid(db),),
    )
    set_meta(db, FOLD_KEY, str(last_rowid(db)))


# -- writes that are not round-book records ---------------------------------------------------------
def set_meta(db: Store, key: str, value: str) -> None:
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))


def delete_meta(db: Store, key: str) -> None:
    db.execute("DELETE FROM meta WHERE key = ?", (key,))


def add_checkpoint(db: Store, round: int, path: str, checksum: str, now: float) -> None:
    db.execute(
        "INSERT INTO checkpoints(round, path, values_checksum, written_at) VALUES (?,?,?,?) ON CONFLICT(round) "
        "DO UPDATE SET path=excluded.path, values_checksum=excluded.values_checksum, written_at=excluded.written_at",
        (round, path, checksum, now),
    )


def remove_checkpoint(db: Store, round: int) -> None:
    db.execute("DELETE FROM checkpoints WHERE round=?", (round,))


def prune(db: Store, before: int, results_before: int, keep_per_client: int) -> dict[str, int]:
    """Delete what neither recovery nor the audit window needs (docs/COORDINATOR.md "Retention"):

    updates       of rounds < before, except pending late ones and each client's first and last
                  `keep_per_client` updates with GradIP (the MEERKAT-VP monitor rebuilds its first and
                  last window from them; the step count comes from the drift table)
    rounds        closed plans of rounds < before;  events, round_counts: rounds < before
    lr_decisions  rounds < before, never the row holding the controller's state (the newest)
    results       rounds < results_before (the caller keeps those after the oldest checkpoint and the
                  last replay_max)
    Returns the rows deleted per table."""
    out = {}
    fold_clients(db)  # the rows deleted below are in the clients' counters first
    cur = db.execute(
        """DELETE FROM updates WHERE round < ? AND status != 'late' AND rowid NOT IN (
               SELECT rid FROM (SELECT rowid AS rid,
                   ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid) AS a,
                   ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid DESC) AS b
                   FROM updates WHERE gradip IS NOT NULL) AS firstlast WHERE a <= ? OR b <= ?)""",
        (before, keep_per_client, keep_per_client),
    )
    out["updates"] = cur.rowcount
    set_meta(db, FOLD_KEY, str(last_rowid(db)))  # every row is folded; SQLite may reuse a deleted last rowid
    out["rounds"] = db.execute("DELETE FROM rounds WHERE round < ? AND state = 'closed' AND round NOT IN "
                               "(SELECT round FROM updates WHERE status = 'late')", (before,)).rowcount  # fmt: skip
    out["events"] = db.execute("DELETE FROM events WHERE round < ?", (before,)).rowcount
    out["round_counts"] = db.execute("DELETE FROM round_counts WHERE round < ?", (before,)).rowcount
    out["lr_decisions"] = db.execute("DELETE FROM lr_decisions WHERE round < ? AND state IS NULL", (before,)).rowcount
    out["results"] = db.execute("DELETE FROM results WHERE round < ?", (results_before,)).rowcount
    return out
