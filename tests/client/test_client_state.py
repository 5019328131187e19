"""Durable client state: values files + SQLite state/outbox/progress, atomic under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clienttoy import REPO

from edge_client.engine.spsa import StepResult
from edge_client.service.state import StateError, StateStore
from shared.apply import values_checksum

FP = "ab" * 32
MASK = "0123456789abcdef"


def test_fresh_open_commit_and_reopen(tmp_path: Path) -> None:
    v0 = torch.arange(10, dtype=torch.float32)
    store = StateStore(tmp_path)
    st, values = store.open(FP, MASK, v0)
    assert (st.round, st.data_pointer, st.trained_round, st.checksum) == (-1, 0, -1, values_checksum(v0))
    assert torch.equal(values, v0)
    v1 = v0 + 0.5
    st = store.commit_round(0, v1)
    assert st.round == 0 and st.checksum == values_checksum(v1)
    assert sorted(p.name for p in tmp_path.glob("values-*")) == [st.values_file]  # the old file is gone
    store.close()
    store = StateStore(tmp_path)
    st2, values = store.open(FP, MASK, v0)
    assert st2 == st and torch.equal(values, v1)
    with pytest.raises(StateError, match="belongs to model"):
        store.open("cd" * 32, MASK, v0)
    store.close()


def test_corrupt_or_missing_values_file_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    st, _ = store.open(FP, MASK, torch.zeros(8))
    path = tmp_path / st.values_file
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="corrupt"):
        store.open(FP, MASK, torch.zeros(8))
    path.unlink()
    with pytest.raises(StateError, match="missing"):
        store.open(FP, MASK, torch.zeros(8))
    store.close()


def test_finish_training_is_one_transaction_and_outbox_acks(tmp_path: Path) -> None:
    store = StateStore(tmp_path, resend_after_s=10.0)
    store.open(FP, MASK, torch.zeros(4))
    assert store.progress() is None
    s0, s1 = StepResult(0.5, 1.25, 0.75, 0.1, seed=2**64 - 1), StepResult(-0.5, 1.0, 2.0, 0.2, seed=7)
    store.record_step(3, 77, 0, s0, 4)
    store.record_step(3, 77, 1, s1, 8)
    p = store.progress()
    assert p is not None and (p.round, p.msg_id, p.data_pointer) == (3, 77, 8)
    assert p.results == (s0, s1)  # u64 seed and every float round-trip exactly
    ro = StateStore(tmp_path, read_only=True)  # a reader beside the running client sees the same
    assert ro.progress() == p and ro.load() == store.load()
    ro.close()
    store.record_step(3, 2**64 - 78, 0, s1, 4)  # another plan for the round: the stale steps are dropped
    p = store.progress()
    assert p is not None and (p.msg_id, p.results) == (2**64 - 78, (s1,))
    st = store.finish_training(3, 2**64 - 5, "t/up/c", b"payload", 8)
    assert (st.trained_round, st.trained_msg_id, st.data_pointer) == (3, 2**64 - 5, 8)
    assert st == store.load() and store.progress() is None
    (row,) = store.outbox.rows()
    assert (row.round, row.msg_id, row.payload) == (3, 2**64 - 5, b"payload")  # u64 round-trips
    # due: never sent -> due now; after a send, due only after resend_after_s
    assert store.outbox.due(now=100.0) == [row]
    store.outbox.sent(row, mid=5, now=100.0)
    assert store.outbox.due(now=105.0) == [] and store.outbox.due(now=110.0) == [row]
    store.outbox.sent(row, mid=9, now=110.0)  # re-published: either PUBACK settles it
    assert store.outbox.acked(1234) is None and store.outbox.pending() == 1
    acked = store.outbox.acked(5)
    assert acked is not None and acked.acked and acked.id == row.id
    assert store.outbox.pending() == 0 and store.outbox.due(now=1e9) == [] and store.outbox.acked(9) is None
    # kept until the round is over: a reconnect (the broker may have lost it) makes it due again
    store.outbox.reconnected()
    assert [r.id for r in store.outbox.due(now=0.0)] == [row.id]
    store.outbox.sent(row, mid=11, now=0.0)
    store.outbox.acked(11)
    store.close()
    store = StateStore(tmp_path)  # ... and so does a restart
    store.open(FP, MASK, torch.zeros(4))
    assert [r.id for r in store.outbox.due()] == [row.id]
    store.commit_round(2, torch.ones(4))
    assert len(store.outbox) == 1  # round 3 is not over yet
    store.commit_round(3, torch.ones(4) * 2)
    assert len(store.outbox) == 0  # its result is applied: deleted in the same transaction
    store.close()


def test_interrupted_transaction_rolls_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open(FP, MASK, torch.zeros(4))
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.outbox.add(1, 1, "t", b"x")
        db.execute("UPDATE state SET data_pointer = 99")
        raise RuntimeError("crash inside")
    st = store.load()
    assert st is not None and st.data_pointer == 0 and len(store.outbox) == 0
    store.close()


CHILD = r"""
import sys, torch
from edge_client.service.state import StateStore
store = StateStore(sys.argv[1])
st, values = store.open("ab" * 32, "0123456789abcdef", torch.full((4096,), -1.0))
r = st.round + 1
print("ready", flush=True)
while True:
    store.finish_training(r, r + 1, "t/up/c", bytes([r % 256]) * 64, 10 * (r + 1))
    store.outbox.sent(next(x for x in store.outbox.rows() if x.round == r), mid=r)
    store.outbox.acked(r)                                   # the PUBACK (row kept until the result)
    store.commit_round(r, torch.full((4096,), float(r)))    # the round's result
    r += 1
