"""Issue 7 "Must show": the real `meerkat client` process against the real coordinator over a real
Mosquitto, with the broker down at start, the broker SIGKILLed mid-round, the client SIGKILLed mid-step,
and a SIGTERM at the end."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest
from clienttoy import (
    ClientProc,
    ThreadedCoordinator,
    Toy,
    client_settings,
    coordinator_config,
    coordinator_updates,
    retained_plan,
    uid,
    write_toml,
)

from edge_client.service.state import StateStore
from shared.apply import values_checksum
from shared.codec import decode
from shared.messages import Status, Update
from shared.mqtt import MqttLink
from shared.topics import Topics


def _client_state(state_dir: Path) -> tuple[int, str, int, int]:
    """(round, checksum, data_pointer, saved steps) from the client's own state, opened read-only."""
    store = StateStore(state_dir, read_only=True)
    try:
        st, progress = store.load(), store.progress()
        assert st is not None
        return st.round, st.checksum, st.data_pointer, 0 if progress is None else len(progress.results)
    finally:
        store.close()


def _one_update_per_round(coord_state: Path, client: str, rounds: int) -> None:
    ups = [u for u in coordinator_updates(coord_state) if u[0] == client]
    assert [(r, s) for _, r, _, s in ups] == [(r, "accepted") for r in range(rounds)], ups


