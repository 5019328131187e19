"""Durable file writes: a file either has its old content or its complete new content, even after kill -9."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Write `data` to `tmp` (default `path.tmp`), fsync it, rename over `path`, fsync the directory."""
    tmp = tmp if tmp is not None else path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
