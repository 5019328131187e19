"""Compact RoundPlans (protocol 1.3, issue 31): the plan's size does not grow with the fleet, a device
recomputes from the plan alone whether it is sampled, 1.2 devices are refused with PLAN_FORM (or served by
plan_form = "list"), and a device the plan's rule covers but the round did not expect is accepted."""

from __future__ import annotations

from typing import Any

import pytest
from coordfakes import synthetic_v0

from coordinator.actions import Action, Persist, Publish, plan_message
from coordinator.config import CoordinatorConfig
from coordinator.records import RejectRecord, UpdateRecord
from coordinator.rounds import RoundBook
from coordinator.sampling import choose, extend_plan, open_plan
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.messages import ErrorCode, ErrorMsg, Join, RoundPlan, RoundResult, Update
from shared.sampling import U64, plan_steps, sample_key

FP, MASK = "ab" * 32, "0123456789abcdef"
COMPACT: dict[str, Any] = {"compact_plan": True}


def config(**kw: Any) -> CoordinatorConfig:
    base: dict[str, Any] = dict(fleet="f", steps=2, lr=0.01, min_clients=2, round_deadline_s=10.0, metrics=False)
    return CoordinatorConfig(**{**base, **kw})


def book(cfg: CoordinatorConfig) -> RoundBook:
    return RoundBook(cfg, fingerprint=FP, mask_id=MASK, values=synthetic_v0(64))


def sent(acts: list[Action], cls: type[Any], to: str | None = None) -> list[Any]:
    return [a.message for a in acts if isinstance(a, Publish) and isinstance(a.message, cls) and a.to == to]


def test_sample_key_is_sha256_of_the_first_seed_and_the_id() -> None:
    import hashlib

    seed0, cid = 0x0123456789ABCDEF, "dev-é"
    raw = hashlib.sha256(bytes.fromhex("efcdab8967452301") + "dev-é".encode()).digest()[:8]
    assert sample_key(seed0, cid) == int.from_bytes(raw, "little")
    assert sample_key(seed0, "dev-a") != sample_key(seed0 + 1, "dev-a")


@pytest.mark.parametrize("k", [0, 1, 1000, 99_999])
def test_plan_bytes_do_not_grow_with_the_fleet_and_the_sample_is_exact(k: int) -> None:
    """100,000 eligible devices, DP keys and three MEERKAT-VP exceptions: the encoded plan stays <= 1 KiB, and
    the devices the rule covers are exactly the k chosen (all for k = 0)."""
    fleet = [f"dev-{i:06d}" for i in range(100_000)]
    limited = set(fleet[:3])
    cfg = config(steps=10, clients_per_round=k, dp_clip=1.0, dp_epsilon=8.0, dp_steps=100)
    p = open_plan(cfg, 7, fleet, 0.0, "00" * 32, lambda c, T: 1 if c in limited else T)
    msg = RoundPlan(**{**plan_message(p, "f", FP, MASK).__dict__, "dp_clip": 1.0, "dp_noise": 0.0,
                       "dp_epsilon": 8.0, "dp_delta": 0.0, "dp_steps": 100})  # fmt: skip
    wire = encode(msg)
    assert len(wire) <= 1024, len(wire)
    back = decode(wire, RoundPlan, fleet="f")
    assert set(back.steps) <= limited and all(t == 1 for t in back.steps.values())
    covered = [c for c in fleet if plan_steps(back, c)]
    assert len(covered) == (k or len(fleet)) == len(p.steps)
    assert set(covered) == set(p.steps) and all(plan_steps(back, c) == p.steps[c] for c in covered)
    if k == 0:
        assert back.sample_max == U64


def test_choose_takes_the_smallest_keys_and_a_list_plan_names_them() -> None:
    pool = [f"c{i:02d}" for i in range(40)]
    seed0 = 12345
    compact, top = choose(pool, 5, seed0, True)
    listed, none = choose(list(reversed(pool)), 5, seed0, False)
    assert compact == listed == sorted(sorted(pool, key=lambda c: sample_key(seed0, c))[:5]) and none is None
    assert top == max(sample_key(seed0, c) for c in compact)
    assert choose(pool, 0, seed0, True) == (pool, U64) and choose(pool, 0, seed0, False) == (pool, None)


