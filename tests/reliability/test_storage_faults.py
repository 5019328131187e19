"""A device's storage is evidence (docs/CLIENT.md "Damaged storage"): a missing, empty, truncated or
malformed client.db / WAL / values file is refused with its message (exit 3 from `meerkat client`), never
silently reset, and no values file that is not provably obsolete is deleted; a full disk is StorageFull
(exit 5 at start) with the path and the fix, nothing half-committed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clienttoy import REPO, Toy, client_settings, write_toml

from edge_client.service.state import IDENTITY, StateError, StateStore, StorageFull
from shared.apply import values_checksum

FP, MASK = "ab" * 32, "0123456789abcdef"
V0 = torch.linspace(-1.0, 1.0, 4096)


def _state(d: Path, rounds: int = 0) -> None:
    s = StateStore(d)
    s.open(FP, MASK, V0)
    for r in range(rounds):
        s.commit_round(r, V0 + r + 1)
    s.close()


def _open(d: Path) -> None:
    s = StateStore(d)
    try:
        s.open(FP, MASK, V0)
    finally:
        s.close()


def _values(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("values-r*.f32"))


def test_fresh_dir_is_a_fresh_client_and_gets_an_identity(tmp_path: Path) -> None:
    _state(tmp_path / "s")
    assert (tmp_path / "s" / IDENTITY).exists() and len(_values(tmp_path / "s")) == 1


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_lost_client_db_is_refused_not_reset(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "s"
    _state(d, rounds=3)
    before = _values(d)
    db = d / "client.db"
    if damage == "empty":
        db.write_bytes(b"")
    else:
        db.unlink()
    with pytest.raises(StateError, match="empty \\(0 bytes\\)" if damage == "empty" else "is missing") as e:
        _open(d)
    assert "was initialised" in str(e.value) and "move" in str(e.value)
    assert _values(d) == before  # evidence kept: the round-2 values are still there


def test_half_truncated_client_db_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _state(d, rounds=3)
    db = d / "client.db"
    raw = db.read_bytes()
    db.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StateError, match="is damaged|lost|no state row"):
        _open(d)
    assert len(_values(d)) == 1


def test_half_truncated_wal_is_refused_and_the_newest_values_kept(tmp_path: Path) -> None:
    d, snap = tmp_path / "s", tmp_path / "snap"
    s = StateStore(d)
    s.open(FP, MASK, V0)
    for r in range(8):
        s.commit_round(r, V0 + r + 1)
    shutil.copytree(d, snap)  # a crash image: client.db + client.db-wal (not checkpointed) + values-r7
    s.close()
    wal = snap / "client.db-wal"
    assert wal.stat().st_size > 0
    wal.write_bytes(wal.read_bytes()[: wal.stat().st_size // 2])
    newest = _values(snap)
    with pytest.raises(StateError, match="lost committed transactions|is damaged|no state row"):
        _open(snap)
    assert _values(snap) == newest and any(n.startswith("values-r7-") for n in newest)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing"])
def test_damaged_values_file_is_refused(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "s"
    _state(d, rounds=2)
    (vf,) = d.glob("values-r1-*.f32")
    if damage == "truncated":
        vf.write_bytes(vf.read_bytes()[:100])
    elif damage == "flipped":
        raw = bytearray(vf.read_bytes())
        raw[8] ^= 0x40
        vf.write_bytes(bytes(raw))
    else:
        vf.unlink()
    with pytest.raises(StateError, match={"truncated": "has 100 bytes", "flipped": "is corrupt", "missing": "is missing"}[damage]):
        _open(d)


def test_newer_orphan_is_kept_older_files_pruned(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _state(d, rounds=2)
    (d / "values-r0-0000000000000000.f32").write_bytes(b"x")  # older than round 1: provably obsolete
    (d / "values-r5-1111111111111111.f32").write_bytes(b"y")  # newer: a crash before its commit, or lost commits
    _open(d)
    names = _values(d)
    assert "values-r0-0000000000000000.f32" not in names and "values-r5-1111111111111111.f32" in names


def test_identity_mismatch_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _state(d)
    (d / IDENTITY).write_text('{"fingerprint": "cd", "mask_id": "x", "nnz": 1}')
    with pytest.raises(StateError, match="mixed up"):
        _open(d)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs (we run as root here); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_is_storage_full_with_the_path_and_nothing_half_committed(small_fs: Path) -> None:
    d = small_fs / "s"
    s = StateStore(d)
    s.open(FP, MASK, V0)
    s.commit_round(0, V0 + 1)
    filler = _fill(small_fs)
    with pytest.raises(StorageFull, match=f"disk full writing {d}.*df -h"):
        s.commit_round(1, V0 + 2)
    st = s.load()
    assert st is not None and st.round == 0  # nothing of round 1 committed
    filler.unlink()
    assert s.commit_round(1, V0 + 2).round == 1  # the retry succeeds once there is space
    assert s.load().checksum == values_checksum(V0 + 2)  # type: ignore[union-attr]
    s.close()


def _client(toy: Toy, tmp: Path, state: Path) -> subprocess.CompletedProcess[str]:
    conf = write_toml(tmp / "client.toml", client_settings(toy, "mqtt://127.0.0.1:1", "f", "dev", state))
    return subprocess.run([sys.executable, "-m", "shared.cli", "client", "--config", str(conf)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_meerkat_client_exit_codes_for_storage_faults(toy: Toy, tmp_path: Path, small_fs: Path) -> None:
    # initialised then damaged: exit 3, the message names the file and the fix, nothing connected
    d = tmp_path / "state"
    _state(d)  # any initialised dir: the empty client.db is refused before the model identity matters
    (d / "client.db").write_bytes(b"")
    r = _client(toy, tmp_path, d)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "client.db is empty (0 bytes)" in r.stderr and "Traceback" not in r.stderr
    # a full disk at start: exit 5 with the path and the fix, not a traceback
    _fill(small_fs)
    r = _client(toy, tmp_path, small_fs / "state")
    assert r.returncode == 5, r.stderr[-2000:]
    assert "disk full writing" in r.stderr and "df -h" in r.stderr and "Traceback" not in r.stderr
