"""The round book (coordinator/rounds.py) with no broker, no model and (except for recovery) no SQLite:
one test per round-lifecycle rule of docs/ARCHITECTURE.md, driven by decoded messages and a made-up clock."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from coordfakes import synthetic_v0

from coordinator.actions import Action, Duplicate, Persist, Publish, WriteCheckpoint
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor
from coordinator.eventlog import EventLog
from coordinator.records import LimitRecord, RejectRecord, ReplanRecord, ResultRecord, UpdateRecord
from coordinator.recovery import recover
from coordinator.registry import JOIN_GRACE_S, REJOIN_NAG_S
from coordinator.rounds import RoundBook
from shared.apply import apply_round, fedavg_scalars, values_checksum
from shared.fingerprint import fp_tag
from shared.messages import (
    CheckpointChunk,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    Join,
    Replay,
    RoundPlan,
    RoundResult,
    Status,
    SyncRequest,
    Update,
)
from shared.prng import raw_u64
from shared.sampling import plan_steps

FP, MASK = "ab" * 32, "0123456789abcdef"
NNZ = 256


def config(**kw: Any) -> CoordinatorConfig:
    base: dict[str, Any] = dict(fleet="f", steps=2, lr=0.01, min_clients=2, round_deadline_s=10.0, metrics=False)
    return CoordinatorConfig(**{**base, **kw})


def book(cfg: CoordinatorConfig, **kw: Any) -> RoundBook:
    return RoundBook(cfg, fingerprint=FP, mask_id=MASK, values=synthetic_v0(NNZ), **kw)


def expected(b: RoundBook) -> dict[str, int]:
    """The open round's sampled devices -> T (a compact wire plan lists only the exceptions)."""
    assert b.plan is not None
    return b.plan.steps


def join(b: RoundBook, client: str, n: int, now: float = 0.0) -> list[Action]:
    return b.handle(Join(client, FP, MASK, n, 1.0, {"compact_plan": True}, -1), now)


def update(client: str, round: int, grads: list[float], n: int, msg_id: int = 1) -> Update:
    return Update(round, msg_id, tuple(grads), n, fp_tag(FP), 1.0, client=client)


def records(acts: list[Action], cls: type[Any]) -> list[Any]:
    return [a.record for a in acts if isinstance(a, Persist) and isinstance(a.record, cls)]


def sent(acts: Sequence[Action], cls: type[Any], to: str | None = None) -> list[Any]:
    return [a.message for a in acts if isinstance(a, Publish) and isinstance(a.message, cls) and a.to == to]


def test_straggler_round_closes_at_deadline_with_min_updates() -> None:
    b = book(config(min_clients=3, min_updates=2, weight_cap_factor=0.0))  # the weights as joined
    for k, n in (("a", 2), ("b", 6), ("c", 1)):
        join(b, k, n)
    (plan,) = sent(b.tick(0.0), RoundPlan)
    assert sorted(expected(b)) == ["a", "b", "c"] and plan.deadline == 10.0
    b.handle(update("a", 0, [0.5, 0.25], 2), 1.0)
    b.handle(update("b", 0, [-1.0, 2.0], 6), 2.0)
    assert b.tick(9.99) == []  # c is a straggler, the deadline has not passed
    acts = b.tick(10.0)
    (res,) = sent(acts, RoundResult)
    assert res.n_clients == 2 and list(res.seeds) == list(plan.seeds)
    assert list(res.scalars) == fedavg_scalars({"a": [0.5, 0.25], "b": [-1.0, 2.0]}, {"a": 2.0, "b": 6.0}, 2)
    assert res.values_checksum == values_checksum(apply_round(synthetic_v0(NNZ), res.seeds, res.scalars, 0.01,
                                                              "rademacher"))  # fmt: skip
    (rec,) = records(acts, ResultRecord)
    assert sorted(rec.used) == [("a", 0, "accepted"), ("b", 0, "accepted")]
    assert b.last_round == 0 and b.plan is None


