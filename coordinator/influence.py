"""Influence bounds a client cannot move itself: every cap on client j comes from the OTHER clients' statistics.

A cap that includes the judged client's own values can be ratcheted: each accepted value raises the median
that bounds the next one (issue 26: |g| 7.6 -> 488 over 53 rounds; a re-Join raised the weight cap of a
two-device fleet to the attacker's own claim). Here each bound is a leave-one-out median:

  weight cap   floor(weight_cap_factor x the median Join n_samples of the other joined clients)
  |g| cap      grad_cap_k x the median over the other clients of each one's median |g| (the median over its
               last grad_cap_window updates of that update's median |g|), at least grad_cap_floor, at most
               max_abs_grad; the fixed max_abs_grad until the others sent grad_cap_min_updates updates

One client moves a leave-one-out median of the others by nothing, and colluders (fewer than half) by at
most their number of order statistics: the bound stays inside the honest clients' range.

    m = LooMedian()
    m.put("a", 10.0); m.put("b", 20.0); m.put("evil", 1e9)
    m.without("evil")   # 15.0 (the median of a and b)
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence


class LooMedian:
    """One value per client; the median of all but one client's value in O(log n) per change, O(1) per query."""

    def __init__(self) -> None:
        self.of: dict[str, float] = {}
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._sorted)

    def put(self, client: str, value: float) -> None:
        old = self.of.get(client)
        if old is not None:
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self.of[client] = float(value)
        bisect.insort(self._sorted, float(value))

    def drop(self, client: str) -> None:
        old = self.of.pop(client, None)
        if old is not None:
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def without(self, client: str) -> float | None:
        """The median of every value but `client`'s (the middle one, or the mean of the two middle ones);
        None when no other client has a value."""
        s = self._sorted
        own = self.of.get(client)
        skip = -1 if own is None else bisect.bisect_left(s, own)  # the index left out (any copy of an equal value)
        n = len(s) - (skip >= 0)
        if n == 0:
            return None

        def at(r: int) -> float:  # the r-th value of s with index `skip` removed
            return s[r if skip < 0 or r < skip else r + 1]

        mid = n // 2
        return at(mid) if n % 2 else (at(mid - 1) + at(mid)) / 2


class GradStats:
    """Per client: the median |g| of each of its last `window` updates, and the median of those (its level)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"GradStats: window must be >= 1, got {window}")
        self.window = window
        self.recent: dict[str, deque[float]] = {}
        self.levels = LooMedian()  # client -> its level
        self.counted = 0  # updates in all windows together

    def push(self, client: str, grads: Sequence[float]) -> None:
        if not grads:
            return
        mags = sorted(map(abs, grads))
        mid = len(mags) // 2
        m = mags[mid] if len(mags) % 2 else (mags[mid - 1] + mags[mid]) / 2
        q = self.recent.setdefault(client, deque(maxlen=self.window))
        self.counted += len(q) < self.window
        q.append(m)
        xs = sorted(q)
        k = len(xs) // 2
        self.levels.put(client, xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2)

    def others(self, client: str) -> tuple[float | None, int]:
        """(the median level of the other clients, how many updates they have in their windows)."""
        return self.levels.without(client), self.counted - len(self.recent.get(client, ()))


def clip_to(grads: Sequence[float], cap: float) -> tuple[tuple[float, ...], int]:
    """Every scalar clipped to [-cap, +cap], and how many were clipped."""
    if max(map(abs, grads), default=0.0) <= cap:  # the common case: nothing to clip (one C-level pass)
        return tuple(grads), 0
    out = tuple(min(max(g, -cap), cap) for g in grads)
    return out, sum(1 for g, o in zip(grads, out, strict=True) if g != o)


__all__ = ["GradStats", "LooMedian", "clip_to"]
