"""coordinator/admission.py on its own: rate limits, the reply budget, weights, the |g| cap, benching."""

from __future__ import annotations

from typing import Any

from coordinator.actions import Dropped, Publish
from coordinator.admission import RATE_NOTICE_S, Admission
from coordinator.config import CoordinatorConfig
from coordinator.records import ClientRow
from coordinator.registry import REJOIN_NAG_S, ClientRegistry
from shared.messages import CheckpointChunk, ErrorCode, ErrorMsg, Replay

FP, MASK = "ab" * 32, "0123456789abcdef"


def admission(*rows: tuple[str, int], **kw: Any) -> Admission:
    cfg = CoordinatorConfig(**{"fleet": "f", "metrics": False, **kw})
    reg = ClientRegistry(fingerprint=FP, mask_id=MASK, offline_after_s=30.0,
                         rows=[ClientRow(c, "joined", FP, MASK, n, True, 0.0) for c, n in rows])  # fmt: skip
    return Admission(cfg, reg)


def notices(acts: list[Any]) -> list[int]:
    return [a.message.code for a in acts if isinstance(a, Publish) and isinstance(a.message, ErrorMsg)]


def test_rate_limit_drops_over_the_burst_and_tells_once() -> None:
    a = admission(rate_per_s=1.0, rate_burst=3)
    out = [a.rate_limit("c", "hb", 0.0) for _ in range(6)]
    assert out[:3] == [[], [], []]
    assert all(isinstance(x[0], Dropped) and x[0].reason == "rate_limited" for x in out[3:])
    assert sum((notices(x) for x in out), []) == [ErrorCode.RATE_LIMITED]  # one notice, not three
    assert a.rate_limit("c", "up", 0.0) == []  # a bucket per kind
    assert a.rate_limit("c", "hb", 2.0) == []  # refilled
    late = [a.rate_limit("c", "hb", RATE_NOTICE_S) for _ in range(4)]
    assert sum((notices(x) for x in late), []) == [ErrorCode.RATE_LIMITED]  # a new notice after RATE_NOTICE_S


def test_reply_budget_and_checkpoint_cooldown() -> None:
    a = admission(("c", 1), reply_bytes_per_min=1000, checkpoint_every_s=60.0)
    chunk = [Publish(CheckpointChunk(0, 0, 1, "00" * 32, b"x" * 900), to="c")]
    assert a.reply_budget("c", 0.0) == [] and a.charge_reply("c", 0.0, chunk) == []
    (drop, *_) = a.charge_reply("c", 1.0, chunk)
    assert isinstance(drop, Dropped) and drop.reason == "checkpoint_cooldown"
    assert a.charge_reply("c", 1.0, [Publish(Replay(()), to="c")]) == []  # a replay has no cooldown
    (drop, *_) = a.reply_budget("c", 1.0)  # 900 + 128 + the replay's bytes > 1000 a minute
    assert isinstance(drop, Dropped) and drop.reason == "reply_budget"
    assert a.reply_budget("c", 61.0) == []


def test_weight_is_min_of_update_join_and_the_others_cap() -> None:
    a = admission(("a", 10), ("b", 10), ("evil", 2**32 - 1), weight_cap_factor=4.0)
    assert a.weight("a", 3) == 3 and a.weight("a", 50) == 10  # its Join said 10
    assert a.weight("evil", 2**32 - 1) == 40  # 4 x the median Join n of the OTHERS (10), not its own claim
    assert a.weight("stranger", 0) == 1  # at least 1
    a.registry.put(ClientRow("d", "joined", FP, MASK, 1000, True, 0.0))
    a.joined("d")  # the others' median changes with a Join
    assert a.weight("evil", 2**32 - 1) == 4 * 10  # others: 10, 10, 1000
    assert a.weight("d", 1000) == 4 * 10  # others: 10, 10, 2**32 - 1 (median 10)
    # a two-device fleet: the cap of each is the other's n, never its own (issue 26: was their mean)
    two = admission(("a", 110), ("evil", 2**32 - 1), weight_cap_factor=2.0)
    assert two.weight("evil", 2**32 - 1) == 220 and two.weight("a", 110) == 110


def test_rejoin_cannot_raise_n_samples_but_the_operator_can() -> None:
    a = admission(("a", 10), ("evil", 10))
    assert a.join_n("evil", 2**32 - 1) == 10  # the first accepted Join's n is the ceiling
    assert a.join_n("evil", 4) == 4  # lowering is fine (the device lost data)
    assert a.join_n("new", 500) == 500  # a first Join
    g = admission(("a", 10), weight_grants=("a=300",))
    assert g.join_n("a", 1000) == 300 and g.join_n("a", 200) == 200


def test_grad_cap_is_the_others_level_once_they_sent_enough() -> None:
    a = admission(grad_cap_k=10.0, grad_cap_min_updates=3, grad_cap_floor=0.5, grad_cap_window=4)
    fixed = a.grad_cap("evil")
    a.heard("h1", [900.0, 1.0])  # its median |g| 450.5
    a.heard("h1", [1.0, -1.0])
    assert a.grad_cap("evil") == fixed  # the others sent 2 < grad_cap_min_updates
    a.heard("h2", [1.0, -1.0])
    assert a.grad_cap("evil") == 10.0 * (225.75 + 1.0) / 2  # levels: h1 median(450.5, 1) = 225.75, h2 1
    for _ in range(100):  # a ratchet: its own accepted values never raise its own cap
        a.heard("evil", [1e5, 1e5])
    assert a.grad_cap("evil") == 10.0 * (225.75 + 1.0) / 2
    # two others (h1, evil): their mean; a fleet needs >= 3 others for one to be outvoted (centred clipping
    # bounds the aggregate then); never above max_abs_grad
    assert a.grad_cap("h2") == 10.0 * (225.75 + 1e5) / 2
    for _ in range(4):
        a.heard("h1", [0.0, 0.0])  # h1's window (4) now all zeros
    assert a.grad_cap("evil") == 10.0 * 0.5  # levels 0 and 1: median 0.5
    a.heard("h2", [0.0, 0.0])
    a.heard("h2", [0.0, 0.0])
    assert a.grad_cap("evil") == 0.5  # the floor


def test_benching_needs_a_heartbeat_and_a_join() -> None:
    a = admission(bench_after_misses=2)
    assert a.count_misses(["s", "t"], {"t"}) == []
    assert a.count_misses(["s", "t"], {"t"}) == ["s"] and "s" in a.benched
    assert a.count_misses(["s"], set()) == []  # benched once
    (ask,) = a.bench_nag("s", 0.0)
    assert ask.to == "s" and isinstance(ask.message, ErrorMsg) and ask.message.code == ErrorCode.UNKNOWN_CLIENT
    assert a.bench_nag("s", 1.0) == [] and len(a.bench_nag("s", REJOIN_NAG_S)) == 1
    a.prove("s", "hb")
    assert "s" in a.benched  # a heartbeat alone is not enough
    a.joined("s")
    assert "s" not in a.benched and "s" not in a.misses and a.bench_nag("s", 100.0) == []
    a.count_misses(["t"], set())
    a.heard("t", [1.0])
    assert "t" not in a.misses  # an answer resets the count
