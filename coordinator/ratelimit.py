"""Per-client token buckets and bounded LRU maps: the round book's defences against floods (no I/O, no clock).

Time is always the caller's `now` (seconds), so the book stays pure and tests step time by hand.

    lim = Limiter(rate=20.0, burst=100)
    lim.allow(("dev-1", "hb"), now)        # True while the bucket holds a token (then one is taken)

Every map here is bounded (`LruDict`): a flood of made-up client ids costs at most `max_keys` entries,
after which the least recently used key is forgotten (its bucket starts full again: per-id limits cannot
stop a many-id flood, the broker ACL does; they stop one device, or one id without an ACL, from
drowning the coordinator).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_KEYS = 4096  # per map: ~1 KiB each at most, a few MiB in all
# per Limiter: (client, kind) buckets, two kinds a device in a round (heartbeat, update). With 4,096 a fleet
# of 10,000 forgot every bucket before its key came again, so one device's limit never held; 65,536 keep a
# 30,000-device fleet's (~250 B a bucket: ~16 MiB at most under a many-id flood, per limiter)
LIMITER_KEYS = 65_536
_set = OrderedDict.__setitem__  # the plain insert under LruDict's own __setitem__ (LruDict.add_new)


class LruDict(OrderedDict[K, V], Generic[K, V]):
    """An OrderedDict that keeps at most `max_keys` entries; setting a key makes it the newest."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        super().__init__()
        self.max_keys = max_keys

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            self.move_to_end(key)
        super().__setitem__(key, value)
        while len(self) > self.max_keys:
            self.popitem(last=False)

    def add_new(self, key: K, value: V) -> None:
        """`self[key] = value` for a key known to be absent: the newest entry, the oldest forgotten when over."""
        _set(self, key, value)
        if len(self) > self.max_keys:
            self.popitem(last=False)


@dataclass(slots=True)
class Bucket:
    tokens: float
    at: float


class Limiter:
    """Token buckets keyed by anything hashable: `rate` tokens per second, at most `burst` stored."""

    def __init__(self, rate: float, burst: float, max_keys: int = LIMITER_KEYS) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"Limiter: rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst = rate, burst
        self.buckets: LruDict[object, Bucket] = LruDict(max_keys)

    def level(self, key: object, now: float) -> float:
        """Tokens the key holds now (refilled since its last use)."""
        b = self.buckets.get(key)
        if b is None:
            return self.burst
        return min(self.burst, b.tokens + max(0.0, now - b.at) * self.rate)

    def take(self, key: object, now: float, cost: float = 1.0) -> None:
        """Debit `cost` tokens unconditionally (the level may go negative: a debt refilled over time)."""
        self.buckets[key] = Bucket(self.level(key, now) - cost, now)

    def allow(self, key: object, now: float) -> bool:
        """Take one token when one is there (`level` then `take`, with one lookup: every message asks). A
        key without a bucket has a full one (burst >= 1: a token): inserted as the newest key without a
        second lookup: a device's first message, or one whose key was forgotten (more keys than max_keys)."""
        buckets = self.buckets
        b = buckets.get(key)
        if b is None:
            buckets.add_new(key, Bucket(self.burst - 1.0, now))
            return True
        level = min(self.burst, b.tokens + max(0.0, now - b.at) * self.rate)
        if level < 1.0:
            return False
        b.tokens, b.at = level - 1.0, now  # the same bucket, refilled and debited in place, becomes the newest key
        buckets.move_to_end(key)
        return True