def test_extension_samples_more_clients_with_the_same_seeds() -> None:
    b = book(config(min_clients=3, clients_per_round=2, min_updates=2, max_extensions=2, steps=1))
    for k in "xyz":
        join(b, k, 1)
    (p0,) = sent(b.tick(0.0), RoundPlan)
    first = sorted(expected(b))
    b.handle(update(first[0], 0, [1.0], 1), 1.0)
    acts = b.tick(10.0)  # deadline with 1 < min_updates: extend
    (again,) = sent(acts, RoundPlan)
    assert sorted(expected(b)) == ["x", "y", "z"] and again.seeds == p0.seeds and again.deadline == 20.0
    # the wire: compact plans list no client; the extension raised sample_max so that z is covered too
    assert p0.steps == again.steps == {} and p0.sample_max is not None and again.sample_max is not None
    assert [bool(plan_steps(p0, k)) for k in "xyz"].count(True) == 2 and all(plan_steps(again, k) == 1 for k in "xyz")
    assert records(acts, ReplanRecord)[0].extensions == 1 and sent(acts, RoundResult) == []
    (added,) = set("xyz") - set(first)
    b.handle(update(added, 0, [3.0], 1), 11.0)
    (res,) = sent(b.tick(20.0), RoundResult)
    assert res.n_clients == 2 and list(res.scalars) == [2.0]


def _round0_with_a_straggler(policy: str) -> tuple[RoundBook, RoundPlan]:
    b = book(config(min_updates=1, straggler=policy, weight_cap_factor=0.0))  # the weights as joined
    join(b, "a", 2)
    join(b, "b", 6)
    (p0,) = sent(b.tick(0.0), RoundPlan)
    b.handle(update("a", 0, [1.0, 2.0], 2), 1.0)
    assert sent(b.tick(10.0), RoundResult)[0].n_clients == 1  # b missed the deadline
    return b, p0


def test_late_update_folded_into_next_result_with_the_exact_formula() -> None:
    b, p0 = _round0_with_a_straggler("next")
    acts = b.handle(update("b", 0, [4.0, -4.0], 6), 11.0)
    assert [r.update.status for r in records(acts, UpdateRecord)] == ["late"]
    (p1,) = sent(b.tick(11.0), RoundPlan)
    b.handle(update("a", 1, [0.5, 0.5], 2, msg_id=2), 12.0)
    b.handle(update("b", 1, [-0.5, 1.5], 6, msg_id=2), 12.0)
    acts = b.tick(12.0)
    (res,) = sent(acts, RoundResult)
    N = 14.0  # a 2 + b 6 on time + b 6 late: every contributor once, in one normaliser
    assert list(res.seeds) == list(p1.seeds) + list(p0.seeds)
    assert list(res.scalars) == [
        math.fsum([2 / N * 0.5, 6 / N * -0.5]), math.fsum([2 / N * 0.5, 6 / N * 1.5]), 6 / N * 4.0, 6 / N * -4.0,
    ]  # fmt: skip
    assert res.n_clients == 2  # distinct clients
    assert ("b", 0, "folded") in records(acts, ResultRecord)[0].used and b.late == {}


def test_late_update_dropped_under_policy_drop() -> None:
    b, _ = _round0_with_a_straggler("drop")
    acts = b.handle(update("b", 0, [4.0, -4.0], 6), 11.0)
    assert [r.update.status for r in records(acts, UpdateRecord)] == ["dropped"]
    assert [r.reason for r in records(acts, RejectRecord)] == ["late_dropped"]
    assert [e.code for e in sent(acts, ErrorMsg, "b")] == [ErrorCode.STALE_ROUND]  # PROTOCOL.md §2 step 9
    (p1,) = sent(b.tick(11.0), RoundPlan)
    b.handle(update("a", 1, [0.5, 0.5], 2, msg_id=2), 12.0)
    b.handle(update("b", 1, [-0.5, 1.5], 6, msg_id=2), 12.0)
    (res,) = sent(b.tick(12.0), RoundResult)
    assert list(res.seeds) == list(p1.seeds) and res.n_clients == 2


def test_dedupe_same_msg_id_is_ignored() -> None:
    b = book(config(min_clients=2))
    join(b, "a", 1)
    join(b, "b", 1)
    b.tick(0.0)
    first = b.handle(update("a", 0, [1.0, 1.0], 1, msg_id=7), 1.0)
    assert len(records(first, UpdateRecord)) == 1
    assert b.handle(update("a", 0, [1.0, 1.0], 1, msg_id=7), 2.0) == [Duplicate("a", 0, 7)]


