"""Where the event log's rows live: the one seam between `coordinator/eventlog/` (every query, written
once in portable SQL with `?` placeholders) and a database engine.

    SqliteStore(path, synchronous="full", readonly=False)   default: state_dir/events.sqlite, WAL
    PostgresStore("postgresql://user@host/db")              psycopg 3; `?` -> `%s`, `rowid` -> the
                                                            `rid` BIGSERIAL column, SQLite types mapped

Both give the same contract: `execute` / `executemany` return a cursor (`fetchone`, `fetchall`,
iteration, `rowcount`); `begin` / `commit` / `rollback` bracket a write transaction (the caller acks
MQTT messages only after `commit` returned); `tables()` lists the schema's tables. The SQL that
differs between engines is limited to the schema DDL (`create_schema`) and these translations; the
EventLog contract tests (tests/coordinator/test_eventlog_contract.py) run against both.

Choosing one: `event_log = "sqlite"` (default) or `event_log = "postgresql://..."` in the coordinator
config (`open_store`). A PostgreSQL URL may carry `options=-csearch_path%3Dmyschema` to keep several
runs in one database.
"""

from __future__ import annotations

import errno
import hashlib
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from shared.fsio import private_dir, private_file

DB_NAME = "events.sqlite"
# The writer's page cache and WAL size. A round rewrites one row per update in three tables keyed by client
# (updates, clients, drift): at 10,000 devices ~600 random pages per committed batch. SQLite's default
# 2 MB cache re-reads them through the OS, and its default checkpoint (every 1,000 WAL pages) copied them
# to the database every other commit; a page the WAL holds several times is copied once per checkpoint.
# Both larger: 46 -> 37 us of the writer's CPU per update (docs/SCALING.md "Fifth pass"). The cache is a
# bound (only pages read are held); the WAL file grows to ~40 MB (10,000 pages of 4 KiB) and is reused.
CACHE_KIB = 65536
WAL_AUTOCHECKPOINT_PAGES = 10000


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...


class Store(Protocol):
    """What EventLog needs from a database engine (see the module docstring)."""

    kind: str  # "sqlite" | "postgresql"
    where: str  # for messages: the file or the redacted URL
    readonly: bool  # opened read-only: no schema to create, no writes (PostgreSQL always opens read-write)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def create_schema(self, ddl: str) -> None: ...
    def tables(self) -> list[str]: ...
    def columns(self, table: str) -> list[str]: ...
    def add_column(self, table: str, column: str, kind: str) -> None: ...
    def damage(self) -> str | None: ...
    def close(self) -> None: ...


