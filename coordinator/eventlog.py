"""The coordinator's durable event log: one SQLite file in WAL mode, the source of truth after kill -9.

What is logged (schema below): the client registry (join, status, last heartbeat + telemetry), every
round plan, every accepted update (its per-step scalars, kept for MEERKAT-VP analysis), every round
result (seeds + aggregated scalars: scalar replay and restart rebuild from them), reject counters by
reason, round decisions (events), MEERKAT-VP drift state per client and written checkpoints.

Ingest contract: the caller runs a batch of writes inside `with log.transaction():` and acks the MQTT
messages only after the block returns (= committed). The round book (`coordinator/rounds.py`) decides
what to write; `persist(record)` writes one of its records. Dedupe is the primary key (client, round)
of `updates` plus its stored msg_id.

This class owns ALL of the SQL: the pump, recovery, `meerkat status`, export and tests go through its
methods (typed rows from `coordinator/records.py`), never through their own SELECTs.

Seeds and msg_ids are u64, which SQLite INTEGER (signed i64) cannot hold: they are stored as JSON text /
decimal text. Scalars are stored as little-endian float64 blobs (exact round trip).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from coordinator.logstore import DB_NAME as DB_NAME  # re-exported: status, export, tests
from coordinator.logstore import Store, open_store
from coordinator.records import (
    COORDINATOR_EVAL,
    ClientRow,
    ClientStatusRow,
    DriftRecord,
    DriftRow,
    DuplicateRecord,
    EvalRecord,
    EvalRow,
    EventRecord,
    EventRow,
    HeartbeatRecord,
    JoinRecord,
    LimitRecord,
    OfflineRecord,
    OnlineRecord,
    OpenRoundRow,
    PlanRecord,
    PlanRow,
    Record,
    RejectRecord,
    ReplanRecord,
    ResultRecord,
    ResultRow,
    RoundPoint,
    SeenRecord,
    UpdateRecord,
    UpdateRow,
)
from shared.prng import Dist

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- joined | rejected
    reason TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    mask_id TEXT NOT NULL DEFAULT '',
    n_samples INTEGER NOT NULL DEFAULT 0,
    budget_gib REAL NOT NULL DEFAULT 0,
    capabilities TEXT NOT NULL DEFAULT '{}',
    last_round INTEGER NOT NULL DEFAULT -1,
    joined_at REAL,
    online INTEGER NOT NULL DEFAULT 0,
    seen_at REAL,                      -- last join/status/heartbeat/update/sync
    hb_at REAL,
    telemetry TEXT NOT NULL DEFAULT '{}',
    last_update_at REAL,
    updates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,               -- open | closed
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    seeds TEXT NOT NULL,               -- JSON list of u64
    steps TEXT NOT NULL,               -- JSON {client: T_k}
    lr REAL NOT NULL, eps REAL NOT NULL, dist TEXT NOT NULL, batch_size INTEGER NOT NULL,
    base_round INTEGER NOT NULL,
    base_checksum TEXT NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS updates (
    client TEXT NOT NULL,
    round INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    grads BLOB NOT NULL,               -- float64 LE, one per local step
    n_samples INTEGER NOT NULL,
    loss REAL NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,              -- accepted | late | dropped | folded
    used_in INTEGER,                   -- round whose result used it (NULL while pending)
    gradip BLOB,                       -- float64 LE per step: g_{k,t} * c_t (MEERKAT-VP), if the mask has grads
    PRIMARY KEY (client, round)
);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round, status);
CREATE TABLE IF NOT EXISTS results (
    round INTEGER PRIMARY KEY,
    seeds TEXT NOT NULL,               -- JSON list of u64 (may include late seeds of an older round)
    scalars BLOB NOT NULL,             -- float64 LE
    lr REAL NOT NULL, dist TEXT NOT NULL,
    n_clients INTEGER NOT NULL,
    values_checksum TEXT NOT NULL,
    closed_at REAL NOT NULL,
    duration_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- per-round counters beside the records (duplicates ignored: re-sent updates after reconnects, storms)
CREATE TABLE IF NOT EXISTS round_counts (
    round INTEGER NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (round, kind)
);
CREATE TABLE IF NOT EXISTS reject_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, client TEXT NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, round INTEGER, kind TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drift (
    client TEXT PRIMARY KEY,           -- MEERKAT-VP state per client (coordinator/drift.py)
    n_steps INTEGER NOT NULL,          -- GradIP values observed
    early REAL, late REAL,             -- mean |GradIP| of the first / last window (NULL until both filled)
    rho_later REAL, rho_quie REAL,
    limited_round INTEGER,             -- round whose update flagged it (sticky); NULL = not limited
    limited_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY, path TEXT NOT NULL, values_checksum TEXT NOT NULL, written_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    source TEXT NOT NULL,              -- client id (its Heartbeat eval keys) or '@coordinator' (eval_data)
    round INTEGER NOT NULL,            -- values after this round were evaluated (-1 = v_0)
    loss REAL NOT NULL, accuracy REAL, n INTEGER NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (source, round)
);
"""

