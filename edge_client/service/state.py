"""Durable client state: which round the values are at, the values themselves, the data pointer, the
outbox and the steps done so far in the round being trained.

Layout of `state_dir`:
    client.db            SQLite (WAL, synchronous=FULL): tables `state` (one row), `outbox`, `steps`
    values-r{round}-{checksum[:16]}.f32  the side-car values at `state.round`, raw little-endian fp32 (nnz,)

    identity.json        written once when the state is created: "this directory was initialised" (and for
                         which model/mask/nnz), so a later missing/empty client.db is damage, not a fresh start

Crash safety (kill -9 at any instant):
- A values file is written as a temp file, fsynced, renamed, and the directory fsynced BEFORE the SQLite
  transaction that points `state.values_file` at it commits; the old file is removed after the commit.
  A crash in between leaves a newer file the database does not name: kept (it cannot be proven obsolete)
  and removed by a later commit past its round.

Storage is evidence (docs/CLIENT.md "Damaged storage"): nothing here deletes a values file it cannot prove
obsolete (only files of rounds BELOW a committed round, and the v_0 of a state that never trained when it
starts over for another model/mask: the model rebuilds it), and a missing, empty, truncated or malformed
client.db / WAL / values file raises StateError naming the file and the fix -- never a silent reset to v_0.
A full disk raises StorageFull (the pump retries; nothing half-written is committed).
- "Update for round r queued" (outbox row), "data pointer advanced" and "round r trained" commit in ONE
  transaction (`finish_training`), so a restart either re-trains round r from the same pointer (no
  update was ever visible) or re-sends the very same update (same msg_id: the coordinator dedupes).
- Each finished SPSA step of the current round is a `steps` row, so a restart resumes at the next step.

The round rules live in edge_client/service/rounds.py (`ClientRounds`); this module only persists
what its actions say, and hands a restart back what it needs (`load`, `read_values`, `progress`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_client.engine.spsa import StepResult
from edge_client.service.chunks import values_from_bytes
from edge_client.service.outbox import Outbox, to_i64, to_u64
from edge_client.service.rounds import Progress
from shared.accountant import Spend
from shared.apply import values_checksum
from shared.fsio import atomic_write, private_dir, private_file

log = logging.getLogger(__name__)

DB_NAME = "client.db"
IDENTITY = "identity.json"
_VALUES_RE = re.compile(r"^values-r(-?\d+)-[0-9a-f]{16}\.f32$")

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
-- differential privacy spent by this device (edge_client/privacy.py): one row per (q, sigma), steps summed;
-- written in the transaction that queues the Update it pays for, never deleted (a restart, a re-Join, a
-- reset to v_0 keep it)
CREATE TABLE IF NOT EXISTS dp_spend (
    q REAL NOT NULL,
    sigma REAL NOT NULL,
    steps INTEGER NOT NULL,
    PRIMARY KEY (q, sigma)
);
-- the step table before issue 12 (g, loss only): in-round progress, safe to drop (the round restarts)
DROP TABLE IF EXISTS progress;
"""


class StateError(RuntimeError):
    """The state directory is unusable or belongs to another model/mask; the message says which."""


class StorageFull(StateError):
    """A write failed for lack of space (ENOSPC/EDQUOT, SQLITE_FULL): nothing was committed; retry later."""


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


