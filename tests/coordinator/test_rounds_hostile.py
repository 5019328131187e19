"""The round book's hostile-device rules (docs/SECURITY.md, docs/COORDINATOR.md "Hostile devices"), one test
per rule, with no broker: decoded messages in, actions out, a made-up clock."""

from __future__ import annotations

import math

import pytest
from test_rounds_core import FP, MASK, book, config, join, records, sent, update

import coordinator.aggregate as aggregate
from coordinator.actions import Dropped, Persist
from coordinator.ratelimit import LruDict
from coordinator.records import EventRecord, JoinRecord, RejectRecord, UpdateRecord
from coordinator.rounds import RoundBook
from shared.codec import encode
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
)


def _open(b: RoundBook, now: float = 0.0) -> RoundPlan:
    (plan,) = sent(b.tick(now), RoundPlan)
    return plan


def _expected(b: RoundBook, now: float) -> set[str]:
    """Open a round: the devices it expects (sampled among the eligible; a compact plan's wire `steps` lists
    only the exceptions)."""
    _open(b, now)
    assert b.plan is not None
    return set(b.plan.steps)


def test_weight_is_min_of_update_join_and_fleet_cap() -> None:
    b = book(config(min_clients=3, weight_cap_factor=4.0, aggregation="fedavg"))
    for k, n in (("a", 10), ("b", 10), ("evil", 10)):
        join(b, k, n)
    _open(b)
    b.handle(update("a", 0, [1.0, 1.0], 10), 1.0)
    b.handle(update("b", 0, [1.0, 1.0], 10), 1.0)
    acts = b.handle(update("evil", 0, [7.25, 7.25], 2**32 - 1), 1.0)
    assert [r.update.n_samples for r in records(acts, UpdateRecord)] == [10]  # its Join said 10
    (res,) = sent(b.tick(1.0), RoundResult)
    assert list(res.scalars) == [math.fsum([1 / 3, 1 / 3, 7.25 / 3])] * 2  # equal weights, not [7.25, 7.25]
    # a re-Join cannot raise n_samples: the first accepted Join's 10 stays (issue 26: it replaced it)
    acts = join(b, "evil", 2**32 - 1, now=2.0)
    assert [r.n_samples for r in records(acts, JoinRecord)] == [10]
    assert b.admission.weight("evil", 2**32 - 1) == 10 and b.admission.weight("a", 3) == 3


def test_operator_grant_raises_a_join_weight() -> None:
    b = book(config(min_clients=3, weight_grants=("evil=25",)))
    for k, n in (("a", 10), ("b", 10), ("evil", 10)):
        join(b, k, n)
    acts = join(b, "evil", 2**32 - 1, now=2.0)
    assert [r.n_samples for r in records(acts, JoinRecord)] == [25]  # the operator's grant, not the claim
    assert b.admission.weight("evil", 2**32 - 1) == 20  # still under 2 x the others' median Join n


def test_late_update_older_than_late_max_age_is_stale() -> None:
    b = book(config(min_clients=2, min_updates=1, quorum=1.0, late_max_age=1))
    join(b, "a", 1)
    join(b, "b", 1)
    for r in range(2):  # b silent in rounds 0 and 1
        _open(b, 10.0 * r)
        b.handle(update("a", r, [1.0, 1.0], 1, msg_id=r), 10.0 * r)
        assert sent(b.tick(10.0 * r + 10.0), RoundResult)
    old = b.handle(update("b", 0, [1.0, 1.0], 1), 21.0)  # round 0: 2 rounds closed since
    assert [e.code for e in sent(old, ErrorMsg, "b")] == [ErrorCode.STALE_ROUND] and not records(
        old, UpdateRecord
    )
    new = b.handle(update("b", 1, [1.0, 1.0], 1), 21.0)  # round 1 closed last: folded
    assert [r.update.status for r in records(new, UpdateRecord)] == ["late"]


def test_adaptive_grad_cap_clips_to_the_others_level_and_never_refuses() -> None:
    cfg = config(min_clients=2, quorum=1.0, grad_cap_k=10.0, grad_cap_min_updates=3, grad_cap_floor=0.5,
                 aggregation="fedavg")  # fmt: skip
    b = book(cfg)
    join(b, "a", 1)
    join(b, "evil", 1)
    assert b.admission.grad_cap("evil") == cfg.max_abs_grad  # no history yet: the fixed cap
    for r in range(3):
        _open(b, float(r))
        b.handle(update("a", r, [1.0, -1.0], 1, msg_id=r), float(r))
        b.handle(update("evil", r, [900.0, 1.0], 1, msg_id=r), float(r))
        sent(b.tick(float(r)), RoundResult)
    assert b.admission.grad_cap("evil") == 10.0  # a's level |g| = 1: evil's own 900s never count for it
    _open(b, 3.0)
    acts = b.handle(update("evil", 3, [50.0, -1e5], 1, msg_id=3), 3.0)
    assert not records(acts, RejectRecord) and not sent(acts, ErrorMsg, "evil")  # no refusal to bisect on
    (row,) = records(acts, UpdateRecord)
    assert row.update.grads == (10.0, -10.0)  # clipped to the cap, stored (and replayed) clipped
    assert [e.kind for e in records(acts, EventRecord)] == ["grad_clipped"]
    over = b.handle(update("a", 3, [2e6, 1.0], 1, msg_id=3), 3.0)  # the fixed max_abs_grad still refuses
    assert [r.reason for r in records(over, RejectRecord)] == ["grad_too_large"]


