"""Durable file writes: a file either has its old content or its complete new content, even after kill -9.

The temporary file is created by `tempfile.mkstemp` in the target's directory: a random name opened with
O_CREAT|O_EXCL, so a file or symlink someone planted at a predictable name (the old `<name>.tmp`) is never
followed or overwritten, and it is born with mode 0600 -- state files (client values, coordinator
checkpoints) hold training state other local users have no business reading. Files meant to be shared
(mask files, which devices download) pass `mode=0o644` explicitly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

STATE_MODE = 0o600  # the default: readable by the owner only
SHARED_MODE = 0o644  # files other users/devices must read (masks)


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


__all__ = ["SHARED_MODE", "STATE_MODE", "atomic_write"]