REJECT_LOG_KEEP = 1000

# a heartbeat may be written after records that saw the client later (the pump batches heartbeats,
# coordinator/server.py): seen_at only moves forward
_HEARTBEAT = """INSERT INTO clients(client, state, online, seen_at, hb_at, telemetry) VALUES (?, 'unknown', 1, ?, ?, ?)
   ON CONFLICT(client) DO UPDATE SET online=1, hb_at=excluded.hb_at, telemetry=excluded.telemetry,
       seen_at=CASE WHEN clients.seen_at IS NULL OR clients.seen_at < excluded.seen_at THEN excluded.seen_at
                    ELSE clients.seen_at END"""
_ONLINE = """INSERT INTO clients(client, state, online, seen_at) VALUES (?, 'unknown', ?, ?)
   ON CONFLICT(client) DO UPDATE SET online=excluded.online, seen_at=excluded.seen_at"""
_TOUCH = "UPDATE clients SET seen_at=? WHERE client=?"
_PUT_DRIFT = """INSERT INTO drift(client, n_steps, early, late, rho_later, rho_quie, updated_at) VALUES (?,?,?,?,?,?,?)
   ON CONFLICT(client) DO UPDATE SET n_steps=excluded.n_steps, early=excluded.early, late=excluded.late,
       rho_later=excluded.rho_later, rho_quie=excluded.rho_quie, updated_at=excluded.updated_at"""


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """(" WHERE a AND b", [arg_a, arg_b]) from (clause, argument) pairs, leaving out those whose argument
    is None; ("", []) when none is left. The readers' optional filters."""
    kept = [(clause, arg) for clause, arg in conditions if arg is not None]
    return (" WHERE " + " AND ".join(c for c, _ in kept) if kept else ""), [a for _, a in kept]


def f64_blob(xs: Sequence[float]) -> bytes:
    """Little-endian float64s (struct: the same bytes as numpy "<f8", a few times cheaper for ~10 values)."""
    v = list(xs)
    return struct.pack(f"<{len(v)}d", *v)


def f64_list(blob: bytes) -> list[float]:
    return [float(x) for x in np.frombuffer(blob, dtype="<f8")]