def test_extension_keeps_every_device_and_raises_sample_max() -> None:
    cfg = config(clients_per_round=3, min_updates=5, steps=4)
    pool = [f"c{i:02d}" for i in range(20)]
    p = open_plan(cfg, 0, pool, 0.0, "00" * 32, lambda c, T: T)
    new, extra = extend_plan(cfg, p, pool, 1, 10.0, lambda c, T: T)
    assert len(extra) == 4 and set(p.steps) < set(new.steps) and new.sample_max is not None
    assert p.sample_max is not None and new.sample_max > p.sample_max and new.extensions == 1
    wire = plan_message(new, "f", FP, MASK)
    assert {c for c in pool if plan_steps(wire, c)} == set(new.steps)


def test_a_1_2_join_is_refused_with_plan_form_and_a_list_fleet_serves_it() -> None:
    """A 1.2 device cannot decode a compact plan (key 18 is UNKNOWN_FIELD to it): the compact fleet refuses
    its Join with PLAN_FORM (42), saying what to do; with plan_form = "list" it joins and the plan lists it."""
    b = book(config(min_clients=1))
    acts = b.handle(Join("old", FP, MASK, 5, 1.0, {"device": "cpu"}, -1), 0.0)
    (err,) = sent(acts, ErrorMsg, "old")
    assert err.code == ErrorCode.PLAN_FORM and int(err.code) == 42 and 'plan_form = "list"' in err.reason and "upgrade" in err.reason
    assert not b.registry.joined("old") and [r.reason for a in acts if isinstance(a, Persist)
                                             for r in [a.record] if isinstance(r, RejectRecord)] == ["plan_form"]
    assert sent(b.tick(1.0), RoundPlan) == []  # nobody joined: no round
    lb = book(config(min_clients=1, plan_form="list"))
    assert sent(lb.handle(Join("old", FP, MASK, 5, 1.0, {"device": "cpu"}, -1), 0.0), ErrorMsg, "old") == []
    (plan,) = sent(lb.tick(1.0), RoundPlan)
    assert plan.steps == {"old": 2} and plan.sample_max is None
    assert 18 not in __import__("msgpack").unpackb(encode(plan)[3:], strict_map_key=False)  # a 1.2 body


def test_a_device_the_rule_covers_is_accepted_though_the_round_did_not_expect_it() -> None:
    b = book(config(min_clients=2, quorum=1.0))
    for k in ("a", "b"):
        b.handle(Join(k, FP, MASK, 5, 1.0, COMPACT, -1), 0.0)
    (plan,) = sent(b.tick(0.0), RoundPlan)
    assert plan.steps == {} and plan.sample_max == U64 and b.plan is not None and set(b.plan.steps) == {"a", "b"}
    b.handle(Join("late", FP, MASK, 5, 1.0, COMPACT, -1), 1.0)  # joined after the open: covered, not expected
    acts = b.handle(Update(0, 1, (0.5, 0.5), 5, fp_tag(FP), 1.0, client="late"), 2.0)
    assert [a.record.update.status for a in acts if isinstance(a, Persist) and isinstance(a.record, UpdateRecord)] \
        == ["accepted"] and b.extra == {"late"}
    for k in ("a", "b"):
        b.handle(Update(0, 1, (0.25, 0.25), 5, fp_tag(FP), 1.0, client=k), 3.0)
    (res,) = sent(b.tick(3.0), RoundResult)
    assert res.n_clients == 3 and b.extra == set()


def test_a_closed_compact_plan_keeps_only_its_exceptions_and_still_takes_late_updates() -> None:
    b = book(config(min_clients=3, min_updates=2, quorum=0.5, quorum_grace_s=0.0))
    for k in ("a", "b", "c"):
        b.handle(Join(k, FP, MASK, 5, 1.0, COMPACT, -1), 0.0)
    sent(b.tick(0.0), RoundPlan)
    for k in ("a", "b"):
        b.handle(Update(0, 1, (0.5, 0.5), 5, fp_tag(FP), 1.0, client=k), 1.0)
    assert sent(b.tick(1.0), RoundResult) and b.plans[0].state == "closed"
    assert b.plans[0].steps == {} and b.plans[0].sample_max == U64  # 3 expected devices no longer held
    acts = b.handle(Update(0, 1, (0.25, 0.25), 5, fp_tag(FP), 1.0, client="c"), 2.0)  # c, late
    assert [a.record.update.status for a in acts if isinstance(a, Persist) and isinstance(a.record, UpdateRecord)] \
        == ["late"] and sent(acts, ErrorMsg, "c") == []
