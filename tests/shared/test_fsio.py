"""shared.fsio.atomic_write: random O_EXCL temp names (no symlink is followed), 0600 state files, cleanup."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from shared.fsio import DIR_MODE, SHARED_MODE, atomic_write, private_dir, private_file
from shared.maskfile import Mask, MaskMeta, save_mask


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_planted_symlink_at_the_old_tmp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "values.f32"
    for planted in (target.with_name(target.name + ".tmp"), tmp_path / f".{target.name}.tmp"):
        planted.symlink_to(victim)  # the names the old code wrote through
    atomic_write(target, b"new values")
    atomic_write(target, b"newer values", tmp=tmp_path / f".{target.name}.tmp")  # old callers' argument
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"newer values" and not target.is_symlink()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([".values.f32.tmp", "values.f32", "values.f32.tmp", "victim"])


def test_state_files_are_0600_even_when_they_were_0644(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "checkpoint.safetensors"
        target.write_bytes(b"old")
        os.chmod(target, 0o644)
        atomic_write(target, b"new")
        assert _mode(target) == 0o600
        atomic_write(tmp_path / "fresh", b"x")
        assert _mode(tmp_path / "fresh") == 0o600
        atomic_write(tmp_path / "shared", b"x", mode=SHARED_MODE)
        assert _mode(tmp_path / "shared") == 0o644
    finally:
        os.umask(old)


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "state"
    target.symlink_to(victim)
    atomic_write(target, b"mine")
    assert victim.read_bytes() == b"precious" and target.read_bytes() == b"mine" and not target.is_symlink()


def test_failed_write_leaves_no_temp_and_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state"
    atomic_write(target, b"v1")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_masks_stay_readable_for_the_devices(tmp_path: Path) -> None:
    meta = MaskMeta(1, "random", 2 / 16, "none", "ab" * 32)
    save_mask(Mask({"w": torch.tensor([0, 5])}, {"w": (4, 4)}, None, meta), tmp_path / "mask.safetensors")
    assert _mode(tmp_path / "mask.safetensors") == 0o644


def test_private_dir_and_file_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        d = private_dir(tmp_path / "a" / "b")
        assert _mode(tmp_path / "a") == _mode(d) == DIR_MODE == 0o700
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o750)
        os.chmod(kept, 0o750)
        private_dir(kept)
        assert _mode(kept) == 0o750  # an existing directory keeps the mode its owner chose
        f = private_file(d / "x.db")
        assert f.read_bytes() == b"" and _mode(f) == 0o600
        f.write_bytes(b"data")
        os.chmod(f, 0o644)
        for side in ("x.db-wal", "x.db-shm"):
            (d / side).write_bytes(b"")
            os.chmod(d / side, 0o644)
        private_file(f)  # an existing file keeps its content, loses the wider mode (side files too)
        assert f.read_bytes() == b"data"
        assert [_mode(d / n) for n in ("x.db", "x.db-wal", "x.db-shm")] == [0o600] * 3
        (d / "link").symlink_to(f)
        with pytest.raises(OSError):
            private_file(d / "link")  # never through a symlink
    finally:
        os.umask(old)
