"""Durable file writes: a file either has its old content or its complete new content, even after kill -9.

The temporary file is created by `tempfile.mkstemp` in the target's directory: a random name opened with
O_CREAT|O_EXCL, so a file or symlink someone planted at a predictable name (the old `<name>.tmp`) is never
followed or overwritten, and it is born with mode 0600 -- state files (client values, coordinator
checkpoints) hold training state other local users have no business reading. Files meant to be shared
(mask files, which devices download) pass `mode=0o644` explicitly.

`private_dir` and `private_file` make the places state lives owner-only whatever the process umask (a
shell's 022 would give 0755 / 0644): directories this code creates are 0700, and a SQLite database is
created 0600 before SQLite opens it, so its -wal and -shm files, which SQLite creates with the database
file's mode, are 0600 too (tests/shared/test_fsio.py: every state file under umask 022).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

STATE_MODE = 0o600  # the default: readable by the owner only
SHARED_MODE = 0o644  # files other users/devices must read (masks)
DIR_MODE = 0o700  # directories this code creates for state (an existing one keeps the mode it has)
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parent as DIR_MODE (umask ignored); an existing directory keeps its
    mode: the operator (or systemd's StateDirectoryMode) chose it. Returns `path`."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: it chose the mode
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def private_file(path: Path, mode: int = STATE_MODE) -> Path:
    """Make sure the file `path` exists with exactly `mode` (created empty when missing, umask ignored;
    a symlink is refused). Call it before SQLite opens a database: SQLite creates its -wal / -shm files
    with the database's mode. Side files left with a wider mode by an older version are narrowed too."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if os.stat(fd).st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.is_file() and not side.is_symlink() and side.stat().st_mode & 0o7777 != mode:
            os.chmod(side, mode)
    return path


def atomic_write(path: Path, data: bytes, tmp: Path | None = None, *, mode: int = STATE_MODE) -> None:
    """Write `data` to a fresh random temp file next to `path`, fsync it, rename it over `path`, fsync
    the directory. `path` ends with `mode` whatever it had before. `tmp` is accepted for old callers and
    ignored: the temp name is always random (`.<name>.<random>.tmp`), never a predictable one.
    """
    del tmp
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600; widen only when the caller says so
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)  # replaces a symlink at `path` itself, never the file it points to
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = ["DIR_MODE", "SHARED_MODE", "STATE_MODE", "atomic_write", "private_dir", "private_file"]
