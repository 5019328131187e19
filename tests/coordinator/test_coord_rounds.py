"""Rounds end to end over a real Mosquitto: plan -> updates -> result, invalid input counted, dedupe."""

from __future__ import annotations

from pathlib import Path

import pytest
from coordfakes import (
    FakeClient,
    ThreadedCoordinator,
    make_config,
    sampled,
    synthetic_mask,
    synthetic_v0,
    uid,
)

from coordinator.eventlog import EventLog
from coordinator.server import Coordinator
from shared.apply import apply_round, fedavg_scalars, values_checksum
from shared.codec import encode
from shared.messages import ErrorMsg, Heartbeat, RoundPlan, RoundResult


@pytest.fixture
def mask():  # type: ignore[no-untyped-def]
    return synthetic_mask()


def test_two_rounds_with_invalid_traffic(tmp_path: Path, broker_url: str, mask) -> None:  # type: ignore[no-untyped-def]
    # the FedAvg weights as sent: the robust default (centered, weight caps) has its own tests
    cfg = make_config(tmp_path, broker_url, min_clients=3, steps=3, aggregation="fedavg", weight_cap_factor=0.0)
    v0 = synthetic_v0(mask.nnz)
    coord = Coordinator(cfg, mask=mask, initial_values=v0, stop_after_round=1)
    fp, mid = mask.meta.fingerprint, mask.mask_id
    runner = ThreadedCoordinator(coord).start()
    clients = {c: FakeClient(broker_url, cfg.fleet, uid(c)) for c in ("a", "b", "c")}
    stranger = FakeClient(broker_url, cfg.fleet, uid("x"))
    try:
        n = {"a": 10, "b": 30, "c": 5}
        for k, cl in clients.items():
            cl.join(fp, mid, n_samples=n[k])
        stranger.join("ab" * 32, mid)  # another base model
        err = stranger.wait_for(ErrorMsg)
        assert "fingerprint" in err.reason

        plan = clients["a"].wait_for(RoundPlan, lambda p: p.round == 0)
        assert sorted(sampled(plan, [cl.cid for cl in clients.values()])) == sorted(cl.cid for cl in clients.values())
        assert plan.values_checksum == values_checksum(v0) and plan.base_round == -1
        a = clients["a"]
        up = a.topics.up(a.cid)
        # garbage of every kind: none of it may stop the coordinator
        a.publish(up, b"\x00\x01garbage")
        a.publish(up, encode(Heartbeat("", 1.0, 1.0, 1)))  # wrong type on the topic
        a.publish(up, encode(ErrorMsg(1, "x"))[:2])  # truncated
        a.publish(up, bytes([0xB1, 0, 3]) + b"\xc1\xc1")  # an Update header over a body that is not msgpack
        a.update(0, [0.1, 0.2], 10, fp, msg_id=5)  # wrong number of steps
        a.update(0, [0.1, 0.2, 0.3], 10, "cd" * 32, msg_id=6)  # wrong fp_tag
        stranger.update(0, [1.0, 1.0, 1.0], 10, fp, msg_id=1)  # covered by sample_max (all), never joined
        a.update(0, [1e9, 0.0, 0.0], 10, fp, msg_id=7)  # over max_abs_grad
        grads = {"a": [0.5, -0.25, 1.0], "b": [-1.0, 0.75, 0.125], "c": [2.0, 0.0, -3.0]}
        for k, cl in clients.items():
            cl.update(0, grads[k], n[k], fp, msg_id=100 + len(k))
        a.update(0, grads["a"], n["a"], fp, msg_id=101)  # re-sent: ignored
        a.update(0, [9.0, 9.0, 9.0], n["a"], fp, msg_id=999)  # different msg for the same round: first wins

        # its re-join (on the UNKNOWN_CLIENT) is refused too: wait for that before the run may end
        stranger.wait_for(ErrorMsg, lambda e: "fingerprint" in e.reason)
        assert stranger.rejoins == 1
        res = clients["b"].wait_for(RoundResult, lambda r: r.round == 0)
        per = {clients[k].cid: grads[k] for k in grads}
        want = fedavg_scalars(per, {clients[k].cid: float(n[k]) for k in n}, 3)
        assert list(res.scalars) == pytest.approx(want, rel=1e-6)  # grads went through float32
        v1 = apply_round(v0, res.seeds, res.scalars, res.lr, "rademacher")
        assert res.values_checksum == values_checksum(v1) and res.n_clients == 3
        assert list(res.seeds) == list(plan.seeds)

        plan1 = clients["c"].wait_for(RoundPlan, lambda p: p.round == 1)
        assert plan1.values_checksum == res.values_checksum and plan1.base_round == 0
        for k, cl in clients.items():
            cl.update(1, [0.1 * len(k), 0.2, 0.3], n[k], fp, msg_id=200)
        res1 = clients["c"].wait_for(RoundResult, lambda r: r.round == 1)
        assert runner.join(30) == 0
        assert res1.values_checksum == values_checksum(
            apply_round(v1, res1.seeds, res1.scalars, res1.lr, "rademacher")
        )
    finally:
        runner.stop()
        for cl in [*clients.values(), stranger]:
            cl.close()

    log = EventLog(cfg.state_dir)
    rejects = log.views.reject_counts()
    # the stranger's join, its re-join on the UNKNOWN_CLIENT its update got, and the wrong fp_tag update
    assert rejects["fingerprint"] == 3
    assert (
        rejects["decode_bad_magic"] == 1
        and rejects["decode_malformed"] == 1
        and rejects["decode_unexpected_type"] == 1
    )
    assert rejects["decode_truncated"] == 1
    assert rejects["wrong_steps"] == 1 and rejects["unknown_client"] == 1 and rejects["grad_too_large"] == 1
    assert rejects["conflict"] == 1
    rows = log.updates(round=0)
    assert sorted(r.client for r in rows) == sorted(cl.cid for cl in clients.values())
    assert {r.msg_id for r in rows if r.client == clients["a"].cid} == {101}
    assert all(r.used_in == 0 for r in rows)
    assert log.views.last_result_round() == 1
    # GradIP per client per step was stored (the mask has grads)
    assert all(len(log.views.latest_gradip(cl.cid) or []) == 3 for cl in clients.values())
