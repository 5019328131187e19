"""Durable client state: which round the values are at, the values themselves, the data pointer, the
outbox and the steps done so far in the round being trained.

Layout of `state_dir`:
    client.db            SQLite (WAL, synchronous=FULL): tables `state` (one row), `outbox`, `steps`
    values-r{round}-{checksum[:16]}.f32  the side-car values at `state.round`, raw little-endian fp32 (nnz,)

Crash safety (kill -9 at any instant):
- A values file is written as a temp file, fsynced, renamed, and the directory fsynced BEFORE the SQLite
  transaction that points `state.values_file` at it commits; the old file is removed after the commit.
  A crash in between leaves an orphan file that `open()` deletes.
- "Update for round r queued" (outbox row), "data pointer advanced" and "round r trained" commit in ONE
  transaction (`finish_training`), so a restart either re-trains round r from the same pointer (no
  update was ever visible) or re-sends the very same update (same msg_id: the coordinator dedupes).
- Each finished SPSA step of the current round is a `steps` row, so a restart resumes at the next step.

The round rules live in edge_client/service/rounds.py (`ClientRounds`); this module only persists
what its actions say, and hands a restart back what it needs (`load`, `read_values`, `progress`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_client.engine.spsa import StepResult
from edge_client.service.outbox import Outbox, to_i64, to_u64
from edge_client.service.rounds import Progress, values_from_bytes
from shared.apply import values_checksum
from shared.fsio import atomic_write

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    fingerprint TEXT NOT NULL,
    mask_id TEXT NOT NULL,
    nnz INTEGER NOT NULL,
    round INTEGER NOT NULL,           -- values are at this round (-1 = v_0)
    checksum TEXT NOT NULL,           -- values_checksum of the values file
    values_file TEXT NOT NULL,
    data_pointer INTEGER NOT NULL,    -- samples consumed from the local data stream
    trained_round INTEGER NOT NULL,   -- last round whose update went into the outbox (-1 = none)
    trained_plan INTEGER NOT NULL     -- msg_id (u64 as i64) of that update; column name kept so old state dirs open
);
-- the steps done so far in the round being trained (one (round, msg_id) at a time)
CREATE TABLE IF NOT EXISTS steps (
    round INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,          -- u64 as i64: the Update this round's steps will make
    step INTEGER NOT NULL,
    seed INTEGER NOT NULL,            -- u64 as i64
    g REAL NOT NULL,                  -- a float32 value (what the Update sends)
    loss_plus REAL NOT NULL,
    loss_minus REAL NOT NULL,
    seconds REAL NOT NULL,
    data_pointer INTEGER NOT NULL,    -- pointer after this step
    PRIMARY KEY (round, msg_id, step)
);
-- the step table before issue 12 (g, loss only): in-round progress, safe to drop (the round restarts)
DROP TABLE IF EXISTS progress;
"""


class StateError(RuntimeError):
    """The state directory is unusable or belongs to another model/mask; the message says which."""


@dataclass(frozen=True)
class ClientState:
    fingerprint: str
    mask_id: str
    nnz: int
    round: int
    checksum: str
    values_file: str
    data_pointer: int
    trained_round: int
    trained_msg_id: int


