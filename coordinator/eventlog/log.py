"""`EventLog`: the transaction boundary of the event log, its writes, and the reads recovery needs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from coordinator.eventlog import writer
from coordinator.eventlog.rows import (
    FOLD_KEY,
    PLAN_COLS,
    client_sql,
    f64_list,
    folded_rowid,
    get_meta,
    last_rowid,
    opt,
    plan_row,
    where,
)
from coordinator.eventlog.schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION
from coordinator.eventlog.views import LogViews
from coordinator.logstore import DB_NAME, Store, open_store
from coordinator.records import ClientRow, DriftRow, EventRecord, PlanRow, Record, ResultRow, UpdateRow
from shared.prng import Dist


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
        self.views = LogViews(self.db)
        if self.db.readonly:  # a read-only store cannot create tables (PostgreSQL opens read-write)
            return
        self.db.create_schema(SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            self.db.add_column(table, column, kind)
        version, folded = self.get_meta("schema_version"), self.get_meta(FOLD_KEY)
        if version is None or folded is None:
            with self.transaction():
                if version is None:
                    self.set_meta("schema_version", str(SCHEMA_VERSION))
                if folded is None:  # new, or an older build's log: it counted every row already
                    self.set_meta(FOLD_KEY, str(last_rowid(self.db)))

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

    def _need_tx(self) -> Store:
        if not self._in_tx:
            raise RuntimeError("write outside EventLog.transaction()")
        return self.db

    # -- writes (coordinator/eventlog/writer.py), inside a transaction ----------------------------
    def persist_many(self, records: Sequence[Record]) -> None:
        """Write a batch of the round book's records (one statement per run of one type and table)."""
        writer.persist_many(self._need_tx(), records)

    def persist(self, rec: Record) -> None:
        """Write one record of `coordinator/rounds.py`: the same path as a batch of one."""
        self.persist_many([rec])

    def event(self, kind: str, detail: str, round: int | None = None, now: float | None = None) -> None:
        self.persist(EventRecord(kind, detail, round, time.time() if now is None else now))

    def set_meta(self, key: str, value: str) -> None:
        writer.set_meta(self._need_tx(), key, value)

    def delete_meta(self, key: str) -> None:
        writer.delete_meta(self._need_tx(), key)

    def beat(self, now: float, *, stopped: bool = False) -> None:
        """The coordinator's liveness for `meerkat status`: meta `alive_at` (written every few seconds by
        the running pump), `stopped_at` on a clean stop. A kill -9 leaves `alive_at` to age."""
        db = self._need_tx()
        writer.set_meta(db, "alive_at", repr(float(now)))
        if stopped:
            writer.set_meta(db, "stopped_at", repr(float(now)))
        else:
            writer.delete_meta(db, "stopped_at")

    def add_checkpoint(self, round: int, path: str, checksum: str, now: float) -> None:
        writer.add_checkpoint(self._need_tx(), round, path, checksum, now)

    def remove_checkpoint(self, round: int) -> None:
        writer.remove_checkpoint(self._need_tx(), round)

    def prune(self, before: int, results_before: int, keep_per_client: int) -> dict[str, int]:
        """Retention: see `writer.prune`. Returns the rows deleted per table."""
        return writer.prune(self._need_tx(), before, results_before, keep_per_client)

    # -- what recovery (coordinator/recovery.py, checkpoint.py) and the pump read -------------------
    def get_meta(self, key: str) -> str | None:
        return get_meta(self.db, key)

    def clients(self) -> list[ClientRow]:
        """The registry as the round book needs it, sorted by id."""
        q = client_sql("c.client, c.state, c.fingerprint, c.mask_id, c.n_samples, c.online, {seen_at}")
        return [
            ClientRow(str(c), str(st), str(fp), str(m), int(n), bool(on), None if seen is None else float(seen))
            for c, st, fp, m, n, on, seen in self.db.execute(q, (folded_rowid(self.db),))
        ]

    def get_plan(self, round: int) -> PlanRow | None:
        row = self.db.execute(f"SELECT {PLAN_COLS} FROM rounds WHERE round=?", (round,)).fetchone()
        return None if row is None else plan_row(row)

    def open_plan(self) -> PlanRow | None:
        row = self.db.execute(f"SELECT {PLAN_COLS} FROM rounds WHERE state='open' ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else plan_row(row)

    def plans(self, since: int) -> list[PlanRow]:
        """Plans of rounds >= since, in round order."""
        q = f"SELECT {PLAN_COLS} FROM rounds WHERE round>=? ORDER BY round"
        return [plan_row(row) for row in self.db.execute(q, (since,)).fetchall()]

    def updates(self, round: int | None = None, status: str | None = None) -> list[UpdateRow]:
        cond, args = where(("round=?", round), ("status=?", status))
        q = "SELECT client, round, msg_id, grads, n_samples, loss, received_at, status, used_in FROM updates"
        return [
            UpdateRow(str(c), int(r), int(m), tuple(f64_list(g)), int(n), float(lo), float(ts), str(st),
                      None if u is None else int(u))
            for c, r, m, g, n, lo, ts, st, u in self.db.execute(q + cond + " ORDER BY round, client", args).fetchall()
        ]  # fmt: skip

    def update_keys(self, since: int) -> dict[tuple[str, int], int]:
        """(client, round) -> msg_id of every stored update of rounds >= since (the round book's dedupe)."""
        q = "SELECT client, round, msg_id FROM updates WHERE round>=?"
        return {(str(c), int(r)): int(m) for c, r, m in self.db.execute(q, (since,))}

    def gradip_history(self) -> Iterator[tuple[str, int, list[float]]]:
        """(client, round, GradIP values) of every stored update that has them, in insertion order."""
        q = "SELECT client, round, gradip FROM updates WHERE gradip IS NOT NULL ORDER BY rowid"
        for c, r, g in self.db.execute(q):
            yield str(c), int(r), f64_list(g)

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

    def limited_clients(self) -> dict[str, int]:
        """client -> round in which MEERKAT-VP limited it."""
        q = "SELECT client, limited_round FROM drift WHERE limited_round IS NOT NULL ORDER BY client"
        return {str(c): int(r) for c, r in self.db.execute(q)}

    def drift_rows(self) -> list[DriftRow]:
        q = "SELECT client, n_steps, early, late, rho_later, rho_quie, limited_round FROM drift ORDER BY client"
        return [
            DriftRow(str(c), int(n), opt(e), opt(la), opt(rl), opt(rq), None if lr is None else int(lr))
            for c, n, e, la, rl, rq, lr in self.db.execute(q)
        ]

    def checkpoints(self) -> list[tuple[int, str, str]]:
        """(round, path, checksum), newest first."""
        q = "SELECT round, path, values_checksum FROM checkpoints ORDER BY round DESC"
        return [(int(r), str(p), str(c)) for r, p, c in self.db.execute(q)]