def test_rate_limit_drops_and_tells_once_per_window() -> None:
    b = book(config(rate_per_s=1.0, rate_burst=5))
    join(b, "a", 1)
    acts = []
    for _i in range(20):
        acts += b.handle(Heartbeat("a", 0.0, 1.0, 1), 1.0)
    assert len([a for a in acts if isinstance(a, Dropped) and a.reason == "rate_limited"]) == 15
    assert [e.code for e in sent(acts, ErrorMsg, "a")] == [ErrorCode.RATE_LIMITED]  # once, not 15 times
    assert not any(isinstance(a, Dropped) for a in b.handle(Heartbeat("a", 0.0, 1.0, 1), 3.0))  # refilled
    later = b.handle(Heartbeat("a", 0.0, 1.0, 1), 3.0) + b.handle(Heartbeat("a", 0.0, 1.0, 1), 3.0)
    assert sent(later, ErrorMsg, "a") == []  # within RATE_NOTICE_S of the last notice
    assert b.registry.clients["a"].state == "joined"


def test_sync_only_for_joined_and_checkpoints_rate_limited() -> None:
    b = book(config(min_clients=1, quorum=1.0, replay_max=1, chunk_bytes=256, checkpoint_every_s=30.0,
                    reply_bytes_per_min=4096))  # fmt: skip
    join(b, "a", 1)
    for r in range(3):
        _open(b, float(r))
        b.handle(update("a", r, [0.5, 0.5], 1, msg_id=r), float(r))
        sent(b.tick(float(r)), RoundResult)
    (e,) = sent(b.handle(SyncRequest("ghost", -1), 5.0), ErrorMsg, "ghost")
    assert e.code == ErrorCode.UNKNOWN_CLIENT and "ghost" not in b.registry.clients
    join(b, "s", 1, now=5.0)
    assert len(sent(b.handle(SyncRequest("s", -1), 5.0), CheckpointChunk, "s")) == 4  # 1 KiB of values
    again = b.handle(SyncRequest("s", -1), 6.0)
    assert sent(again, CheckpointChunk, "s") == [] and [x.code for x in sent(again, ErrorMsg, "s")] == [
        ErrorCode.RATE_LIMITED
    ]
    assert sent(b.handle(SyncRequest("s", 1), 6.0), Replay, "s")  # a small Replay still fits the budget
    assert len(sent(b.handle(SyncRequest("s", -1), 36.0), CheckpointChunk, "s")) == 4  # cooldown over
    # byte budget 4096 per minute: Replays until the allowance is spent, then dropped with one notice
    acts = []
    for _ in range(200):
        acts += b.handle(SyncRequest("s", 1), 37.0)
    assert any(isinstance(a, Dropped) and a.reason == "reply_budget" for a in acts)
    sent_bytes = sum(len(encode(r)) for r in sent(acts, Replay, "s"))
    assert sent_bytes <= 4096 + 1024, sent_bytes  # the allowance plus one reply


def test_silent_client_benched_until_heartbeat_and_join() -> None:
    b = book(config(min_clients=1, min_updates=1, quorum=1.0, bench_after_misses=2, round_deadline_s=5.0))
    join(b, "a", 1)
    join(b, "silent", 1)
    now = 0.0
    for r in range(2):
        assert _expected(b, now) == {"a", "silent"}
        b.handle(update("a", r, [1.0, 1.0], 1, msg_id=r), now)
        now += 5.0
        acts = b.tick(now)
        assert sent(acts, RoundResult)
    assert "silent" in b.admission.benched
    assert _expected(b, now) == {"a"}  # benched: not sampled
    nag = b.handle(Heartbeat("silent", 0.0, 1.0, 1), now)
    assert "silent" in b.admission.benched  # a heartbeat alone is not enough: it is asked to Join
    assert [e.code for e in sent(nag, ErrorMsg, "silent")] == [ErrorCode.UNKNOWN_CLIENT]
    join(b, "silent", 1, now=now)
    assert "silent" not in b.admission.benched
    b.handle(update("a", 2, [1.0, 1.0], 1, msg_id=2), now)
    sent(b.tick(now), RoundResult)
    assert _expected(b, now) == {"a", "silent"}


