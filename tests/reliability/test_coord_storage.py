"""The coordinator's storage is evidence too (docs/RELIABILITY.md "Coordinator storage"): an event log
that is missing or empty beside checkpoints (exit 7), a damaged one (exit 8) and a full disk (exit 5)
each stop `meerkat coordinator` with one line naming the file and the fix; nothing is changed, and no
new fleet starts at round 0. Real files, a real full tmpfs, the real CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clienttoy import REPO, Toy, write_toml
from test_storage_faults import _fill, small_fs  # noqa: F401 (small_fs: the 1 MiB tmpfs fixture)

from coordinator.eventlog import EventLog
from coordinator.records import ResultRecord, ResultRow
from coordinator.storage import (
    EXIT_LOG_DAMAGED,
    EXIT_LOG_LOST,
    EXIT_STORAGE_FULL,
    StorageFault,
    check_state,
    full_disk_fault,
)


def _fleet(d: Path, rounds: int = 3) -> Path:
    """A state_dir as a coordinator leaves it: results of `rounds` rounds, a checkpoint file and its row."""
    log = EventLog(d)
    with log.transaction():
        log.persist_many([ResultRecord(ResultRow(r, (r + 1,), (0.5,), 0.01, "rademacher", 2, "c" * 64, 1.0 + r, 1.0))
                          for r in range(rounds)])  # fmt: skip
        ck = d / "checkpoints" / f"values-r{rounds - 1:08d}.safetensors"
        ck.parent.mkdir()
        ck.write_bytes(b"checkpoint")
        log.add_checkpoint(rounds - 1, str(ck), "c" * 64, 9.0)
    log.close()
    return d / "events.sqlite"


def _digest(d: Path) -> dict[str, str]:
    """Every file's sha256, but SQLite's -shm/-wal (a WAL reader's read-only open makes them, empty)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.endswith(("-shm", "-wal"))}  # fmt: skip


def test_a_sound_state_dir_and_a_fresh_one_pass(tmp_path: Path) -> None:
    check_state(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # nothing created
    _fleet(tmp_path / "s")
    check_state(tmp_path / "s")


@pytest.mark.parametrize("loss", ["missing", "empty", "no_rounds"])
def test_a_lost_event_log_beside_checkpoints_is_refused(tmp_path: Path, loss: str) -> None:
    d = tmp_path / "s"
    db = _fleet(d)
    for p in d.glob("events.sqlite*"):
        p.unlink()
    if loss == "empty":
        db.write_bytes(b"")
    elif loss == "no_rounds":
        EventLog(d).close()  # a fresh schema: what a silent restart would have made
    before = _digest(d)
    with pytest.raises(StorageFault) as e:
        check_state(d)
    said = {"missing": "is missing", "empty": "is empty (0 bytes)", "no_rounds": "has no rounds"}[loss]
    assert e.value.code == EXIT_LOG_LOST
    assert f"event log {db} {said} but {d / 'checkpoints'} holds 1 checkpoint(s) up to values-r00000002" in str(e.value)
    assert "restore the event log from a backup" in str(e.value) and "\n" not in str(e.value)
    assert _digest(d) == before  # nothing created, nothing changed


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_event_log_is_refused(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "s"
    db = _fleet(d, rounds=400)  # several pages, so a cut lands inside the tables
    raw = db.read_bytes()
    db.write_bytes(b"not a database at all!" * 5 + raw[110:] if damage == "header" else raw[: len(raw) // 2])
    before = _digest(d)
    with pytest.raises(StorageFault) as e:
        check_state(d)
    assert e.value.code == EXIT_LOG_DAMAGED
    assert f"event log {db} is damaged (" in str(e.value) and "restore it from a backup" in str(e.value)
    assert _digest(d) == before


def test_a_full_disk_is_a_storage_fault_with_the_path(small_fs: Path) -> None:  # noqa: F811
    _fill(small_fs)
    with pytest.raises(Exception) as e:
        EventLog(small_fs / "s")
    fault = full_disk_fault(e.value, small_fs / "s")
    assert fault is not None and fault.code == EXIT_STORAGE_FULL
    assert f"disk full writing {small_fs / 's'}" in str(fault) and "df -h" in str(fault)
    assert full_disk_fault(ValueError("not a disk"), small_fs) is None


def _alive_at(state: Path) -> str | None:
    log = EventLog(state, readonly=True)
    try:
        return log.get_meta("alive_at")
    finally:
        log.close()


def _coordinator(toy: Toy, tmp: Path, state: Path) -> subprocess.CompletedProcess[str]:
    conf = write_toml(tmp / "coordinator.toml", dict(
        broker="mqtt://127.0.0.1:1", fleet="f", client_id="coord", state_dir=str(state), model_dir=str(toy.model_dir),
        mask=str(toy.mask_path), steps=2, lr=1e-3, min_clients=1, metrics=False,
    ))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "shared.cli", "coordinator", "--config", str(conf)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_meerkat_coordinator_exit_codes_for_storage_faults(toy: Toy, tmp_path: Path, small_fs: Path) -> None:  # noqa: F811
    lost = tmp_path / "lost"
    _fleet(lost)
    for p in lost.glob("events.sqlite*"):
        p.unlink()
    r = _coordinator(toy, tmp_path, lost)
    assert r.returncode == 7, r.stderr[-2000:]
    assert f"{lost / 'events.sqlite'} is missing" in r.stderr and "Traceback" not in r.stderr
    assert not (lost / "events.sqlite").exists()  # no new fleet

    damaged = tmp_path / "damaged"
    db = _fleet(damaged)
    db.write_bytes(b"\0" * 100 + db.read_bytes()[100:])
    r = _coordinator(toy, tmp_path, damaged)
    assert r.returncode == 8, r.stderr[-2000:]
    assert f"{db} is damaged" in r.stderr and "Traceback" not in r.stderr

    _fill(small_fs)
    r = _coordinator(toy, tmp_path, small_fs / "state")
    assert r.returncode == 5, r.stderr[-2000:]
    assert f"disk full writing {small_fs / 'state'}" in r.stderr and "df -h" in r.stderr and "Traceback" not in r.stderr


def test_a_disk_that_fills_while_the_coordinator_runs_exits_5(toy: Toy, tmp_path: Path, small_fs: Path,  # noqa: F811
                                                              broker_url: str) -> None:  # fmt: skip
    """The pump's next write (its liveness beat, every 2 s) hits the full disk: exit 5, one line, no traceback."""
    state = small_fs / "state"
    conf = write_toml(tmp_path / "coordinator.toml", dict(
        broker=broker_url, fleet=f"f{time.time_ns()}", client_id=f"coord{time.time_ns()}", state_dir=str(state),
        model_dir=str(toy.model_dir), mask=str(toy.mask_path), steps=2, lr=1e-3, min_clients=1, metrics=False,
    ))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "coordinator", "--config", str(conf)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not (state / "events.sqlite").exists() or _alive_at(state) is None:
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        _fill(small_fs)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("meerkat coordinator: ")]
    assert len(line) == 1 and f"disk full writing {state}" in line[0] and "df -h" in line[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
