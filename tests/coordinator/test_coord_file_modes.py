"""The coordinator's state files are 0600 and its directories 0700 under a umask of 022 (issue 26:
events.sqlite and its -wal/-shm were 0644), through the real Coordinator: event log + a checkpoint."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from coordfakes import make_config, synthetic_mask, synthetic_v0

from coordinator.checkpoint import keep_checkpoint
from coordinator.server import Coordinator


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{path relative to root: permission bits} of every file and directory below root (root included)."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_event_log_and_checkpoints_are_private(tmp_path: Path, umask_022: None) -> None:
    state = tmp_path / "srv" / "state"  # neither exists yet: both are created
    mask = synthetic_mask((50,))
    coord = Coordinator(make_config(tmp_path, "mqtt://127.0.0.1:1", state_dir=state), mask=mask,
                        initial_values=synthetic_v0(mask.nnz))  # fmt: skip
    try:
        ckpt = keep_checkpoint(coord.log, state, 0, coord.values, coord.mask_id, coord.fingerprint, 3, 1.0)
        got = modes(state)  # while the log is open: its -wal and -shm exist
        assert {"events.sqlite", "events.sqlite-wal", "events.sqlite-shm"} <= set(got), got
        assert ckpt.relative_to(state).as_posix() in got
        want = {k: 0o700 if (state / k).is_dir() else 0o600 for k in got}
        assert got == want, {k: oct(v) for k, v in got.items()}
        assert stat.S_IMODE((tmp_path / "srv").stat().st_mode) == 0o700  # a parent it created too
    finally:
        coord.log.close()


def test_an_old_0644_event_log_is_narrowed_on_open(tmp_path: Path, umask_022: None) -> None:
    state = tmp_path / "state"
    mask = synthetic_mask((50,))
    cfg = make_config(tmp_path, "mqtt://127.0.0.1:1", state_dir=state)
    Coordinator(cfg, mask=mask, initial_values=synthetic_v0(mask.nnz)).log.close()
    os.chmod(state / "events.sqlite", 0o644)  # as an older version left it
    coord = Coordinator(cfg, mask=mask, initial_values=synthetic_v0(mask.nnz))
    try:
        for name in ("events.sqlite", "events.sqlite-wal", "events.sqlite-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        coord.log.close()