@pytest.mark.parametrize(("straggler", "late_max_age", "kept"), [("next", 1, 1), ("next", 3, 3), ("drop", 1, 64)])
def test_dedupe_keys_only_for_rounds_late_max_age_can_name(straggler: str, late_max_age: int, kept: int) -> None:
    """PROTOCOL.md 1.3: with straggler `next` an update of a round closed late_max_age or more rounds ago
    is refused before it is stored, so only the last late_max_age closed rounds keep dedupe keys; `drop`
    stores an update of any round whose plan is kept (the 64-round window)."""
    b = book(config(min_clients=2, straggler=straggler, late_max_age=late_max_age))
    join(b, "a", 1)
    join(b, "b", 1)
    for r in range(5):
        b.tick(float(r))
        b.handle(update("a", r, [1.0, 1.0], 1, msg_id=r), float(r))
        b.handle(update("b", r, [1.0, 1.0], 1, msg_id=r), float(r))
        sent(b.tick(float(r)), RoundResult)
    assert b.last_round == 4
    assert sorted({r for _, r in b.stored}) == list(range(max(0, 5 - kept), 5))
    again = b.handle(update("a", 4, [1.0, 1.0], 1, msg_id=4), 9.0)  # the newest closed round: still a duplicate
    assert again == [Duplicate("a", 4, 4)]
    if straggler == "next" and late_max_age == 1:  # round 2's key is gone: a re-send is just too old
        acts = b.handle(update("a", 2, [1.0, 1.0], 1, msg_id=2), 9.0)
        assert [e.code for e in sent(acts, ErrorMsg, "a")] == [ErrorCode.STALE_ROUND]
        assert records(acts, UpdateRecord) == []


def test_conflict_other_msg_id_first_wins() -> None:
    b = book(config(min_clients=2))
    join(b, "a", 1)
    join(b, "b", 1)
    b.tick(0.0)
    b.handle(update("a", 0, [1.0, 1.0], 1, msg_id=7), 1.0)
    acts = b.handle(update("a", 0, [9.0, 9.0], 1, msg_id=8), 2.0)
    assert [r.reason for r in records(acts, RejectRecord)] == ["conflict"]
    assert records(acts, UpdateRecord) == [] and [e.code for e in sent(acts, ErrorMsg, "a")] == [ErrorCode.CONFLICT]
    b.handle(update("b", 0, [3.0, 3.0], 1), 3.0)
    (res,) = sent(b.tick(3.0), RoundResult)
    assert list(res.scalars) == [2.0, 2.0]  # a's first update, not the second