class EventLog:
    """One writer connection (the coordinator thread). Readers (`meerkat status`) open their own."""

    def __init__(
        self, state_dir: str | Path, synchronous: str = "full", *, readonly: bool = False, event_log: str = "sqlite"
    ) -> None:
        """readonly=True (`meerkat status`): open an existing log (SQLite: `mode=ro`; FileNotFoundError if
        absent). `event_log`: "sqlite" (state_dir/events.sqlite) or a postgresql:// URL (coordinator/logstore.py)."""
        self.dir = Path(state_dir)
        self.path = self.dir / DB_NAME
        self._in_tx = False
        self.db: Store = open_store(event_log, self.dir, synchronous, readonly=readonly)
        if readonly and self.db.kind == "sqlite":
            return
        self.db.create_schema(_SCHEMA)
        if self.get_meta("schema_version") is None:
            with self.transaction():
                self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on an exception). Not re-entrant."""
        if self._in_tx:
            raise RuntimeError("EventLog.transaction is not re-entrant")
        self._in_tx = True
        self.db.begin()
        try:
            yield
        except BaseException:
            self.db.rollback()
            raise
        else:
            self.db.commit()
        finally:
            self._in_tx = False

    def _need_tx(self) -> None:
        if not self._in_tx:
            raise RuntimeError("write outside EventLog.transaction()")

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._need_tx()
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value)
        )

    def beat(self, now: float, *, stopped: bool = False) -> None:
        """The coordinator's liveness for `meerkat status`: meta `alive_at` (written every few seconds by
        the running pump), `stopped_at` on a clean stop. A kill -9 leaves `alive_at` to age."""
        self._need_tx()
        self.set_meta("alive_at", repr(float(now)))
        if stopped:
            self.set_meta("stopped_at", repr(float(now)))
        else:
            self.db.execute("DELETE FROM meta WHERE key = 'stopped_at'")

    # -- clients ---------------------------------------------------------------------------------
    def upsert_join(
        self, client: str, *, state: str, reason: str, fingerprint: str, mask_id: str, n_samples: int,
        budget_gib: float, capabilities: dict[str, Any], last_round: int, now: float,
    ) -> None:  # fmt: skip
        self._need_tx()
        self.db.execute(
            """INSERT INTO clients(client, state, reason, fingerprint, mask_id, n_samples, budget_gib, capabilities,
                   last_round, joined_at, online, seen_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,1,?)
               ON CONFLICT(client) DO UPDATE SET state=excluded.state, reason=excluded.reason,
                   fingerprint=excluded.fingerprint, mask_id=excluded.mask_id, n_samples=excluded.n_samples,
                   budget_gib=excluded.budget_gib, capabilities=excluded.capabilities,
                   last_round=excluded.last_round, joined_at=excluded.joined_at, online=1, seen_at=excluded.seen_at""",
            (client, state, reason, fingerprint, mask_id, n_samples, budget_gib, json.dumps(capabilities),
             last_round, now, now),
        )  # fmt: skip

    def set_online(self, client: str, online: bool, now: float) -> None:
        self._need_tx()
        self.db.execute(_ONLINE, (client, int(online), now))

    def record_heartbeat(self, client: str, telemetry: dict[str, Any], now: float) -> None:
        self._need_tx()
        self.db.execute(_HEARTBEAT, (client, now, now, json.dumps(telemetry)))

    def touch(self, client: str, now: float) -> None:
        self._need_tx()
        self.db.execute(_TOUCH, (now, client))

    def mark_offline(self, clients: Sequence[str]) -> None:
        self._need_tx()
        self.db.executemany("UPDATE clients SET online=0 WHERE client=?", [(c,) for c in clients])

    def clients(self) -> list[ClientRow]:
        """The registry as the round book needs it (recovery), sorted by id."""
        q = "SELECT client, state, fingerprint, mask_id, n_samples, online, seen_at FROM clients ORDER BY client"
        return [
            ClientRow(str(c), str(st), str(fp), str(m), int(n), bool(on), None if seen is None else float(seen))
            for c, st, fp, m, n, on, seen in self.db.execute(q)
        ]

    def client_status(self) -> list[ClientStatusRow]:
        """Every registry column `meerkat status` shows, sorted by id."""
        q = """SELECT client, state, reason, online, n_samples, last_round, seen_at, hb_at, telemetry, last_update_at,
                      updates FROM clients ORDER BY client"""
        return [
            ClientStatusRow(str(c), str(st), str(rs), bool(on), int(n), int(lr), _opt(seen), _opt(hb),
                            json.loads(tele or "{}"), _opt(lu), int(nup))
            for c, st, rs, on, n, lr, seen, hb, tele, lu, nup in self.db.execute(q)
        ]  # fmt: skip

    # -- rounds ----------------------------------------------------------------------------------
    def insert_plan(self, p: PlanRow) -> None:
        self._need_tx()
        self.db.execute(
            """INSERT INTO rounds(round, state, opened_at, deadline, seeds, steps, lr, eps, dist, batch_size,
                   base_round, base_checksum, extensions) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
            (p.round, p.state, p.opened_at, p.deadline, json.dumps(list(p.seeds)), json.dumps(p.steps, sort_keys=True),
             p.lr, p.eps, p.dist, p.batch_size, p.base_round, p.base_checksum, p.extensions),
        )  # fmt: skip

    def replan(self, round: int, steps: dict[str, int], deadline: float, extensions: int) -> None:
        self._need_tx()
        self.db.execute(
            "UPDATE rounds SET steps=?, deadline=?, extensions=? WHERE round=?",
            (json.dumps(steps, sort_keys=True), deadline, extensions, round),
        )

    def _plan(self, row: Sequence[Any]) -> PlanRow:
        return PlanRow(
            round=int(row[0]), state=str(row[1]), opened_at=float(row[2]), deadline=float(row[3]),
            seeds=tuple(int(s) for s in json.loads(row[4])), steps={str(k): int(v) for k, v in json.loads(row[5]).items()},
            lr=float(row[6]), eps=float(row[7]), dist=cast(Dist, str(row[8])), batch_size=int(row[9]), base_round=int(row[10]),
            base_checksum=str(row[11]), extensions=int(row[12]),
        )  # fmt: skip

    _PLAN_COLS = "round, state, opened_at, deadline, seeds, steps, lr, eps, dist, batch_size, base_round, base_checksum, extensions"

    def get_plan(self, round: int) -> PlanRow | None:
        row = self.db.execute(f"SELECT {self._PLAN_COLS} FROM rounds WHERE round=?", (round,)).fetchone()
        return None if row is None else self._plan(row)

    def open_plan(self) -> PlanRow | None:
        row = self.db.execute(
            f"SELECT {self._PLAN_COLS} FROM rounds WHERE state='open' ORDER BY round DESC LIMIT 1"
        ).fetchone()
        return None if row is None else self._plan(row)

    def plans(self, since: int) -> list[PlanRow]:
        """Plans of rounds >= since, in round order."""
        q = f"SELECT {self._PLAN_COLS} FROM rounds WHERE round>=? ORDER BY round"
        return [self._plan(row) for row in self.db.execute(q, (since,)).fetchall()]

    def open_round(self) -> OpenRoundRow | None:
        """The open round's progress (for `meerkat status`), if one is open."""
        row = self.db.execute(
            "SELECT round, opened_at, deadline, steps, extensions FROM rounds WHERE state='open' ORDER BY round DESC"
        ).fetchone()
        if row is None:
            return None
        got = self.db.execute(
            "SELECT COUNT(*) FROM updates WHERE round=? AND status='accepted'", (row[0],)
        ).fetchone()[0]
        return OpenRoundRow(int(row[0]), float(row[1]), float(row[2]), len(json.loads(row[3])), int(got), int(row[4]))

    # -- updates ---------------------------------------------------------------------------------
    def insert_update(
        self, client: str, round: int, msg_id: int, grads: Sequence[float], n_samples: int, loss: float,
        status: str, now: float, gradip: Sequence[float] | None = None,
    ) -> None:  # fmt: skip
        self._need_tx()
        self.db.execute(
            """INSERT INTO updates(client, round, msg_id, grads, n_samples, loss, received_at, status, gradip)
               VALUES (?,?,?,?,?,?,?,?,?)""",
            (client, round, str(msg_id), f64_blob(grads), n_samples, loss, now, status,
             None if gradip is None else f64_blob(gradip)),
        )  # fmt: skip
        self.db.execute(
            "UPDATE clients SET last_update_at=?, seen_at=?, updates=updates+1 WHERE client=?",
            (now, now, client),
        )

    def updates(self, round: int | None = None, status: str | None = None) -> list[UpdateRow]:
        where, args = _where(("round=?", round), ("status=?", status))
        q = "SELECT client, round, msg_id, grads, n_samples, loss, received_at, status, used_in FROM updates"
        q += where + " ORDER BY round, client"
        return [
            UpdateRow(str(c), int(r), int(m), tuple(f64_list(g)), int(n), float(lo), float(ts), str(st),
                      None if u is None else int(u))
            for c, r, m, g, n, lo, ts, st, u in self.db.execute(q, args).fetchall()
        ]  # fmt: skip

    def update_keys(self, since: int) -> dict[tuple[str, int], int]:
        """(client, round) -> msg_id of every stored update of rounds >= since (the round book's dedupe)."""
        q = "SELECT client, round, msg_id FROM updates WHERE round>=?"
        return {(str(c), int(r)): int(m) for c, r, m in self.db.execute(q, (since,))}

    def latest_gradip(self, client: str) -> list[float] | None:
        """GradIP values of the client's newest update that has them (MEERKAT-VP signal), if any."""
        row = self.db.execute(
            "SELECT gradip FROM updates WHERE client=? AND gradip IS NOT NULL ORDER BY round DESC LIMIT 1",
            (client,),
        ).fetchone()
        return None if row is None else f64_list(row[0])

    def mark_used(self, keys: Sequence[tuple[str, int]], used_in: int, status: str) -> None:
        self._need_tx()
        self.db.executemany(
            "UPDATE updates SET used_in=?, status=? WHERE client=? AND round=?",
            [(used_in, status, c, r) for c, r in keys],
        )

    # -- results ---------------------------------------------------------------------------------
    def insert_result(self, r: ResultRow) -> None:
        self._need_tx()
        self.db.execute(
            """INSERT INTO results(round, seeds, scalars, lr, dist, n_clients, values_checksum, closed_at, duration_s)
               VALUES (?,?,?,?,?,?,?,?,?)""",
            (r.round, json.dumps(list(r.seeds)), f64_blob(r.scalars), r.lr, r.dist, r.n_clients, r.values_checksum,
             r.closed_at, r.duration_s),
        )  # fmt: skip
        self.db.execute("UPDATE rounds SET state='closed', closed_at=? WHERE round=?", (r.closed_at, r.round))

    def results(self, after: int = -1, upto: int | None = None) -> list[ResultRow]:
        """Results with after < round <= upto, in round order."""
        q = "SELECT round, seeds, scalars, lr, dist, n_clients, values_checksum, closed_at, duration_s FROM results WHERE round>?"
        args: list[Any] = [after]
        if upto is not None:
            q += " AND round<=?"
            args.append(upto)
        return [
            ResultRow(int(rd), tuple(int(s) for s in json.loads(sd)), tuple(f64_list(sc)), float(lr), cast(Dist, str(d)), int(n),
                      str(ck), float(ts), float(du))
            for rd, sd, sc, lr, d, n, ck, ts, du in self.db.execute(q + " ORDER BY round", args).fetchall()
        ]  # fmt: skip

    def last_result_round(self) -> int:
        row = self.db.execute("SELECT MAX(round) FROM results").fetchone()
        return -1 if row[0] is None else int(row[0])

    def gradip_history(self) -> Iterator[tuple[str, int, list[float]]]:
        """(client, round, GradIP values) of every stored update that has them, in insertion order."""
        q = "SELECT client, round, gradip FROM updates WHERE gradip IS NOT NULL ORDER BY rowid"
        for c, r, g in self.db.execute(q):
            yield str(c), int(r), f64_list(g)

    # -- MEERKAT-VP drift ------------------------------------------------------------------------
    def put_drift(
        self, client: str, n_steps: int, early: float | None, late: float | None, rho_later: float | None,
        rho_quie: float | None, now: float,
    ) -> None:  # fmt: skip
        self._need_tx()
        self.db.execute(_PUT_DRIFT, (client, n_steps, early, late, rho_later, rho_quie, now))

    def set_limited(self, client: str, round: int, now: float) -> None:
        """Persist the (sticky) MEERKAT-VP flag; a client already limited keeps its first round."""
        self._need_tx()
        self.db.execute(
            """INSERT INTO drift(client, n_steps, limited_round, limited_at, updated_at) VALUES (?, 0, ?, ?, ?)
               ON CONFLICT(client) DO UPDATE SET limited_round=COALESCE(drift.limited_round, excluded.limited_round),
                   limited_at=COALESCE(drift.limited_at, excluded.limited_at)""",
            (client, round, now, now),
        )

    def limited_clients(self) -> dict[str, int]:
        """client -> round in which MEERKAT-VP limited it."""
        q = "SELECT client, limited_round FROM drift WHERE limited_round IS NOT NULL ORDER BY client"
        return {str(c): int(r) for c, r in self.db.execute(q)}

    def drift_rows(self) -> list[DriftRow]:
        q = "SELECT client, n_steps, early, late, rho_later, rho_quie, limited_round FROM drift ORDER BY client"
        return [
            DriftRow(str(c), int(n), _opt(e), _opt(la), _opt(rl), _opt(rq), None if lr is None else int(lr))
            for c, n, e, la, rl, rq, lr in self.db.execute(q)
        ]

    # -- rejects, events, checkpoints --------------------------------------------------------------
    def count_reject(self, reason: str, client: str, topic: str, detail: str, now: float) -> None:
        self._need_tx()
        self.db.execute(
            "INSERT INTO rejects(reason, count) VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count=rejects.count+1",
            (reason,),
        )
        self.db.execute(
            "INSERT INTO reject_log(ts, client, topic, reason, detail) VALUES (?,?,?,?,?)",
            (now, client, topic, reason, detail[:500]),
        )
        last = self.db.execute("SELECT MAX(id) FROM reject_log").fetchone()[0]
        if last is not None and int(last) % 100 == 0:
            self.db.execute("DELETE FROM reject_log WHERE id <= ?", (int(last) - REJECT_LOG_KEEP,))

    def count_round(self, round: int, kind: str, n: int = 1) -> None:
        """Add n to the per-round counter `kind` (e.g. "duplicate") of `round`."""
        self._need_tx()
        self.db.execute(
            "INSERT INTO round_counts(round, kind, count) VALUES (?,?,?) "
            "ON CONFLICT(round, kind) DO UPDATE SET count=round_counts.count+excluded.count",
            (round, kind, n),
        )

    def round_counts(self, after: int = -1) -> dict[int, dict[str, int]]:
        """{round: {kind: count}} of the rounds after `after` (empty for a log from before the table)."""
        out: dict[int, dict[str, int]] = {}
        try:
            rows = self.db.execute("SELECT round, kind, count FROM round_counts WHERE round > ?", (after,)).fetchall()
        except sqlite3.OperationalError:  # read-only open of an older SQLite log without the table
            return out
        for r, k, c in rows:
            out.setdefault(int(r), {})[str(k)] = int(c)
        return out

    def reject_counts(self) -> dict[str, int]:
        return {
            str(r): int(c) for r, c in self.db.execute("SELECT reason, count FROM rejects ORDER BY reason")
        }

    def event(self, kind: str, detail: str, round: int | None = None, now: float | None = None) -> None:
        self._need_tx()
        self.db.execute(
            "INSERT INTO events(ts, round, kind, detail) VALUES (?,?,?,?)",
            (time.time() if now is None else now, round, kind, detail),
        )

    def add_checkpoint(self, round: int, path: str, checksum: str, now: float) -> None:
        self._need_tx()
        self.db.execute(
            "INSERT INTO checkpoints(round, path, values_checksum, written_at) VALUES (?,?,?,?) ON CONFLICT(round) "
            "DO UPDATE SET path=excluded.path, values_checksum=excluded.values_checksum, written_at=excluded.written_at",
            (round, path, checksum, now),
        )

    def remove_checkpoint(self, round: int) -> None:
        self._need_tx()
        self.db.execute("DELETE FROM checkpoints WHERE round=?", (round,))

    def checkpoints(self) -> list[tuple[int, str, str]]:
        """(round, path, checksum), newest first."""
        return [
            (int(r), str(p), str(c))
            for r, p, c in self.db.execute(
                "SELECT round, path, values_checksum FROM checkpoints ORDER BY round DESC"
            )
        ]

    def events(self, *, kind: str | None = None, round: int | None = None, limit: int | None = None) -> list[EventRow]:
        """Logged round decisions, oldest first (`limit`: only the newest `limit`)."""
        where, args = _where(("kind=?", kind), ("round=?", round))
        q = "SELECT ts, round, kind, detail FROM events" + where
        q += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit is not None else "")
        rows = [EventRow(float(ts), None if r is None else int(r), str(k), str(d)) for ts, r, k, d in self.db.execute(q, args)]
        return rows[::-1]

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    # -- retention -------------------------------------------------------------------------------
    def prune(self, before: int, results_before: int, keep_per_client: int) -> dict[str, int]:
        """Delete what neither recovery nor the audit window needs (docs/COORDINATOR.md "Retention"):

        updates       of rounds < before, except pending late ones and each client's first and last
                      `keep_per_client` updates with GradIP (the MEERKAT-VP monitor rebuilds its first and
                      last window from them; the step count comes from the drift table)
        rounds        closed plans of rounds < before;  events, round_counts: rounds < before
        results       rounds < results_before (the caller keeps those after the oldest checkpoint and the
                      last replay_max)
        Returns the rows deleted per table. Inside a transaction."""
        self._need_tx()
        out = {}
        cur = self.db.execute(
            """DELETE FROM updates WHERE round < ? AND status != 'late' AND rowid NOT IN (
                   SELECT rid FROM (SELECT rowid AS rid,
                       ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid) AS a,
                       ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid DESC) AS b
                       FROM updates WHERE gradip IS NOT NULL) AS firstlast WHERE a <= ? OR b <= ?)""",
            (before, keep_per_client, keep_per_client),
        )
        out["updates"] = cur.rowcount
        out["rounds"] = self.db.execute("DELETE FROM rounds WHERE round < ? AND state = 'closed' AND round NOT IN "
                                        "(SELECT round FROM updates WHERE status = 'late')", (before,)).rowcount
        out["events"] = self.db.execute("DELETE FROM events WHERE round < ?", (before,)).rowcount
        out["round_counts"] = self.db.execute("DELETE FROM round_counts WHERE round < ?", (before,)).rowcount
        out["results"] = self.db.execute("DELETE FROM results WHERE round < ?", (results_before,)).rowcount
        return out

    def table_rows(self) -> dict[str, int]:
        """Row count per table (retention tests, `bench fleet --soak`)."""
        return {n: int(self.db.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in self.db.tables()}

    # -- the round book's records ----------------------------------------------------------------
    def persist_many(self, records: Sequence[Record]) -> None:
        """Write a batch of records (inside a transaction) with ONE executemany per run of one type.

        The final state is the same as `persist` of each record in order: a record may only move ahead
        of records that write none of its tables (`_TABLES`), so records of one type are gathered while
        nothing between them touches their tables. During a round the batch is Update, Drift, Update,
        Drift, ...: two statements instead of three per update."""
        self._need_tx()
        groups: list[tuple[type, list[Record]]] = []
        for rec in records:
            kind = type(rec)
            tables = _TABLES.get(kind)
            if tables is None:
                raise TypeError(f"EventLog.persist_many: not a record: {rec!r}")
            target = None
            for i in range(len(groups) - 1, -1, -1):
                gk = groups[i][0]
                if gk is kind:
                    target = i
                    break
                if _TABLES[gk] & tables:  # a record in between writes one of our tables: keep the order
                    break
            if target is None:
                groups.append((kind, [rec]))
            else:
                groups[target][1].append(rec)
        for kind, recs in groups:
            writer = _BATCH.get(kind)
            if writer is None or len(recs) == 1:
                for rec in recs:
                    self.persist(rec)
            else:
                writer(self, recs)

    def _many_updates(self, recs: Sequence[Record]) -> None:
        ups = [r for r in recs if isinstance(r, UpdateRecord)]
        self.db.executemany(
            """INSERT INTO updates(client, round, msg_id, grads, n_samples, loss, received_at, status, gradip)
               VALUES (?,?,?,?,?,?,?,?,?)""",
            [(r.update.client, r.update.round, str(r.update.msg_id), f64_blob(r.update.grads), r.update.n_samples,
              r.update.loss, r.update.received_at, r.update.status, None if r.gradip is None else f64_blob(r.gradip))
             for r in ups],
        )  # fmt: skip
        self.db.executemany(
            "UPDATE clients SET last_update_at=?, seen_at=?, updates=updates+1 WHERE client=?",
            [(r.update.received_at, r.update.received_at, r.update.client) for r in ups],
        )

    def _many_drift(self, recs: Sequence[Record]) -> None:
        self.db.executemany(
            _PUT_DRIFT,
            [(r.client, r.n_steps, r.early, r.late, r.rho_later, r.rho_quie, r.now) for r in recs
             if isinstance(r, DriftRecord)],
        )  # fmt: skip

    def _many_heartbeats(self, recs: Sequence[Record]) -> None:
        self.db.executemany(
            _HEARTBEAT,
            [(r.client, r.now, r.now, json.dumps(r.telemetry)) for r in recs if isinstance(r, HeartbeatRecord)],
        )
        for r in recs:  # the evaluation a heartbeat carries (rare: every eval_every rounds per device)
            if isinstance(r, HeartbeatRecord):
                self._heartbeat_eval(r)

    def _many_online(self, recs: Sequence[Record]) -> None:
        self.db.executemany(_ONLINE, [(r.client, int(r.online), r.now) for r in recs if isinstance(r, OnlineRecord)])

    def _many_seen(self, recs: Sequence[Record]) -> None:
        self.db.executemany(_TOUCH, [(r.now, r.client) for r in recs if isinstance(r, SeenRecord)])

    def _many_events(self, recs: Sequence[Record]) -> None:
        self.db.executemany(
            "INSERT INTO events(ts, round, kind, detail) VALUES (?,?,?,?)",
            [(r.now, r.round, r.kind, r.detail) for r in recs if isinstance(r, EventRecord)],
        )

    def persist(self, rec: Record) -> None:
        """Write one record of `coordinator/rounds.py` (inside a transaction)."""
        if isinstance(rec, UpdateRecord):
            u = rec.update
            self.insert_update(u.client, u.round, u.msg_id, u.grads, u.n_samples, u.loss, u.status, u.received_at,
                               rec.gradip)  # fmt: skip
        elif isinstance(rec, HeartbeatRecord):
            self.record_heartbeat(rec.client, rec.telemetry, rec.now)
            self._heartbeat_eval(rec)
        elif isinstance(rec, OnlineRecord):
            self.set_online(rec.client, rec.online, rec.now)
        elif isinstance(rec, SeenRecord):
            self.touch(rec.client, rec.now)
        elif isinstance(rec, JoinRecord):
            self.upsert_join(
                rec.client, state=rec.state, reason=rec.reason, fingerprint=rec.fingerprint, mask_id=rec.mask_id,
                n_samples=rec.n_samples, budget_gib=rec.budget_gib, capabilities=rec.capabilities,
                last_round=rec.last_round, now=rec.now,
            )  # fmt: skip
        elif isinstance(rec, RejectRecord):
            self.count_reject(rec.reason, rec.client, rec.topic, rec.detail, rec.now)
        elif isinstance(rec, EventRecord):
            self.event(rec.kind, rec.detail, rec.round, rec.now)
        elif isinstance(rec, OfflineRecord):
            self.mark_offline(rec.clients)
        elif isinstance(rec, PlanRecord):
            self.insert_plan(rec.plan)
        elif isinstance(rec, ReplanRecord):
            self.replan(rec.round, rec.steps, rec.deadline, rec.extensions)
        elif isinstance(rec, ResultRecord):
            self.insert_result(rec.result)
            for status in ("accepted", "folded"):
                keys = [(c, r) for c, r, st in rec.used if st == status]
                if keys:
                    self.mark_used(keys, rec.result.round, status)
        elif isinstance(rec, DriftRecord):
            self.put_drift(rec.client, rec.n_steps, rec.early, rec.late, rec.rho_later, rec.rho_quie, rec.now)
        elif isinstance(rec, LimitRecord):
            self.set_limited(rec.client, rec.round, rec.now)
        elif isinstance(rec, EvalRecord):
            self.add_eval(COORDINATOR_EVAL, rec.round, rec.loss, rec.accuracy, rec.n, rec.now)
        elif isinstance(rec, DuplicateRecord):
            self.count_round(rec.round, "duplicate")
        else:
            raise TypeError(f"EventLog.persist: not a record: {rec!r}")


    # -- training quality (evals, curves) and the dashboard's read-only views ------------------------
    def _heartbeat_eval(self, rec: HeartbeatRecord) -> None:
        """A heartbeat repeats the device's latest evaluation: store the first one per (client, round)."""
        t = rec.telemetry
        if t.get("eval_round") is None or t.get("eval_loss") is None:
            return
        self.add_eval(rec.client, int(t["eval_round"]), float(t["eval_loss"]), _opt(t.get("eval_acc")),
                      int(t.get("eval_n") or 0), rec.now)  # fmt: skip

    def add_eval(self, source: str, round: int, loss: float, accuracy: float | None, n: int, now: float) -> None:
        self._need_tx()
        self.db.execute(
            "INSERT INTO evals(source, round, loss, accuracy, n, ts) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(source, round) DO NOTHING",  # the first evaluation of a (source, round) stays
            (source, round, loss, accuracy, n, now),
        )

    def evals(self, source: str | None = None, last: int | None = None) -> list[EvalRow]:
        """Evaluations in (round, source) order; `source` one client or COORDINATOR_EVAL; `last` rounds only."""
        where, args = _where(("source=?", source), ("round > (SELECT COALESCE(MAX(round), -1) FROM evals) - ?", last))
        q = "SELECT source, round, loss, accuracy, n, ts FROM evals" + where
        return [
            EvalRow(str(c), int(r), float(lo), _opt(acc), int(n), float(ts))
            for c, r, lo, acc, n, ts in self.db.execute(q + " ORDER BY round, source", args).fetchall()
        ]

    def round_points(self, last: int = 200) -> list[RoundPoint]:
        """The last `last` closed rounds, oldest first, with the n_samples-weighted mean training loss of
        the updates each one used (on time or folded late)."""
        q = """SELECT r.round, r.closed_at, r.duration_s, r.n_clients,
                      (SELECT SUM(u.loss * u.n_samples) / SUM(u.n_samples) FROM updates u
                        WHERE u.used_in = r.round)
               FROM results r ORDER BY r.round DESC LIMIT ?"""
        rows = self.db.execute(q, (last,)).fetchall()
        return [RoundPoint(int(r), float(c), float(d), int(n), _opt(lo)) for r, c, d, n, lo in reversed(rows)]

    def gradip_means(self, last: int = 200) -> dict[str, list[tuple[int, float]]]:
        """client -> [(round, mean |GradIP| of its update for that round)] over the last `last` rounds."""
        q = """SELECT client, round, gradip FROM updates WHERE gradip IS NOT NULL
                 AND round > (SELECT COALESCE(MAX(round), -1) FROM updates) - ? ORDER BY round"""
        out: dict[str, list[tuple[int, float]]] = {}
        for c, r, g in self.db.execute(q, (last,)):
            vals = np.abs(np.frombuffer(g, dtype="<f8"))
            if vals.size:
                out.setdefault(str(c), []).append((int(r), float(vals.mean())))
        return out

    def client_budgets(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """client -> (memory budget GiB, capabilities) as announced in its Join."""
        q = "SELECT client, budget_gib, capabilities FROM clients"
        return {str(c): (float(b), json.loads(cap or "{}")) for c, b, cap in self.db.execute(q)}

    def last_losses(self) -> dict[str, float]:
        """client -> training loss (Update.loss) of its newest stored update."""
        q = """SELECT u.client, u.loss FROM updates u
               JOIN (SELECT client, MAX(round) AS r FROM updates GROUP BY client) m
                 ON u.client = m.client AND u.round = m.r"""
        return {str(c): float(lo) for c, lo in self.db.execute(q)}


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


# the tables each record writes: persist_many reorders two records only when these are disjoint
_TABLES: dict[type, frozenset[str]] = {
    JoinRecord: frozenset({"clients"}), OnlineRecord: frozenset({"clients"}),
    HeartbeatRecord: frozenset({"clients", "evals"}), SeenRecord: frozenset({"clients"}),
    OfflineRecord: frozenset({"clients"}), PlanRecord: frozenset({"rounds"}), ReplanRecord: frozenset({"rounds"}),
    UpdateRecord: frozenset({"updates", "clients"}), ResultRecord: frozenset({"results", "rounds", "updates"}),
    DriftRecord: frozenset({"drift"}), LimitRecord: frozenset({"drift"}),
    RejectRecord: frozenset({"rejects", "reject_log"}), EventRecord: frozenset({"events"}),
    EvalRecord: frozenset({"evals"}), DuplicateRecord: frozenset({"round_counts"}),
}  # fmt: skip
_BATCH: dict[type, Callable[[EventLog, Sequence[Record]], None]] = {
    UpdateRecord: EventLog._many_updates, DriftRecord: EventLog._many_drift,
    HeartbeatRecord: EventLog._many_heartbeats, OnlineRecord: EventLog._many_online,
    SeenRecord: EventLog._many_seen, EventRecord: EventLog._many_events,
}  # fmt: skip