class StateStore:
    """Owns `state_dir`. Single-threaded: the client loop is its only user.

    `read_only=True` opens an existing state for reading (`load`, `read_values`, `progress`) while a
    client may be running on it (e.g. `meerkat demo`, tests): it creates and changes nothing."""

    def __init__(self, state_dir: Path, resend_after_s: float = 30.0, *, read_only: bool = False) -> None:
        self.dir = Path(state_dir)
        if read_only:
            self.db = sqlite3.connect(f"file:{self.dir / 'client.db'}?mode=ro", uri=True, isolation_level=None, timeout=5)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            # built in one thread, then used by the client loop only (one user at a time)
            self.db = sqlite3.connect(self.dir / "client.db", isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        self.outbox = Outbox(self.db, resend_after_s, writable=not read_only)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- state -----------------------------------------------------------------------------------
    def load(self) -> ClientState | None:
        row = self.db.execute(
            "SELECT fingerprint, mask_id, nnz, round, checksum, values_file, data_pointer, trained_round, trained_plan"
            " FROM state WHERE id = 0"
        ).fetchone()
        if row is None:
            return None
        fp, mid, nnz, rnd, ck, vf, dp, tr, tp = row
        return ClientState(str(fp), str(mid), int(nnz), int(rnd), str(ck), str(vf), int(dp), int(tr), to_u64(int(tp)))

    def open(self, fingerprint: str, mask_id: str, initial_values: torch.Tensor) -> tuple[ClientState, torch.Tensor]:
        """The saved state and values, or a fresh state at round -1 with `initial_values` (v_0).

        Raises StateError when the directory belongs to another model or mask, or a values file is
        missing or corrupt (its checksum differs from the one committed with it)."""
        st = self.load()
        if st is None:
            v0 = initial_values.detach().to("cpu", torch.float32).contiguous()
            ck = values_checksum(v0)
            name = self._write_values(-1, v0, ck)
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO state VALUES (0, ?, ?, ?, -1, ?, ?, 0, -1, 0)",
                    (fingerprint, mask_id, v0.numel(), ck, name),
                )
            st = self._loaded()
            log.info("new state in %s: round -1 (v_0), nnz=%d", self.dir, v0.numel())
        if st.fingerprint != fingerprint or st.mask_id != mask_id:
            raise StateError(
                f"state_dir {self.dir} belongs to model {st.fingerprint[:12]}/mask {st.mask_id}, not "
                f"{fingerprint[:12]}/{mask_id}: point state_dir elsewhere or delete it"
            )
        self._remove_orphans(st.values_file)
        values = self.read_values(st)
        return st, values

    def read_values(self, st: ClientState) -> torch.Tensor:
        path = self.dir / st.values_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"values file {path} is missing (state says round {st.round})") from None
        if len(raw) != 4 * st.nnz:
            raise StateError(f"values file {path} has {len(raw)} bytes, expected {4 * st.nnz}")
        values = values_from_bytes(raw)
        got = values_checksum(values)
        if got != st.checksum:
            raise StateError(f"values file {path} is corrupt: checksum {got[:12]} != saved {st.checksum[:12]}")
        return values

    def commit_round(self, round: int, values: torch.Tensor, checksum: str | None = None) -> ClientState:
        """Make `values` the values at `round`, atomically; drops saved steps and outbox rows of rounds <= round."""
        v = values.detach().to("cpu", torch.float32).contiguous()
        ck = checksum or values_checksum(v)
        old = self.load()
        if old is None:
            raise StateError("commit_round before open()")
        if v.numel() != old.nnz:
            raise StateError(f"values for round {round} have {v.numel()} entries, expected {old.nnz}")
        name = self._write_values(round, v, ck)
        with self.transaction() as db:
            db.execute("UPDATE state SET round = ?, checksum = ?, values_file = ? WHERE id = 0", (round, ck, name))
            db.execute("DELETE FROM steps WHERE round <= ?", (round,))
            self.outbox.prune(round)  # those rounds are over: nothing to re-send
        if old.values_file != name:
            (self.dir / old.values_file).unlink(missing_ok=True)
        return self._loaded()

    def _loaded(self) -> ClientState:
        st = self.load()
        if st is None:
            raise StateError(f"state row of {self.dir} is gone")
        return st

    # -- training progress -----------------------------------------------------------------------
    def record_step(self, round: int, msg_id: int, step: int, result: StepResult, data_pointer: int) -> None:
        """Save a finished step; steps of any other (round, msg_id) are stale now and dropped with it."""
        key = (round, to_i64(msg_id))
        with self.transaction() as db:
            db.execute("DELETE FROM steps WHERE NOT (round = ? AND msg_id = ?)", key)
            db.execute(
                "INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, step, to_i64(result.seed), result.g, result.loss_plus, result.loss_minus, result.seconds,
                 data_pointer),
            )

    def progress(self) -> Progress | None:
        """The steps saved for the round being trained (0..k-1, in order), or None."""
        rows = self.db.execute(
            "SELECT round, msg_id, step, seed, g, loss_plus, loss_minus, seconds, data_pointer FROM steps"
            " ORDER BY round, msg_id, step"
        ).fetchall()
        if not rows:
            return None
        rnd, mid = int(rows[0][0]), int(rows[0][1])
        if any((int(r[0]), int(r[1])) != (rnd, mid) for r in rows) or [int(r[2]) for r in rows] != list(range(len(rows))):
            log.warning("saved steps of round %d are not one contiguous run: starting the round over", rnd)
            return None
        results = tuple(
            StepResult(float(g), float(lp), float(lm), float(sec), to_u64(int(seed))) for _, _, _, seed, g, lp, lm, sec, _ in rows
        )
        return Progress(rnd, to_u64(mid), results, int(rows[-1][8]))

    def finish_training(self, round: int, msg_id: int, topic: str, payload: bytes, data_pointer: int) -> ClientState:
        """One transaction: queue the update, advance the data pointer, mark (round, msg_id) trained.
        Returns the new state."""
        with self.transaction() as db:
            self.outbox.add(round, msg_id, topic, payload)
            db.execute(
                "UPDATE state SET data_pointer = ?, trained_round = ?, trained_plan = ? WHERE id = 0",
                (data_pointer, round, to_i64(msg_id)),
            )
            db.execute("DELETE FROM steps")
        return self._loaded()

    # -- files -----------------------------------------------------------------------------------
    def _write_values(self, round: int, values: torch.Tensor, checksum: str) -> str:
        name = f"values-r{round}-{checksum[:16]}.f32"  # never overwrites the file the db points at
        data = values.numpy().astype("<f4", copy=False).tobytes()
        atomic_write(self.dir / name, data, tmp=self.dir / f".{name}.tmp")
        return name

    def _remove_orphans(self, keep: str) -> None:
        for p in self.dir.glob("values-r*.f32"):
            if p.name != keep:
                log.info("removing orphan values file %s", p.name)
                p.unlink(missing_ok=True)
        for p in self.dir.glob(".values-r*.tmp"):
            p.unlink(missing_ok=True)


__all__ = ["ClientState", "StateError", "StateStore", "values_from_bytes"]
