"""The read-only views of the event log that `meerkat status`, /metrics and the dashboard show
(`coordinator/status.py`, `coordinator/fleetview.py`): typed rows, never a write.

What recovery also reads (results, plans, the registry, drift rows, checkpoints) stays on `EventLog`;
these are the queries only a reader for people needs.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from coordinator.eventlog.rows import SAMPLE_MAX_KEY, client_sql, f64_list, folded_rowid, opt, where
from coordinator.logstore import Store
from coordinator.records import (
    ClientStatusRow,
    EvalRow,
    EventRow,
    LrRow,
    OpenRoundRow,
    ResourcePoint,
    RoundPoint,
)


class LogViews:
    """Queries on a store that someone else opened and closes (`EventLog.views`)."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def client_status(self) -> list[ClientStatusRow]:
        """Every registry column `meerkat status` shows, sorted by id."""
        q = client_sql("c.client, c.state, c.reason, c.online, c.n_samples, c.last_round, {seen_at}, c.hb_at, c.telemetry, "
                       "{last_update_at}, {updates}")  # the updates not folded yet added (writer.fold_clients)
        return [
            ClientStatusRow(str(c), str(st), str(rs), bool(on), int(n), int(lr), opt(seen), opt(hb),
                            json.loads(tele or "{}"), opt(lu), int(nup))
            for c, st, rs, on, n, lr, seen, hb, tele, lu, nup in self.db.execute(q, (folded_rowid(self.db),))
        ]  # fmt: skip

    def open_round(self) -> OpenRoundRow | None:
        """The open round's progress, if one is open."""
        row = self.db.execute(
            "SELECT round, opened_at, deadline, steps, extensions FROM rounds WHERE state='open' ORDER BY round DESC"
        ).fetchone()
        if row is None:
            return None
        got = self.db.execute(
            "SELECT COUNT(*) FROM updates WHERE round=? AND status='accepted'", (row[0],)
        ).fetchone()[0]
        return OpenRoundRow(int(row[0]), float(row[1]), float(row[2]), len(json.loads(row[3]).keys() - {SAMPLE_MAX_KEY}), int(got), int(row[4]))

    def last_result_round(self) -> int:
        row = self.db.execute("SELECT MAX(round) FROM results").fetchone()
        return -1 if row[0] is None else int(row[0])

    def round_counts(self, after: int = -1) -> dict[int, dict[str, int]]:
        """{round: {kind: count}} of the rounds after `after` (empty for a log from before the table: a
        read-only open does not create it)."""
        out: dict[int, dict[str, int]] = {}
        if "round_counts" not in self.db.tables():
            return out
        for r, k, c in self.db.execute("SELECT round, kind, count FROM round_counts WHERE round > ?", (after,)).fetchall():
            out.setdefault(int(r), {})[str(k)] = int(c)
        return out

    def reject_counts(self) -> dict[str, int]:
        return {str(r): int(c) for r, c in self.db.execute("SELECT reason, count FROM rejects ORDER BY reason")}

    def lr_decisions(self, limit: int | None = None) -> list[LrRow]:
        """The step-size controller's logged decisions (lr = "auto"), oldest first (`limit`: the newest only);
        empty for a fixed lr or a log from before the table."""
        if "lr_decisions" not in self.db.tables():
            return []
        q = "SELECT round, lr_used, lr_step, lr_next, action, reason, loss, ts FROM lr_decisions ORDER BY round DESC"
        rows = self.db.execute(q + ("" if limit is None else f" LIMIT {int(limit)}")).fetchall()
        return [LrRow(int(r), float(u), float(st), float(n), str(a), str(why), opt(lo), float(ts))
                for r, u, st, n, a, why, lo, ts in reversed(rows)]  # fmt: skip

    def lr_state(self) -> dict[str, Any] | None:
        """The step-size controller's state after the newest logged decision (None: none logged)."""
        if "lr_decisions" not in self.db.tables():
            return None
        row = self.db.execute("SELECT state FROM lr_decisions WHERE state IS NOT NULL ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def events(self, *, kind: str | None = None, round: int | None = None, limit: int | None = None) -> list[EventRow]:
        """Logged round decisions, oldest first (`limit`: only the newest `limit`)."""
        cond, args = where(("kind=?", kind), ("round=?", round))
        q = "SELECT ts, round, kind, detail FROM events" + cond
        q += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit is not None else "")
        rows = [EventRow(float(ts), None if r is None else int(r), str(k), str(d)) for ts, r, k, d in self.db.execute(q, args)]
        return rows[::-1]

    def latest_gradip(self, client: str) -> list[float] | None:
        """GradIP values of the client's newest update that has them (MEERKAT-VP signal), if any."""
        row = self.db.execute(
            "SELECT gradip FROM updates WHERE client=? AND gradip IS NOT NULL ORDER BY round DESC LIMIT 1",
            (client,),
        ).fetchone()
        return None if row is None else f64_list(row[0])

    def latest_gradips(self) -> dict[str, list[float]]:
        """client -> `latest_gradip(client)` for every client that has one, in one query."""
        q = """SELECT u.client, u.gradip FROM updates u
               JOIN (SELECT client, MAX(round) AS r FROM updates WHERE gradip IS NOT NULL GROUP BY client) m
                 ON u.client = m.client AND u.round = m.r"""
        return {str(c): f64_list(g) for c, g in self.db.execute(q)}

    def evals(self, source: str | None = None, last: int | None = None) -> list[EvalRow]:
        """Evaluations in (round, source) order; `source` one client or COORDINATOR_EVAL; `last` rounds only."""
        cond, args = where(("source=?", source), ("round > (SELECT COALESCE(MAX(round), -1) FROM evals) - ?", last))
        q = "SELECT source, round, loss, accuracy, n, ts FROM evals" + cond
        return [
            EvalRow(str(c), int(r), float(lo), opt(acc), int(n), float(ts))
            for c, r, lo, acc, n, ts in self.db.execute(q + " ORDER BY round, source", args).fetchall()
        ]

    def round_points(self, last: int | None = 200) -> list[RoundPoint]:
        """The last `last` closed rounds (None: every one the log keeps), oldest first, with the
        n_samples-weighted mean training loss of the updates each one used (on time or folded late)."""
        q = """SELECT r.round, r.closed_at, r.duration_s, r.n_clients,
                      (SELECT SUM(u.loss * u.n_samples) / SUM(u.n_samples) FROM updates u
                        WHERE u.used_in = r.round), r.lr
               FROM results r ORDER BY r.round DESC"""
        rows = self.db.execute(q + " LIMIT ?", (last,)).fetchall() if last is not None else self.db.execute(q).fetchall()
        return [RoundPoint(int(r), float(c), float(d), int(n), opt(lo), opt(lr)) for r, c, d, n, lo, lr in reversed(rows)]

    def resources(self) -> list[ResourcePoint]:
        """Every device's resource history (one point per device and round), in (round, client) order. A log
        written before this table existed (read-only: nothing created) has none."""
        if "resources" not in self.db.tables():
            return []
        q = f"""SELECT client, round, ts, rss_bytes, peak_mem_bytes, cpu_pct, step_time_s, {self._hwm()} FROM resources
               ORDER BY round, client"""
        return [
            ResourcePoint(str(c), int(r), float(ts), _opt_int(rss), _opt_int(pk), opt(cpu), opt(st), _opt_int(hwm))
            for c, r, ts, rss, pk, cpu, st, hwm in self.db.execute(q).fetchall()
        ]

    def _hwm(self) -> str:
        """The peak-RSS column, or NULL on a log written before it existed and opened read-only."""
        return "peak_rss_bytes" if "peak_rss_bytes" in self.db.columns("resources") else "NULL"

    def peak_rss(self) -> dict[str, tuple[int, bool]]:
        """client -> (its process's peak RSS over the run, measured): the largest peak its heartbeats reported
        (key 19, the process's high-water mark: measured=True), else (a device before 1.3) the largest RSS
        sample, the last heartbeat of each round (measured=False: a peak between two heartbeats is missed)."""
        if "resources" not in self.db.tables():
            return {}
        q = f"SELECT client, MAX(rss_bytes), MAX({self._hwm()}) FROM resources GROUP BY client"
        out: dict[str, tuple[int, bool]] = {}
        for c, rss, hwm in self.db.execute(q).fetchall():
            if hwm is not None:
                out[str(c)] = (max(int(hwm), int(rss or 0)), True)
            elif rss is not None:
                out[str(c)] = (int(rss), False)
        return out

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

    def table_rows(self) -> dict[str, int]:
        """Row count per table (retention tests, `bench fleet --soak`)."""
        return {n: int(self.db.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in self.db.tables()}


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