@pytest.mark.slow
def test_broker_down_at_start_then_killed_mid_round(toy: Toy, mosquitto: Any, tmp_path: Path) -> None:
    """`mosquitto`: the private broker of tests/conftest.py (not started yet)."""
    fleet, cid = uid("f"), uid("dev")
    conf = write_toml(tmp_path / "client.toml", client_settings(toy, mosquitto.url, fleet, cid, tmp_path / "c"))
    client = ClientProc(conf, tmp_path / "client.log")
    coord = None
    try:
        client.wait_log("connecting to", 120)  # model loaded, broker still down
        time.sleep(1.5)
        assert "joined fleet" not in client.text() and client.proc.poll() is None  # waiting, not crashed
        mosquitto.start()
        client.wait_log("joined fleet", 60)
        coord = ThreadedCoordinator(
            coordinator_config(toy, mosquitto.url, fleet, tmp_path / "coord", steps=40), stop_after_round=3
        )
        client.wait_log("round 1: training", 60)
        mosquitto.kill()  # SIGKILL mid-round: the broker loses whatever it had not saved yet
        time.sleep(1.0)
        mosquitto.start()
        coord.wait(120)
        client.wait_log("applied round 3", 60)
        assert client.text().count("connected to") >= 2  # it reconnected by itself
        assert client.terminate() == 0
    finally:
        if client.proc.poll() is None:
            client.kill()
        if coord is not None:
            coord.stop()
    _one_update_per_round(tmp_path / "coord", cid, 4)
    rnd, ck, dp, _ = _client_state(tmp_path / "c")
    assert (rnd, ck) == (3, values_checksum(coord.coord.values))
    assert dp == 4 * 40 * 4  # 4 rounds x 40 steps x 4 examples, counted once


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_then_sigterm(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet, cid, T = uid("f"), uid("dev"), 40
    state = tmp_path / "c"
    conf = write_toml(tmp_path / "client.toml", client_settings(toy, broker_url, fleet, cid, state))
    coord = ThreadedCoordinator(coordinator_config(toy, broker_url, fleet, tmp_path / "coord", steps=T), stop_after_round=3)
    log = tmp_path / "client.log"
    procs = [ClientProc(conf, log)]
    try:
        # kill 1: in the middle of round 1's local steps (some steps saved as progress, not all)
        procs[-1].wait_log("round 1: training", 120)
        end = time.monotonic() + 30
        while not 3 <= _client_state(state)[3] < T - 10:
            assert time.monotonic() < end, "round 1 never showed progress"
            time.sleep(0.005)
        procs[-1].kill()
        rnd, _, _, done = _client_state(state)
        assert rnd == 0 and 3 <= done < T
        assert [u[1] for u in coordinator_updates(tmp_path / "coord")] == [0]
        procs.append(ClientProc(conf, log))
        procs[-1].wait_log("round 1: resuming at step", 120)
        coord.wait(120)
        procs[-1].wait_log("applied round 3", 60)
        assert procs[-1].terminate() == 0  # SIGTERM: clean exit, offline status published
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        coord.stop()
    text = log.read_text()
    resumed = int(text.split("round 1: resuming at step ")[1].split("/")[0])
    assert 3 <= resumed < T
    _one_update_per_round(tmp_path / "coord", cid, 4)
    rnd, ck, dp, _ = _client_state(state)
    assert (rnd, ck) == (3, values_checksum(coord.coord.values))
    assert dp == 4 * T * 4  # every round's batches consumed exactly once, kills or not
    t = Topics(fleet)
    check = MqttLink(broker_url, uid("chk"), subscriptions=[(t.status(cid), 1)])
    check.start()
    try:
        got = check.inbox.get(timeout=10)
        assert decode(got.payload, Status).online is False and got.retain
    finally:
        check.stop(final=[(t.status(cid), b"", 1, True), (t.plan, b"", 1, True), (t.result_latest, b"", 1, True)])


@pytest.mark.slow
def test_round_resumed_after_sigkill_sends_the_bytes_of_an_uninterrupted_round(
    toy: Toy, broker_url: str, tmp_path: Path
) -> None:
    """Issue 12 "must show": the same retained plan, trained by the same client id from v_0 twice: once
    without interruption, once SIGKILLed after some steps and restarted. The Update payloads captured
    on the broker are byte-identical (one local-path rule for a step and a resume)."""
    fleet, cid, T = uid("f"), uid("dev"), 30
    t = Topics(fleet)
    plan, probe = retained_plan(toy, broker_url, fleet, cid, T, 12)

    def next_update(proc: ClientProc, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert proc.proc.poll() is None, proc.text()[-4000:]
            try:
                msg = probe.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.payload:
                return msg.payload
        raise TimeoutError(f"no Update within {timeout} s:\n{proc.text()[-4000:]}")

    procs: list[ClientProc] = []
    try:
        conf = write_toml(tmp_path / "a.toml", client_settings(toy, broker_url, fleet, cid, tmp_path / "a"))
        procs.append(ClientProc(conf, tmp_path / "a.log"))
        whole = next_update(procs[-1], 180)
        assert procs[-1].terminate() == 0
        state = tmp_path / "b"
        conf = write_toml(tmp_path / "b.toml", client_settings(toy, broker_url, fleet, cid, state))
        procs.append(ClientProc(conf, tmp_path / "b.log"))
        procs[-1].wait_log("round 0: training", 120)
        end = time.monotonic() + 60
        while not 3 <= _client_state(state)[3] < T - 8:
            assert time.monotonic() < end, "round 0 never showed progress"
            time.sleep(0.005)
        procs[-1].kill()
        done = _client_state(state)[3]
        assert 3 <= done < T and probe.inbox.empty()  # killed mid-round: nothing was sent
        procs.append(ClientProc(conf, tmp_path / "b.log"))
        resumed = next_update(procs[-1], 180)
        assert procs[-1].terminate() == 0
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        probe.stop(final=[(t.plan, b"", 1, True), (t.status(cid), b"", 1, True)])
    at = int((tmp_path / "b.log").read_text().split("round 0: resuming at step ")[1].split("/")[0])
    assert done <= at < T  # it resumed from the saved steps (not from step 0)
    upd = decode(resumed, Update)
    # real, varied g's: on a CPU without bf16 the toy computes in fp32 and its g's sit on the loss grid
    # (multiples of ~4.8e-6 here: 14 distinct values of 30 in one run), so "varied" is a few distinct, not most
    assert (upd.round, len(upd.grads)) == (0, T) and len(set(upd.grads)) >= 5 and any(upd.grads)
    assert resumed == whole
    store = StateStore(state, read_only=True)  # the outbox row the restarted client persisted: the same bytes
    try:
        assert [r.payload for r in store.outbox.rows()] == [whole]
    finally:
        store.close()