"""


def test_sigkill_at_any_moment_leaves_a_consistent_state(tmp_path: Path) -> None:
    """A child loops train -> queue -> ack -> apply as fast as it can; SIGKILL it at several moments."""
    delays = (0.05, 0.3)
    for delay in delays:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        store = StateStore(tmp_path)
        st, values = store.open(FP, MASK, torch.full((4096,), -1.0))  # raises if the values file were torn
        assert torch.equal(values, torch.full((4096,), float(st.round)))
        assert st.trained_round in (st.round, st.round + 1)
        assert st.data_pointer == 10 * (st.trained_round + 1)
        rows = store.outbox.rows()
        if st.trained_round == st.round:
            assert rows == []  # deleted with the commit of the round's result
        else:
            assert all(r.round == st.trained_round and r.payload == bytes([r.round % 256]) * 64 for r in rows)
        # the committed round's values file, plus at most the next round's if the kill fell between writing
        # it and committing it (kept: storage is evidence, a file of a newer round is never deleted unproven)
        files = sorted(tmp_path.glob("values-*.f32"))
        assert [f for f in files if f.name.startswith(f"values-r{st.round}-")], files
        assert all(f.name.startswith((f"values-r{st.round}-", f"values-r{st.round + 1}-")) for f in files), files
        assert len(files) <= 2 and not list(tmp_path.glob(".values-*"))
        store.close()
    assert st.round > 3  # the loop made progress across the kills


def test_state_files_are_0600_and_dirs_0700_under_umask_022(tmp_path: Path) -> None:
    """client.db and its -wal/-shm (the outbox lives in it) and the values files: 0600; the state dir and
    a parent it creates: 0700, whatever the umask (issue 26: they were 0644 / 0755)."""
    old = os.umask(0o022)
    try:
        state = tmp_path / "var" / "client"
        store = StateStore(state)
        store.open(FP, MASK, torch.zeros(4))
        store.record_step(0, 5, 0, StepResult(0.5, 1.0, 0.5, 0.1, seed=3), 4)
        store.finish_training(0, 6, "t/up/c", b"payload", 4)  # an outbox row
        assert len(store.outbox) == 1
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        assert {"client.db", "client.db-wal", "client.db-shm"} <= set(files), files
        assert any(n.startswith("values-") for n in files), files
        assert files == dict.fromkeys(files, 0o600), {k: oct(v) for k, v in files.items()}
        for d in (state, state.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        store.close()
    finally:
        os.umask(old)


def test_an_untrained_state_starts_over_for_another_mask_a_trained_one_is_refused(tmp_path: Path) -> None:
    """One start with a wrong mask (refused by the fleet: exit 6) must not leave a directory every later start
    refuses (issue 30); a state that learned or queued anything stays refused (nothing is thrown away)."""
    store = StateStore(tmp_path)
    first, _ = store.open(FP, MASK, torch.zeros(8))
    store.close()
    other = "fedcba9876543210"
    store = StateStore(tmp_path)
    st, values = store.open(FP, other, torch.ones(5))  # another mask: another nnz, another v_0
    assert (st.mask_id, st.nnz, st.round) == (other, 5, -1) and torch.equal(values, torch.ones(5))
    assert json.loads((tmp_path / "identity.json").read_text())["mask_id"] == other
    assert not (tmp_path / first.values_file).exists()
    store.close()
    store = StateStore(tmp_path)  # and it stays usable
    assert store.open(FP, other, torch.ones(5))[0] == st
    store.record_step(0, 5, 0, StepResult(0.5, 1.0, 0.5, 0.1, seed=3), 4)  # one step done: evidence now
    store.close()
    store = StateStore(tmp_path)
    with pytest.raises(StateError, match="belongs to model"):
        store.open(FP, MASK, torch.zeros(8))
    store.close()
