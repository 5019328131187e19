"""Deadlines: a round closes short at its deadline, a late update is folded into the next result (policy
"next") or dropped and counted ("drop"); too few updates extend the round and sample more clients."""

from __future__ import annotations

import math
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
from shared.messages import RoundPlan, RoundResult


@pytest.mark.parametrize("policy", ["next", "drop"])
def test_late_update(tmp_path: Path, broker_url: str, policy: str) -> None:
    mask = synthetic_mask((100,))
    v0 = synthetic_v0(mask.nnz)
    cfg = make_config(
        tmp_path, broker_url, min_clients=2, min_updates=1, round_deadline_s=1.0, steps=2, straggler=policy,
        weight_cap_factor=0.0,  # the weights as joined: this test is about the fold, not the cap
    )
    coord = Coordinator(cfg, mask=mask, initial_values=v0, stop_after_round=1)
    fp = mask.meta.fingerprint
    a, b = FakeClient(broker_url, cfg.fleet, uid("a")), FakeClient(broker_url, cfg.fleet, uid("b"))
    runner = ThreadedCoordinator(coord).start()
    try:
        a.join(fp, mask.mask_id, n_samples=2)
        b.join(fp, mask.mask_id, n_samples=6)
        p0 = a.wait_for(RoundPlan, lambda p: p.round == 0)
        a.update(0, [1.0, 2.0], 2, fp, msg_id=1)
        r0 = a.wait_for(RoundResult, lambda m: m.round == 0, timeout=10)  # b missed the deadline
        assert r0.n_clients == 1 and list(r0.scalars) == [1.0, 2.0]
        b.update(0, [4.0, -4.0], 6, fp, msg_id=1)  # late
        p1 = b.wait_for(RoundPlan, lambda p: p.round == 1)
        a.update(1, [0.5, 0.5], 2, fp, msg_id=2)
        b.update(1, [-0.5, 1.5], 6, fp, msg_id=2)
        r1 = b.wait_for(RoundResult, lambda m: m.round == 1)
        assert runner.join(20) == 0
    finally:
        runner.stop()
        a.close()
        b.close()
    if policy == "next":  # docs/PROTOCOL.md 5.1: w_j = n_j / N, N = 2 + 6 + 6 (b counts once per update)
        assert list(r1.seeds) == list(p1.seeds) + list(p0.seeds)
        want = [math.fsum([2 / 14 * 0.5, 6 / 14 * -0.5]), math.fsum([2 / 14 * 0.5, 6 / 14 * 1.5]),
                6 / 14 * 4.0, 6 / 14 * -4.0]  # fmt: skip
        assert r1.n_clients == 2  # distinct clients: b's late and on-time updates are one client
    else:
        assert list(r1.seeds) == list(p1.seeds)
        want = fedavg_scalars({"a": [0.5, 0.5], "b": [-0.5, 1.5]}, {"a": 2.0, "b": 6.0}, 2)
        assert r1.n_clients == 2
        assert EventLog(cfg.state_dir).views.reject_counts() == {"late_dropped": 1}
    assert list(r1.scalars) == want  # bit for bit
    v1 = apply_round(
        apply_round(v0, r0.seeds, r0.scalars, r0.lr, "rademacher"), r1.seeds, r1.scalars, r1.lr, "rademacher"
    )
    assert values_checksum(v1) == r1.values_checksum


def test_short_round_is_extended_with_more_clients(tmp_path: Path, broker_url: str) -> None:
    mask = synthetic_mask((100,))
    cfg = make_config(
        tmp_path, broker_url, min_clients=3, clients_per_round=2, min_updates=2, round_deadline_s=1.0, steps=1,
        max_extensions=2,
    )  # fmt: skip
    coord = Coordinator(cfg, mask=mask, initial_values=synthetic_v0(mask.nnz), stop_after_round=0)
    fp = mask.meta.fingerprint
    cl = {k: FakeClient(broker_url, cfg.fleet, uid(k)) for k in "xyz"}
    runner = ThreadedCoordinator(coord).start()
    try:
        for c in cl.values():
            c.join(fp, mask.mask_id, n_samples=1)
        p0 = cl["x"].wait_for(RoundPlan, lambda p: p.round == 0)
        by_id = {c.cid: c for c in cl.values()}
        first = sorted(sampled(p0, by_id))
        assert len(first) == 2
        by_id[first[0]].update(0, [1.0], 1, fp, msg_id=1)  # only one of the two reports
        again = cl["x"].wait_for(RoundPlan, lambda p: p.round == 0, timeout=10)
        assert (
            sorted(sampled(again, by_id)) == sorted(by_id) and again.seeds == p0.seeds and again.deadline > p0.deadline
        )
        (added,) = set(by_id) - set(first)
        by_id[added].update(0, [3.0], 1, fp, msg_id=1)
        res = cl["x"].wait_for(RoundResult, lambda m: m.round == 0, timeout=10)
        assert runner.join(20) == 0
    finally:
        runner.stop()
        for c in cl.values():
            c.close()
    assert res.n_clients == 2 and list(res.scalars) == [2.0]
    assert [e.kind for e in EventLog(cfg.state_dir, readonly=True).views.events(round=0)] == ["open", "extend", "close"]
