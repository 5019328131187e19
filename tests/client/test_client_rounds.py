"""The client side of the round lifecycle, in-process, against the real coordinator or a scripted one
speaking the real codec over the real Mosquitto."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

from clienttoy import (
    ThreadedClient,
    ThreadedCoordinator,
    Toy,
    client_settings,
    coordinator_config,
    coordinator_updates,
    uid,
)

from edge_client.service.rounds import update_msg_id
from shared.apply import values_checksum
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.messages import Heartbeat, Join, RoundPlan, Status, SyncRequest, Update
from shared.mqtt import MqttLink
from shared.sidecar import initial_values_from_dir
from shared.topics import Topics


def test_rounds_with_the_real_coordinator_end_bit_identical(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet = uid("f")
    coord = ThreadedCoordinator(coordinator_config(toy, broker_url, fleet, tmp_path / "coord"), stop_after_round=2)
    client = ThreadedClient(client_settings(toy, broker_url, fleet, uid("dev"), tmp_path / "c"))
    try:
        coord.wait(90)
        client.wait_round(2, 30)
    finally:
        client.stop()
    c = client.client
    assert c.st.checksum == values_checksum(coord.coord.values)  # same bits as the coordinator
    ups = coordinator_updates(tmp_path / "coord")
    assert [(r, s) for _, r, _, s in ups] == [(0, "accepted"), (1, "accepted"), (2, "accepted")]
    assert c.counters["rounds_trained"] == 3 and c.counters["updates_acked"] == 3
    assert c.st.data_pointer == 3 * 3 * 4  # 3 rounds x 3 steps x batch 4 examples consumed


def test_late_clients_catch_up_by_replay_then_by_checkpoint(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet, state = uid("f"), tmp_path / "coord"
    a = ThreadedClient(client_settings(toy, broker_url, fleet, uid("a"), tmp_path / "a"))
    try:
        ThreadedCoordinator(coordinator_config(toy, broker_url, fleet, state), stop_after_round=2).wait(90)
    finally:
        a.stop()
    # B starts from v_0 while the fleet is at round 2: 3 rounds behind <= replay_max -> scalar Replay
    # (a restarted coordinator may first sample the departed client; a short deadline re-plans with the newcomer)
    coord = ThreadedCoordinator(
        coordinator_config(toy, broker_url, fleet, state, replay_max=5, round_deadline_s=3.0), stop_after_round=3
    )
    b = ThreadedClient(client_settings(toy, broker_url, fleet, uid("b"), tmp_path / "b"))
    try:
        coord.wait(90)
        b.wait_round(3, 30)
    finally:
        b.stop()
    assert b.client.counters["rounds_replayed"] == 3 and b.client.counters["checkpoints_installed"] == 0
    assert b.client.st.checksum == values_checksum(coord.coord.values)
    # C is 4 rounds behind with replay_max=1 -> the coordinator sends the values in checkpoint chunks
    coord = ThreadedCoordinator(
        coordinator_config(toy, broker_url, fleet, state, replay_max=1, chunk_bytes=1024, round_deadline_s=3.0),
        stop_after_round=4,
    )
    c = ThreadedClient(client_settings(toy, broker_url, fleet, uid("c"), tmp_path / "c"))
    try:
        coord.wait(90)
        c.wait_round(4, 30)
    finally:
        c.stop()
    assert c.client.counters["checkpoints_installed"] == 1 and c.client.counters["rounds_replayed"] == 0
    assert c.client.st.checksum == values_checksum(coord.coord.values)
    ups = coordinator_updates(state)
    assert [(r, cl[0]) for cl, r, _, _ in ups] == [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "c")]


class Probe:
    """A scripted coordinator: sees everything the client sends, publishes plans."""

    def __init__(self, broker: str, fleet: str, cid: str) -> None:
        self.t = Topics(fleet)
        subs = [(self.t.up(cid), 1), (self.t.sync(cid), 1), (self.t.join(cid), 1), (self.t.hb(cid), 0), (self.t.status(cid), 1)]
        self.link = MqttLink(broker, uid("probe"), subscriptions=subs)
        self.link.start()
        assert self.link.wait_connected(10)

    def next(self, cls: type, timeout: float = 30.0) -> Any:
        end = time.monotonic() + timeout
        while True:
            msg = self.link.inbox.get(timeout=max(0.01, end - time.monotonic()))
            if msg.payload:
                m = decode(msg.payload)
                if isinstance(m, cls):
                    return m

    def none_of(self, cls: type, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = self.link.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            assert not (msg.payload and isinstance(decode(msg.payload), cls)), f"unexpected {cls.__name__}"


def test_scripted_plans_refusal_update_contents_sync_and_heartbeat(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet, cid = uid("f"), uid("dev")
    probe = Probe(broker_url, fleet, cid)
    v0 = initial_values_from_dir(toy.model_dir, toy.mask.layers)
    good: dict[str, Any] = dict(
        fleet=fleet, round=0, seeds=(11, 22, 33), lr=1e-3, eps=1e-2, dist="rademacher", steps={cid: 2},
        base_round=-1, deadline=time.time() + 60, fingerprint=toy.fingerprint, mask_id=toy.mask.mask_id,
        batch_size=4, values_checksum=values_checksum(v0),
    )  # fmt: skip
    client = ThreadedClient(client_settings(toy, broker_url, fleet, cid, tmp_path / "c"))
    try:
        assert probe.next(Status).online is True
        join = probe.next(Join)
        assert (join.fingerprint, join.mask_id, join.last_round, join.n_samples) == (toy.fingerprint, toy.mask.mask_id, -1, 22)  # 24 rows, 2 held out (eval)
        assert join.capabilities["quant"] == "nf4" and join.budget_gib == 2.0
        # a plan for another model: refused, nothing trained, nothing sent
        wrong = RoundPlan(**{**good, "fingerprint": "0" * 64})
        probe.link.publish(probe.t.plan, encode(wrong), qos=1, retain=True)
        probe.none_of(Update, 1.5)
        assert client.client.counters["plan_mismatch"] == 1 and client.client.counters["steps"] == 0
        # the right plan: 2 steps (T_k) of the 3 seeds, one Update with exactly that
        plan = RoundPlan(**good)
        probe.link.publish(probe.t.plan, encode(plan), qos=1, retain=True)
        upd = probe.next(Update)
        assert (upd.round, len(upd.grads), upd.n_samples) == (0, 2, 22)
        assert upd.fp_tag == fp_tag(toy.fingerprint) and upd.msg_id == update_msg_id(cid, plan)
        assert all(g == g and abs(g) < 1e3 for g in upd.grads) and upd.loss > 0
        # a re-plan whose base values differ from ours: refused, and the client resyncs from v_0
        bad = RoundPlan(**{**good, "seeds": (44, 55), "values_checksum": "f" * 64})
        probe.link.publish(probe.t.plan, encode(bad), qos=1, retain=True)
        assert probe.next(SyncRequest).have_round == -1
        assert client.client.counters["checksum_mismatch"] == 1
        # a plan that builds on a round we have not seen: the client asks for it first
        ahead = RoundPlan(**{**good, "round": 5, "base_round": 4})
        probe.link.publish(probe.t.plan, encode(ahead), qos=1, retain=True)
        probe.none_of(Update, 1.5)  # no training on values it does not have
        assert client.client.rounds.known_round == 4 and client.client.st.round == -1
        assert probe.next(SyncRequest).have_round == -1  # ... it keeps asking (no coordinator answers here)
        hb = probe.next(Heartbeat, timeout=5)
        assert hb.rss_bytes > 0 and hb.cpu_pct >= 0 and hb.step_time_s is not None and hb.step_time_s > 0
        assert hb.peak_mem_bytes is not None and hb.peak_mem_bytes > 0
    finally:
        client.stop()
        probe.link.stop(final=[(probe.t.plan, b"", 1, True)])
    assert client.client.counters["steps"] == 2
    # SIGTERM-style stop published the offline status (retained)
    check = MqttLink(broker_url, uid("chk"), subscriptions=[(probe.t.status(cid), 1)])
    check.start()
    try:
        got = check.inbox.get(timeout=10)
        assert decode(got.payload, Status).online is False and got.retain
    finally:
        check.stop(final=[(probe.t.status(cid), b"", 1, True)])
