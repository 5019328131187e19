"""The coordinator's storage is evidence, as the client's is (docs/RELIABILITY.md "Coordinator storage"):
before `meerkat coordinator` starts, a lost or damaged event log is refused with the file and the fix,
and a full disk at any time stops it with the path and the fix: never a silent new fleet at round 0
beside checkpoints of a later round, never a raw traceback.

    exit 5  EXIT_STORAGE_FULL  the disk (or the PostgreSQL server's) is full       (as `meerkat client`)
    exit 7  EXIT_LOG_LOST      the event log is missing or empty beside checkpoints
    exit 8  EXIT_LOG_DAMAGED   the event log cannot be read (not a database, malformed pages)
"""

from __future__ import annotations

from pathlib import Path

from coordinator.eventlog import DB_NAME, EventLog
from coordinator.logstore import disk_full, redact_url

EXIT_STORAGE_FULL = 5
EXIT_LOG_LOST = 7
EXIT_LOG_DAMAGED = 8


class StorageFault(Exception):
    """A storage problem the operator must fix; `str()` is one line naming the file and the fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_state(state_dir: str | Path, event_log: str = "sqlite") -> None:
    """Raise StorageFault if the event log is missing, empty or damaged while `state_dir` holds
    checkpoints (or damaged at all). Reads only: a read-only open, nothing created."""
    state_dir = Path(state_dir)
    ckpts = sorted((state_dir / "checkpoints").glob("values-r*.safetensors"))
    sqlite = event_log in ("", "sqlite")
    path = state_dir / DB_NAME
    where = str(path) if sqlite else redact_url(event_log)
    lost = (
        f"but {state_dir / 'checkpoints'} holds {len(ckpts)} checkpoint(s) up to {ckpts[-1].name if ckpts else ''}: "
        f"restore the event log from a backup (with its -wal file), or move {state_dir} aside to start a new fleet; "
        "refusing to start a new fleet at round 0 beside them"
    )
    if sqlite and not path.exists():
        if ckpts:
            raise StorageFault(EXIT_LOG_LOST, f"event log {where} is missing {lost}")
        return
    if sqlite and path.stat().st_size == 0 and not path.with_name(path.name + "-wal").exists():
        if ckpts:
            raise StorageFault(EXIT_LOG_LOST, f"event log {where} is empty (0 bytes) {lost}")
        return
    log = EventLog(state_dir, readonly=True, event_log=event_log)
    try:
        damage = log.db.damage()
        if damage is not None:
            raise StorageFault(
                EXIT_LOG_DAMAGED,
                f"event log {where} is damaged ({damage}): restore it from a backup (with its -wal file), or "
                f"move {state_dir} aside to start a new fleet; nothing was changed",
            )
        tables = log.db.tables()
        if ckpts and ("results" not in tables or (not log.checkpoints() and log.views.last_result_round() < 0)):
            raise StorageFault(EXIT_LOG_LOST, f"event log {where} has no rounds {lost}")
    finally:
        log.close()


def full_disk_fault(exc: BaseException, state_dir: str | Path, event_log: str = "sqlite") -> StorageFault | None:
    """The StorageFault for `exc` when it (or what it was raised from) is a full disk, else None."""
    if not disk_full(exc):
        return None
    where = str(state_dir) if event_log in ("", "sqlite") else f"{state_dir} or {redact_url(event_log)}"
    return StorageFault(
        EXIT_STORAGE_FULL,
        f"disk full writing {where} ({type(exc).__name__}: {' '.join(str(exc).split())}): free space (df -h {state_dir}) "
        "and start the coordinator again; everything committed is kept",
    )