def test_vp_limit_flagged_client_gets_one_step_in_the_next_plan() -> None:
    cfg = config(steps=3, drift_window=3, drift_min_steps=6, drift_later_min=3.0, drift_quie_min=0.6,
                 drift_decay_rule="absolute")
    grad = torch.from_numpy(((raw_u64(5, NNZ) >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))
    mon = DriftMonitor(grad, "rademacher", cfg.drift_thresholds(), keep_history=False)
    b = book(cfg, drift=mon)
    join(b, "ok", 10)
    join(b, "drift", 10)
    now, flagged = 0.0, []
    for r, gradip in enumerate((1.0, 0.01)):  # drift's GradIP decays 100x in round 1
        (plan,) = sent(b.tick(now), RoundPlan)
        assert expected(b) == {"ok": 3, "drift": 3}
        for k in ("ok", "drift"):
            g = gradip if k == "drift" else 1.0
            acts = b.handle(update(k, r, [g / mon.coefficient(s) for s in plan.seeds], 10, msg_id=r), now)
            flagged += records(acts, LimitRecord)
        assert sent(b.tick(now), RoundResult)
        now += 1.0
    assert [(x.client, x.round) for x in flagged] == [("drift", 1)]
    (p2,) = sent(b.tick(now), RoundPlan)
    assert expected(b) == {"ok": 3, "drift": 1}


@pytest.mark.parametrize("rule", ["fleet", "off"])
def test_vp_fleet_decay_limits_at_close_and_keeps_the_update(rule: str) -> None:
    """drift_decay_rule = fleet: a client whose GradIP decayed while the fleet's did not is flagged when the
    round closes (not on its update), its update stays in that round's aggregate; off (the default):
    rho_later measured, nobody limited."""
    cfg = config(steps=3, min_clients=5, drift_window=3, drift_min_steps=6, drift_decay_rule=rule,
                 drift_fleet_ratio=3.0, drift_fleet_min_clients=5)
    grad = torch.from_numpy(((raw_u64(5, NNZ) >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))
    mon = DriftMonitor(grad, "rademacher", cfg.drift_thresholds(), keep_history=False)
    b = book(cfg, drift=mon)
    names = ["a", "b", "c", "d", "drift"]
    for k in names:
        join(b, k, 10)
    now, limits = 0.0, []
    for r in range(2):
        (plan,) = sent(b.tick(now), RoundPlan)
        for k in names:
            gradip = 0.01 if k == "drift" and r == 1 else 1.0 + 0.1 * names.index(k)  # drift decays 100x in round 1
            acts = b.handle(update(k, r, [gradip / mon.coefficient(s) for s in plan.seeds], 10, msg_id=r), now)
            assert records(acts, LimitRecord) == []  # never on the update itself
        acts = b.tick(now)
        (res,) = sent(acts, RoundResult)
        assert res.n_clients == 5  # the flagged client's update is aggregated
        limits += [(x.client, x.round) for x in records(acts, LimitRecord)]
        now += 1.0
    assert limits == ([("drift", 1)] if rule == "fleet" else [])
    fs = mon.fleet("drift")
    if rule == "fleet":
        assert fs is not None and fs.ratio > 3.0 and fs.median == pytest.approx(1.0)
    else:
        assert fs is None  # off: the book does not compute it (O(clients) per close saved)
        assert mon.stats("drift") is not None and mon.stats("drift").rho_later > 3.0  # type: ignore[union-attr]
    (p2,) = sent(b.tick(now), RoundPlan)
    assert expected(b) == {**{k: 3 for k in names}, "drift": 1 if rule == "fleet" else 3}


def test_replay_when_close_behind_checkpoint_when_far() -> None:
    b = book(config(min_clients=1, replay_max=2, chunk_bytes=256))
    join(b, "a", 1)
    results: list[RoundResult] = []
    for r in range(4):
        b.tick(float(r))
        b.handle(update("a", r, [0.5 - r, 0.25], 1, msg_id=r), float(r))
        results += sent(b.tick(float(r)), RoundResult)
    assert b.sync_reply("s", 3) == [Publish(Replay(()), to="s")]  # up to date
    (unknown,) = sent(b.handle(SyncRequest("s", 1), 5.0), ErrorMsg, "s")  # no values before a Join
    assert unknown.code == ErrorCode.UNKNOWN_CLIENT
    join(b, "s", 1, now=5.0)
    (rep,) = sent(b.handle(SyncRequest("s", 1), 5.0), Replay, "s")
    assert list(rep.results) == results[2:]  # 2 behind = replay_max
    for have in (0, -1, 7):  # more than replay_max behind, or ahead of us
        chunks = sent(b.sync_reply("s", have), CheckpointChunk, "s")
        assert len(chunks) == NNZ * 4 // 256 and {c.round for c in chunks} == {3}
        assert b"".join(c.data for c in chunks) == b.values.numpy().astype("<f4").tobytes()
        assert chunks[0].sha256 == results[-1].values_checksum


def test_rejoin_after_unknown_client() -> None:
    b = book(config(min_clients=5))
    b.handle(Heartbeat("dev", 0.0, 1.0, 1), 0.0)  # live, but its Join went to nobody
    assert sent(b.tick(0.0), ErrorMsg, "dev") == []
    (nag,) = sent(b.tick(JOIN_GRACE_S), ErrorMsg, "dev")
    assert nag.code == ErrorCode.UNKNOWN_CLIENT
    assert sent(b.tick(JOIN_GRACE_S + 5.0), ErrorMsg, "dev") == []
    assert len(sent(b.tick(JOIN_GRACE_S + REJOIN_NAG_S), ErrorMsg, "dev")) == 1  # asked again
    join(b, "dev", 3, now=20.0)
    assert all(sent(b.tick(t), ErrorMsg, "dev") == [] for t in (25.0, 40.0, 60.0))
    assert b.registry.online() == ["dev"]
    b.handle(Status("dev", False, 61.0), 61.0)
    assert b.registry.online() == [] and sent(b.tick(80.0), ErrorMsg, "dev") == []


def _persist(log: EventLog, acts: list[Action]) -> list[Action]:
    with log.transaction():
        for a in acts:
            if isinstance(a, Persist):
                log.persist(a.record)
    return acts


def test_recovery_continues_identically(tmp_path: Path) -> None:
    """A book rebuilt from what the first one persisted (open round, late update, dedupe keys, registry)
    gives exactly the same actions for the same later events."""
    cfg = config(min_clients=2, min_updates=1, straggler="next", replay_max=3, checkpoint_every=100)
    log = EventLog(tmp_path)
    first = book(cfg)
    for k, n in (("a", 2), ("b", 6)):
        _persist(log, join(first, k, n))
    _persist(log, first.tick(0.0))
    _persist(log, first.handle(update("a", 0, [1.0, 2.0], 2), 1.0))
    _persist(log, first.tick(10.0))  # b is late for round 0
    _persist(log, first.handle(update("b", 0, [4.0, -4.0], 6), 11.0))
    _persist(log, first.tick(11.0))  # round 1 open
    _persist(log, first.handle(update("a", 1, [0.5, 0.5], 2, msg_id=2), 12.0))

    again = RoundBook(cfg, fingerprint=FP, mask_id=MASK, values=synthetic_v0(NNZ),
                      recovered=recover(log, synthetic_v0(NNZ), MASK, FP, cfg.replay_max))  # fmt: skip
    assert again.start(13.0) == [Publish(sent_result(first)), Publish(first.plan_message(first.plan))]  # type: ignore[arg-type]
    later = [
        update("a", 1, [0.5, 0.5], 2, msg_id=2),  # a duplicate of what was stored before the restart
        update("a", 1, [7.0, 7.0], 2, msg_id=3),  # a conflict with it
        update("b", 1, [-0.5, 1.5], 6, msg_id=2),
    ]
    for m in later:
        assert again.handle(m, 14.0) == first.handle(m, 14.0)
    a, b = again.tick(14.0), first.tick(14.0)
    assert a == b and sent(a, RoundResult)[0].n_clients == 2
    assert torch.equal(again.values, first.values)
    assert again.sync_reply("c", -1) == first.sync_reply("c", -1)
    log.close()


def sent_result(b: RoundBook) -> RoundResult:
    from coordinator.actions import result_message

    return result_message(b.results[-1])


def test_checkpoint_action_every_k_rounds() -> None:
    b = book(config(min_clients=1, checkpoint_every=2))
    join(b, "a", 1)
    got = []
    for r in range(4):
        b.tick(float(r))
        b.handle(update("a", r, [0.25, 0.25], 1, msg_id=r), float(r))
        got += [a.round for a in b.tick(float(r)) if isinstance(a, WriteCheckpoint)]
    assert got == [1, 3]


@pytest.mark.parametrize("bad", ["wrong_steps", "not_in_round", "unknown_client", "fingerprint", "unknown_round"])
def test_validation_rejects_are_counted_and_answered(bad: str) -> None:
    b = book(config(min_clients=2, clients_per_round=1))  # one of a, b sampled: sample_max = its key
    join(b, "a", 1)
    join(b, "b", 1)
    b.tick(0.0)
    (a,) = expected(b)
    (out,) = {"a", "b"} - {a}  # its key is above sample_max: not in the round
    u = {
        "wrong_steps": update(a, 0, [1.0], 1),
        "not_in_round": update(out, 0, [1.0, 1.0], 1),
        "unknown_client": update("zz", 0, [1.0, 1.0], 1),  # a key under sample_max (below) but no Join
        "fingerprint": Update(0, 1, (1.0, 1.0), 1, fp_tag("cd" * 32), 1.0, client=a),
        "unknown_round": update(a, 5, [1.0, 1.0], 1),
    }[bad]
    if bad == "unknown_client":
        b.plan = replace(b.plans[0], sample_max=(1 << 64) - 1)  # every id is under it: only the Join is missing
    acts = b.handle(u, 1.0)
    assert [r.reason for r in records(acts, RejectRecord)] == [bad]
    (err,) = sent(acts, ErrorMsg, u.client)
    want = {"wrong_steps": ErrorCode.BAD_UPDATE, "not_in_round": ErrorCode.NOT_IN_ROUND, "unknown_client": ErrorCode.UNKNOWN_CLIENT,
            "fingerprint": ErrorCode.FINGERPRINT_MISMATCH, "unknown_round": ErrorCode.UNKNOWN_ROUND}  # fmt: skip
    assert err.code == want[bad] and records(acts, UpdateRecord) == []


@pytest.mark.parametrize("policy", ["same", "any"])
def test_join_with_another_quant_is_refused_unless_the_fleet_mixes(policy: str) -> None:
    b = book(config(quant="nf4", quant_policy=policy))
    int8 = b.handle(Join("q8", FP, MASK, 5, 1.0, {"quant": "int8", "device": "cpu", "compact_plan": True}, -1), 0.0)
    nf4 = b.handle(Join("q4", FP, MASK, 5, 1.0, {"quant": "nf4", "compact_plan": True}, -1), 0.0)
    bare = b.handle(Join("qx", FP, MASK, 5, 1.0, {"compact_plan": True}, -1), 0.0)  # capabilities are optional: no quant, no refusal
    assert sent(nf4, ErrorMsg, "q4") == [] and sent(bare, ErrorMsg, "qx") == []
    if policy == "any":
        assert sent(int8, ErrorMsg, "q8") == [] and b.registry.clients["q8"].state == "joined"
        return
    (err,) = sent(int8, ErrorMsg, "q8")
    assert err.code == ErrorCode.QUANT_MISMATCH and int(err.code) == 41 and "int8" in err.reason and "nf4" in err.reason
    assert "q8" not in b.registry.clients or b.registry.clients["q8"].state != "joined"
    assert records(int8, RejectRecord)[0].reason == "quant"


@pytest.mark.parametrize("control", [True, False])
def test_vp_spike_leaves_the_update_out_and_limits_the_client(control: bool) -> None:
    cfg = config(min_clients=5, drift_control=control, drift_spike_ratio=10.0, aggregation="fedavg")
    grad = torch.from_numpy(((raw_u64(5, NNZ) >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))
    b = book(cfg, drift=DriftMonitor(grad, "rademacher", cfg.drift_thresholds()))
    grads = {"a": [1.0, -1.0], "b": [-1.0, 2.0], "c": [1.0, 1.0], "d": [1.0, -30.0], "e": [-1.0, 1.0]}  # d: 30x the median 1.0
    for k in grads:
        join(b, k, 10)
    (plan,) = sent(b.tick(0.0), RoundPlan)
    for k, g in grads.items():
        b.handle(update(k, 0, g, 10), 0.0)
    acts = b.tick(0.0)
    (res,) = sent(acts, RoundResult)
    kept = [k for k in sorted(grads) if not control or k != "d"]
    expect = fedavg_scalars({k: grads[k] for k in kept}, {k: 10 for k in kept}, 2)
    assert res.n_clients == len(kept) and list(res.scalars) == pytest.approx(list(expect), rel=1e-12)
    assert [(x.client, x.round) for x in records(acts, LimitRecord)] == ([("d", 0)] if control else [])
    (rec,) = records(acts, ResultRecord)
    assert [c for c, _, _ in rec.used] == kept  # d's update stays `accepted`, used by no result
    assert rec.all_accepted is not control  # the writer marks the round's accepted rows one by one then
    (p1,) = sent(b.tick(1.0), RoundPlan)
    assert expected(b) == {"a": 2, "b": 2, "c": 2, "d": 1 if control else 2, "e": 2}
    assert b.admission.misses == {}  # a left-out update still counts as the client's answer


def test_vp_spike_needs_five_updates_by_default() -> None:
    """Four updates (one of them 30x the median) are too few for the default spike_min_updates (5): a tiny
    fleet's median is one or two devices' |g|, so nobody is flagged or left out."""
    cfg = config(min_clients=4)
    assert cfg.drift_spike_min_updates == 5
    grad = torch.from_numpy(((raw_u64(5, NNZ) >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))
    b = book(cfg, drift=DriftMonitor(grad, "rademacher", cfg.drift_thresholds()))
    grads = {"a": [1.0, -1.0], "b": [-1.0, 2.0], "c": [1.0, 1.0], "d": [1.0, -30.0]}
    for k in grads:
        join(b, k, 10)
    sent(b.tick(0.0), RoundPlan)
    for k, g in grads.items():
        b.handle(update(k, 0, g, 10), 0.0)
    acts = b.tick(0.0)
    (res,) = sent(acts, RoundResult)
    assert res.n_clients == 4 and records(acts, LimitRecord) == []


def test_devices_whose_privacy_budget_is_spent_are_not_sampled() -> None:
    b = book(config(min_clients=1, steps=1, dp_epsilon=4.0, dp_steps=10))
    for k in "xy":
        join(b, k, 50)

    def hb(client: str, exhausted: bool) -> Heartbeat:
        return Heartbeat(client, 1.0, 0.0, 0, round=-1, dp_epsilon=3.9, dp_delta=1e-5, dp_exhausted=exhausted)

    b.handle(hb("x", True), 0.5)
    (p0,) = sent(b.tick(1.0), RoundPlan)
    assert sorted(expected(b)) == ["y"] and p0.dp_epsilon == 4.0 and p0.dp_steps == 10
    b.handle(hb("x", False), 2.0)  # e.g. the fleet's target was raised: it may train again
    assert sorted(b.eligible()) == ["x", "y"]
def _hb(client: str, available: bool | None, reason: str | None = None, round: int = -1) -> Heartbeat:
    return Heartbeat(client, 1.0, 1.0, 1, round=round, available=available, pause_reason=reason,
                     trained_share=None if available is None else 0.5)


def test_paused_devices_are_not_sampled_and_a_pause_is_not_a_miss() -> None:
    """Issue 27: a device whose policy paused it is not sampled; sampled and paused mid-round, it is
    excused (no miss, never benched); quorum rules are unchanged for the others."""
    b = book(config(min_clients=1, min_updates=1, bench_after_misses=1))
    for k in ("a", "b", "c"):
        join(b, k, 4)
    b.handle(_hb("c", False, "on battery"), 0.5)
    b.handle(_hb("b", None), 0.5)  # a 1.2 device says nothing: available
    (plan,) = sent(b.tick(1.0), RoundPlan)
    assert sorted(expected(b)) == ["a", "b"] and b.availability.paused("c") == "on battery"
    b.handle(_hb("b", False, "busy", round=0), 2.0)  # b pauses mid-round
    b.handle(update("a", 0, [0.5, 0.25], 4), 3.0)
    acts = b.tick(11.0)  # deadline: a reported, b paused
    (res,) = sent(acts, RoundResult)
    assert res.n_clients == 1 and b.admission.benched == {} and "b" not in b.admission.misses
    b.handle(_hb("c", True), 12.0)
    (plan,) = sent(b.tick(12.0), RoundPlan)
    assert sorted(expected(b)) == ["a", "c"]  # b still paused, c back


def test_round_where_every_sampled_device_paused_closes_at_once_and_nobody_is_benched() -> None:
    b = book(config(min_clients=2, min_updates=2, bench_after_misses=1, round_deadline_s=600.0))
    for k in ("a", "b"):
        join(b, k, 4)
    (plan,) = sent(b.tick(0.0), RoundPlan)
    assert sorted(expected(b)) == ["a", "b"]
    b.handle(_hb("a", False, "hot", round=0), 1.0)
    assert sent(b.tick(1.5), RoundResult) == []  # b has not paused: wait for it
    b.handle(_hb("b", False, "outside window", round=0), 2.0)
    acts = b.tick(2.0)  # long before the 600 s deadline
    (res,) = sent(acts, RoundResult)
    assert (res.round, res.n_clients, res.seeds, res.scalars) == (0, 0, (), ())
    assert res.values_checksum == values_checksum(synthetic_v0(NNZ))  # values unchanged
    assert b.admission.benched == {} and b.admission.misses == {} and b.plan is None
    assert sent(b.tick(3.0), RoundPlan) == []  # nobody available: no round opens
    b.handle(_hb("a", True), 4.0)
    b.handle(_hb("b", True), 4.0)
    (plan,) = sent(b.tick(4.0), RoundPlan)
    assert plan.round == 1 and plan.base_round == 0