class SqliteStore:
    """One SQLite file in WAL mode (the default; one writer, readers open their own read-only handle)."""

    kind = "sqlite"

    def __init__(self, path: Path, synchronous: str = "full", *, readonly: bool = False) -> None:
        self.where = str(path)
        self.readonly = readonly
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout=5000")
            return
        private_dir(path.parent)
        private_file(path)  # 0600 before SQLite opens it: its -wal/-shm take the database file's mode
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        return self.db.executemany(sql, rows)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def create_schema(self, ddl: str) -> None:
        self.db.executescript(ddl)

    def tables(self) -> list[str]:
        q = "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        return [str(r[0]) for r in self.db.execute(q)]

    def columns(self, table: str) -> list[str]:
        return [str(r[1]) for r in self.db.execute(f"PRAGMA table_info({table})")]

    def add_column(self, table: str, column: str, kind: str) -> None:
        """A column a newer schema added to an existing table (one writer: no race)."""
        if column not in self.columns(table):
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def damage(self) -> str | None:
        """What is wrong with the file (`PRAGMA quick_check`, or the error reading it), None when sound."""
        try:
            rows = [str(r[0]) for r in self.db.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            return str(exc)
        return None if rows == ["ok"] else "; ".join(rows[:3])

    def close(self) -> None:
        self.db.close()


_PG_TYPES = [
    (re.compile(r"INTEGER PRIMARY KEY AUTOINCREMENT"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),  # rounds and counters are u32: beyond PostgreSQL's int4
    # insertion order: SQLite's implicit rowid is an explicit column here
    (re.compile(r"CREATE TABLE IF NOT EXISTS updates \("), "CREATE TABLE IF NOT EXISTS updates (\n    rid BIGSERIAL UNIQUE,"),
]


class PostgresStore:
    """A PostgreSQL database through psycopg 3 (autocommit; explicit BEGIN/COMMIT for write batches)."""

    kind = "postgresql"
    readonly = False  # `meerkat status` on PostgreSQL creates the (empty) tables if they do not exist yet

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg[binary] is a dependency
            raise RuntimeError("event_log = postgresql://... needs psycopg 3: pip install 'meerkat-edge[postgres]'") from exc
        self.where = redact_url(url)
        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"event log {self.where}: cannot connect: {str(exc).strip()}") from exc
        self._sql: dict[str, str] = {}

    def _tr(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = re.sub(r"\browid\b", "rid", sql.replace("%", "%%").replace("?", "%s"))
        return out

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self.db.execute(self._tr(sql), args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        cur = self.db.cursor()
        cur.executemany(self._tr(sql), rows)
        return cur

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def create_schema(self, ddl: str) -> None:
        for pat, rep in _PG_TYPES:
            ddl = pat.sub(rep, ddl)
        pg_create_schema(self.db, ddl, "event-log")

    def tables(self) -> list[str]:
        q = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1"
        return [str(r[0]) for r in self.db.execute(q)]

    def columns(self, table: str) -> list[str]:
        q = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = %s"
        return [str(r[0]) for r in self.db.execute(q, (table,))]

    def add_column(self, table: str, column: str, kind: str) -> None:
        """A column a newer schema added to an existing table. Looked up first: every open (each dashboard
        read too) would otherwise take the table's exclusive lock; IF NOT EXISTS: workers starting together."""
        if column in self.columns(table):
            return
        for pat, rep in _PG_TYPES:
            kind = pat.sub(rep, kind)
        self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}".encode())

    def damage(self) -> str | None:
        return None  # the server keeps its own files consistent (WAL, checksums): nothing to check from here

    def close(self) -> None:
        self.db.close()


def lock_key(purpose: str, name: str) -> int:
    """A stable signed 64-bit PostgreSQL advisory lock key for (purpose, name), e.g. ("leader", fleet)."""
    digest = hashlib.sha256(f"meerkat/{purpose}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def pg_create_schema(db: Any, ddl: str, what: str) -> None:
    """Run `ddl` (several statements, no parameters) in one transaction under the advisory lock
    ("schema", what): two processes running CREATE TABLE IF NOT EXISTS for the same table at the same
    moment make one fail with UniqueViolation on pg_type (two coordinator workers starting together did)."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("schema", what),))
        db.execute(ddl.encode())


def disk_full(exc: BaseException) -> bool:
    """Is `exc`, or an exception it was raised from or during, a full disk? (OSError ENOSPC / EDQUOT,
    SQLite SQLITE_FULL, PostgreSQL SQLSTATE 53100 disk_full.)"""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if getattr(e, "sqlstate", None) == "53100":  # psycopg.errors.DiskFull
            return True
        e = e.__cause__ or e.__context__
    return False


def redact_url(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_store(event_log: str, state_dir: Path, synchronous: str = "full", *, readonly: bool = False) -> Store:
    """`event_log` = "sqlite" (state_dir/events.sqlite) or a postgresql:// URL."""
    if event_log in ("", "sqlite"):
        return SqliteStore(Path(state_dir) / DB_NAME, synchronous, readonly=readonly)
    if event_log.startswith(("postgresql://", "postgres://")):
        return PostgresStore(event_log)
    raise ValueError(f"event_log: expected \"sqlite\" or a postgresql:// URL, got {redact_url(event_log)!r}")
