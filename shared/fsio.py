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
SHARED_DIR_MODE = 0o755  # directories of files other users must read (model dirs, exports)
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


def share_tree(root: Path) -> Path:
    """Make `root` and everything below it readable by every user: files SHARED_MODE, directories
    SHARED_DIR_MODE. For model directories (`meerkat tiny-model`, `meerkat export`), which a service user
    other than their writer reads: transformers writes model.safetensors through a 0600 temp file and a
    0077 umask does the rest. Model weights are not secrets. Returns `root`."""
    root = Path(root)
    for p in (root, *root.rglob("*")):
        if p.is_symlink():
            continue  # never chmod through a link
        want = SHARED_DIR_MODE if p.is_dir() else SHARED_MODE
        if p.stat().st_mode & 0o7777 != want:
            os.chmod(p, want)
    return root


def unreadable_hint(path: Path | str) -> str:
    """What to say when this process cannot read `path`: the user it runs as and the command that fixes it.
    Names the first directory on the way it cannot enter, when that is the cause."""
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    p = Path(path).absolute()
    for d in reversed(p.parents):
        if d.is_dir() and not os.access(d, os.X_OK):
            return (f"user {user} cannot enter {d} on the way to {p}: keep the model outside a private home "
                    f"(e.g. /opt/meerkat/models), or `sudo chmod o+x {d}`")
    target = p if p.is_dir() else p.parent
    return f"{p} is not readable by user {user}: `sudo chmod -R a+rX {target}` (model files are not secrets)"


def permission_hint(exc: BaseException) -> str:
    """"; <unreadable_hint>" for a PermissionError that names its file, else "" (appended to CLI errors)."""
    if isinstance(exc, PermissionError) and exc.filename:
        return f"; {unreadable_hint(exc.filename)}"
    return ""


__all__ = [
    "DIR_MODE", "SHARED_DIR_MODE", "SHARED_MODE", "STATE_MODE", "atomic_write", "private_dir", "private_file",
    "permission_hint", "share_tree", "unreadable_hint",
]