def _values_round(name: str) -> int | None:
    m = _VALUES_RE.match(name)
    return None if m is None else int(m.group(1))


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
        self.db_path = self.dir / DB_NAME
        if read_only:
            self.db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None, timeout=5)
            self.outbox = Outbox(self.db, resend_after_s, writable=False)
            return
        private_dir(self.dir)
        self._refuse_lost_db()
        private_file(self.db_path)  # 0600 before SQLite opens it: its -wal/-shm take the database file's mode
        try:
            # built in one thread, then used by the client loop only (one user at a time)
            self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            check = [str(r[0]) for r in self.db.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(check[:3]))
            self.db.executescript(SCHEMA)
            self.outbox = Outbox(self.db, resend_after_s, writable=True)
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise StorageFull(self._full_message(self.db_path, exc)) from None
            raise StateError(
                f"{self.db_path} is damaged ({exc}): the client will not guess its round, data pointer or queued "
                f"update. Restore {DB_NAME} (with {DB_NAME}-wal, if any) from a backup, or move {self.dir} aside "
                "to start this device over from v_0 (its updates since then are lost to it)"
            ) from None

    def _refuse_lost_db(self) -> None:
        """A directory that was initialised (identity.json, or values files) whose client.db is gone or
        empty is damage, not a fresh client: refuse instead of silently starting over from v_0."""
        marker = (self.dir / IDENTITY).exists()
        values = sorted(p.name for p in self.dir.glob("values-r*.f32"))
        size = self.db_path.stat().st_size if self.db_path.exists() else -1
        if size > 0 or not (marker or values):
            return  # a database to open, or a never-initialised directory (a fresh client)
        what = "missing" if size < 0 else "empty (0 bytes)"
        evidence = IDENTITY if marker else f"values files {', '.join(values[:3])}"
        raise StateError(
            f"{self.db_path} is {what}, but {self.dir} was initialised ({evidence} present): the round, data "
            f"pointer and queued updates are gone. Restore {DB_NAME} from a backup, or move {self.dir} aside to "
            "start this device over from v_0"
        )

    def _full_message(self, path: Path, exc: BaseException) -> str:
        return (f"disk full writing {path} ({exc}): free space on the filesystem of {self.dir} "
                f"(`df -h {self.dir}`); nothing was committed")  # fmt: skip

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Turn a full disk into StorageFull (with the path and the fix); other errors pass through."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            if _is_full(exc):
                raise StorageFull(self._full_message(path, exc)) from None
            raise

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._writing(self.db_path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")  # a failed COMMIT (SQLITE_FULL) leaves the transaction open: roll back
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

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
        if st is None and (self.dir / IDENTITY).exists():
            raise StateError(
                f"{self.db_path} holds no state row, but {self.dir} was initialised ({IDENTITY} present): the "
                "database lost its committed transactions (a damaged or truncated WAL?). Restore it from a "
                f"backup, or move {self.dir} aside to start this device over from v_0"
            )
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
        if (st.fingerprint != fingerprint or st.mask_id != mask_id) and self._untrained(st):
            st = self._start_over(st, fingerprint, mask_id, initial_values)
        if st.fingerprint != fingerprint or st.mask_id != mask_id:
            raise StateError(
                f"state_dir {self.dir} belongs to model {st.fingerprint[:12]}/mask {st.mask_id}, not "
                f"{fingerprint[:12]}/{mask_id}: point state_dir elsewhere or delete it"
            )
        self._check_identity(st)
        self._remove_obsolete(st, warn=True)
        values = self.read_values(st)
        return st, values

    def _untrained(self, st: ClientState) -> bool:
        """Nothing learned or queued: still v_0, no step done, no update in the outbox. Such a state is
        rebuilt from the model alone, so starting it over for another model/mask loses nothing."""
        if (st.round, st.trained_round, st.data_pointer) != (-1, -1, 0) or len(self.outbox):
            return False
        return int(self.db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]) == 0

    def _start_over(self, st: ClientState, fingerprint: str, mask_id: str, initial_values: torch.Tensor) -> ClientState:
        """Re-initialise an untrained state for this model/mask (issue 30: one start with a wrong mask, refused
        by the fleet with exit 6, left a directory every later start refused with exit 3 until moved aside).
        Crash-safe: identity.json goes first (a crash after it is this same case again), then the new v_0
        file, then one transaction re-points the state row; identity.json is rewritten by _check_identity."""
        log.warning("state_dir %s was set up for model %s/mask %s but never trained (round -1, nothing queued): "
                    "starting it over for model %s/mask %s", self.dir, st.fingerprint[:12], st.mask_id,
                    fingerprint[:12], mask_id)  # fmt: skip
        (self.dir / IDENTITY).unlink(missing_ok=True)
        v0 = initial_values.detach().to("cpu", torch.float32).contiguous()
        ck = values_checksum(v0)
        name = self._write_values(-1, v0, ck)
        with self.transaction() as db:
            db.execute("UPDATE state SET fingerprint = ?, mask_id = ?, nnz = ?, checksum = ?, values_file = ? "
                       "WHERE id = 0", (fingerprint, mask_id, v0.numel(), ck, name))  # fmt: skip
        if st.values_file != name:
            (self.dir / st.values_file).unlink(missing_ok=True)  # the old v_0: the model rebuilds it
        return self._loaded()

    def _check_identity(self, st: ClientState) -> None:
        """identity.json is the second copy of who this directory belongs to; a state dir from before it
        existed gets one now (its database just loaded and matched)."""
        path = self.dir / IDENTITY
        mine = {"fingerprint": st.fingerprint, "mask_id": st.mask_id, "nnz": st.nnz}
        if not path.exists():
            with self._writing(path):
                atomic_write(path, (json.dumps(mine, sort_keys=True) + "\n").encode())
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is unreadable ({exc}): restore it from a backup (it must say "
                             f"{json.dumps(mine, sort_keys=True)})") from None  # fmt: skip
        if {k: saved.get(k) for k in mine} != mine:
            raise StateError(f"{path} says {saved}, but {self.db_path} holds {mine}: the directory was mixed up "
                             "with another device's; restore both from one backup")  # fmt: skip

    def read_values(self, st: ClientState) -> torch.Tensor:
        path = self.dir / st.values_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            newer = sorted(p.name for p in self.dir.glob("values-r*.f32") if (_values_round(p.name) or -2) > st.round)
            why = (f"; newer values ({', '.join(newer)}) exist, so {DB_NAME} lost committed transactions (a damaged "
                   f"or truncated {DB_NAME}-wal?)") if newer else ""  # fmt: skip
            raise StateError(
                f"values file {path} is missing (state says round {st.round}){why}: restore the state directory "
                "from a backup, or move it aside to start this device over from v_0"
            ) from None
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
            (self.dir / old.values_file).unlink(missing_ok=True)  # committed past it: provably obsolete
        st = self._loaded()
        self._remove_obsolete(st)
        return st

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

    def finish_training(
        self, round: int, msg_id: int, topic: str, payload: bytes, data_pointer: int, spend: Spend | None = None
    ) -> ClientState:
        """One transaction: queue the update, advance the data pointer, mark (round, msg_id) trained, and
        charge its privacy `spend` (a DP fleet). Returns the new state."""
        with self.transaction() as db:
            self.outbox.add(round, msg_id, topic, payload)
            if spend is not None:
                db.execute("INSERT INTO dp_spend VALUES (?, ?, ?) ON CONFLICT (q, sigma) DO UPDATE SET steps = steps + ?",
                           (spend.q, spend.sigma, spend.steps, spend.steps))  # fmt: skip
            db.execute(
                "UPDATE state SET data_pointer = ?, trained_round = ?, trained_plan = ? WHERE id = 0",
                (data_pointer, round, to_i64(msg_id)),
            )
            db.execute("DELETE FROM steps")
        return self._loaded()

    def dp_spends(self) -> list[Spend]:
        """Every privacy spend this device has published (empty outside DP fleets)."""
        rows = self.db.execute("SELECT q, sigma, steps FROM dp_spend ORDER BY q, sigma").fetchall()
        return [Spend(float(q), float(sigma), int(steps)) for q, sigma, steps in rows]

    # -- files -----------------------------------------------------------------------------------
    def _write_values(self, round: int, values: torch.Tensor, checksum: str) -> str:
        name = f"values-r{round}-{checksum[:16]}.f32"  # never overwrites the file the db points at
        data = values.numpy().astype("<f4", copy=False).tobytes()
        with self._writing(self.dir / name):
            atomic_write(self.dir / name, data, tmp=self.dir / f".{name}.tmp")
        return name

    def _remove_obsolete(self, st: ClientState, warn: bool = False) -> None:
        """Delete only what is provably obsolete: values files of rounds below the committed one and
        unfinished temp files (never renamed, so never committed). A file of a LATER round is kept: a
        crash between its write and its commit leaves one, but so does a database that lost commits."""
        for p in self.dir.glob("values-r*.f32"):
            r = _values_round(p.name)
            if p.name == st.values_file or r is None:
                continue
            if r < st.round:
                log.info("removing obsolete values file %s (state is at round %d)", p.name, st.round)
                p.unlink(missing_ok=True)
            elif warn:
                log.warning("keeping values file %s: not the committed one (round %d), not provably obsolete",
                            p.name, st.round)  # fmt: skip
        for p in self.dir.glob(".values-r*.tmp"):
            p.unlink(missing_ok=True)


__all__ = ["ClientState", "StateError", "StateStore", "StorageFull", "values_from_bytes"]
