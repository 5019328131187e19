"""coordinator/ratelimit.py: the token buckets' decisions and the LRU's memory, against a plain reference."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from coordinator.ratelimit import Limiter, LruDict


class RefLimiter:
    """The rule, written plainly: a missing key holds `burst` tokens; a refill of `rate` per second up to
    `burst`; a passing message takes one token and makes its key the newest; past `max_keys` keys the
    least recently used one is forgotten (a new key too evicts the oldest)."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def allow(self, key: object, now: float) -> bool:
        tokens, at = self.buckets.get(key, (self.burst, now))
        level = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if level < 1.0:
            return False
        self.buckets[key] = (level - 1.0, now)
        self.buckets.move_to_end(key)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return True


@pytest.mark.parametrize("burst", [1.0, 3.0, 100.0])
def test_allow_matches_the_reference_through_evictions(burst: float) -> None:
    """Random streams over more keys than max_keys (the fleet's case: every key forgotten before it comes
    again) and floods of one key: the same decisions, bucket contents and key order as the reference."""
    rng = random.Random(7)
    for _ in range(20):
        lim, ref = Limiter(5.0, burst, max_keys=16), RefLimiter(5.0, burst, 16)
        now = 0.0
        for _ in range(2000):
            now += rng.choice((0.0, 0.0, 0.01, 0.1, 1.0))
            key = ("flood", "hb") if rng.random() < 0.3 else (f"dev-{rng.randrange(40)}", rng.choice(("hb", "up")))
            assert lim.allow(key, now) == ref.allow(key, now), (key, now)
            assert [(k, b.tokens, b.at) for k, b in lim.buckets.items()] == [(k, *v) for k, v in ref.buckets.items()]


def test_a_flood_is_refused_then_refilled() -> None:
    lim = Limiter(rate=2.0, burst=3, max_keys=4)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("a", 0.5) and not lim.allow("a", 0.5)  # 0.5 s at 2/s: one token back


def test_add_new_keeps_max_keys_newest_last() -> None:
    d: LruDict[str, int] = LruDict(max_keys=3)
    for i, k in enumerate("abcd"):
        d.add_new(k, i)
    assert list(d.items()) == [("b", 1), ("c", 2), ("d", 3)]
    d["b"] = 9  # a set key becomes the newest
    assert list(d) == ["c", "d", "b"]


def test_one_device_stays_limited_among_a_10000_device_fleet() -> None:
    """20,000 (client, kind) keys come between two messages of one device: its bucket must survive them, or
    its limit never holds (with 4,096 keys it was forgotten and refilled every time)."""
    lim = Limiter(rate=1.0, burst=2)
    fleet = [(f"dev-{k}", kind) for k in range(10_000) for kind in ("hb", "up")]
    refused = 0
    for t in range(6):  # the device sends 3 a tick at 1 token/s: after its burst, 2 of 3 are refused
        for key in fleet:
            lim.allow(key, float(t))
        refused += sum(not lim.allow(("greedy", "up"), float(t)) for _ in range(3))
    assert refused >= 2 * 6 - 2 and len(lim.buckets) == len(fleet) + 1