def test_round_closes_on_quorum_plus_grace_not_the_slowest() -> None:
    b = book(config(min_clients=4, quorum=0.75, quorum_grace_s=2.0, round_deadline_s=100.0))
    for k in "abcd":
        join(b, k, 1)
    _open(b)
    for k in "ab":
        b.handle(update(k, 0, [1.0, 1.0], 1), 1.0)
    assert sent(b.tick(50.0), RoundResult) == []  # 2/4 < quorum: waits
    b.handle(update("c", 0, [1.0, 1.0], 1), 51.0)
    assert sent(b.tick(51.0), RoundResult) == []  # quorum reached now: grace starts
    assert sent(b.tick(52.9), RoundResult) == []
    (res,) = sent(b.tick(53.0), RoundResult)
    assert res.n_clients == 3


def test_unknown_ids_cost_no_row_and_bounded_memory() -> None:
    b = book(config())
    acts = []
    for i in range(LruDict().max_keys + 500):
        cid = f"spoof-{i}"
        acts += b.handle(Heartbeat(cid, 0.0, 1.0, 1), 0.0) + b.handle(Status(cid, True, 0.0), 0.0)
    assert [a for a in acts if isinstance(a, Persist)] == [] and b.registry.clients == {}
    assert len(b.registry.unjoined) == LruDict().max_keys
    assert b.tick(200.0) == [] and len(b.registry.unjoined) == 0  # silent for offline_after_s: forgotten, not nagged


def test_spoofed_bad_join_does_not_flip_a_joined_client() -> None:
    b = book(config())
    join(b, "a", 10)
    acts = b.handle(Join("a", "ff" * 32, MASK, 10, 1.0, {}, -1), 1.0)
    assert b.registry.clients["a"].state == "joined" and records(acts, JoinRecord) == []
    assert [r.reason for r in records(acts, RejectRecord)] == ["join_ignored"] and sent(
        acts, ErrorMsg, "a"
    ) == []
    refused = b.handle(Join("x", "ff" * 32, MASK, 10, 1.0, {}, -1), 1.0)  # never joined: answered, no row
    assert [e.code for e in sent(refused, ErrorMsg, "x")] == [ErrorCode.FINGERPRINT_MISMATCH]
    assert records(refused, JoinRecord) == [] and "x" not in b.registry.clients
    assert b.handle(Join("x", FP, MASK, 1, 1.0, {"compact_plan": True}, -1), 2.0) and b.registry.clients["x"].state == "joined"


def test_late_folding_keeps_a_result_within_max_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate, "MAX_SEEDS", 5)  # plan T = 2: room for ONE late round of 2 pairs per result
    b = book(config(min_clients=2, min_updates=1, quorum=1.0, late_max_age=3, round_deadline_s=5.0,
                    bench_after_misses=0))  # fmt: skip
    join(b, "a", 1)
    join(b, "b", 1)
    for r in range(2):  # b silent in rounds 0 and 1
        _open(b, 5.0 * r)
        b.handle(update("a", r, [1.0, 1.0], 1, msg_id=r), 5.0 * r)
        sent(b.tick(5.0 * r + 5.0), RoundResult)
    _open(b, 10.0)
    b.handle(update("b", 0, [2.0, 2.0], 1, msg_id=10), 11.0)  # two late rounds pending
    b.handle(update("b", 1, [3.0, 3.0], 1, msg_id=11), 11.0)
    b.handle(update("a", 2, [1.0, 1.0], 1, msg_id=2), 11.0)
    b.handle(update("b", 2, [1.0, 1.0], 1, msg_id=12), 11.0)
    (res,) = sent(b.tick(11.0), RoundResult)
    assert len(res.seeds) == 4 and list(b.late) == [
        ("b", 1)
    ]  # round 1's late update waits for the next result
    _open(b, 11.0)
    for k in "ab":
        b.handle(update(k, 3, [1.0, 1.0], 1, msg_id=20), 12.0)
    (res,) = sent(b.tick(12.0), RoundResult)
    assert len(res.seeds) == 4 and b.late == {}


def test_small_round_falls_back_to_fedavg_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    b = book(config(min_clients=2, quorum=1.0))  # the default rule: centered
    join(b, "a", 10)
    join(b, "evil", 10)
    g = {"a": [0.5, -0.5], "evil": [1e5, 1e5]}  # under the fixed cap: no |g| history yet
    with caplog.at_level("INFO", logger="coordinator.rounds"):
        for r in range(2):
            _open(b, float(r))
            for k, gs in g.items():
                b.handle(update(k, r, gs, 10, msg_id=r), float(r))
            (res,) = sent(b.tick(float(r)), RoundResult)
            assert list(res.scalars) == aggregate.aggregate("fedavg", g, {"a": 10, "evil": 10}, 2)
    said = [m for m in caplog.messages if "plain FedAvg" in m]
    assert len(said) == 1 and "centred clipping needs 3" in said[0]  # once, not every round
