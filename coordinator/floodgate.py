"""The flood gate: per-device rate limits in the MQTT callback, before a message is decoded or queued, and
updates served before heartbeats. The link's inbox (a `queue.Queue` whose put/get hooks are these).

Issue 26: a never-joined id's 216,710 heartbeats in 15 s delayed an honest Update by 18 s, because the round
book rate-limits only after the pump has queued, decoded and handed it every message. Here, in paho's thread:

  1. the topic's last two segments name (kind, client): a string split, no decode;
  2. a token bucket per (client, kind) at GATE_FACTOR x the book's rate_per_s / rate_burst drops a flood at
     the door (a QoS 1 message is acked: refused, nothing stored; the book's own limit, with its
     RATE_LIMITED notice, stays the policy a well-behaved device meets);
  3. two lanes: heartbeats (telemetry, QoS 0) wait behind everything else, so an Update never queues behind
     a heartbeat flood; the heartbeat lane holds at most MAX_SLOW messages (newest dropped beyond).
     With telemetry_link the heartbeats come on their own MQTT connection into the same gate: at the
     broker and in TCP too, updates never wait behind them (the coordinator reads ~10k messages/s in Python;
     a flood above that would otherwise queue in front of every update).

Retained messages pass (one per topic per subscribe; the intake drops them unread and clears them).

    gate = FloodGate(rate_per_s=20.0, burst=100)
    link = MqttLink(url, cid, inbox=gate, manual_ack=True); gate.ack = link.ack
    msg = gate.get(timeout=0.1)        # an Update before any waiting heartbeat
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from coordinator.ratelimit import Limiter
from shared.mqtt import Incoming

GATE_FACTOR = 2.0  # the gate's bucket is this x the book's: only floods meet it
MAX_SLOW = 50_000  # heartbeats queued at most (one id is limited by its bucket; this bounds many ids)
SLOW_KINDS = frozenset({"hb"})


def _kind_client(topic: str) -> tuple[str, str]:
    """(kind, client) from ".../{kind}/{client}" without validating (the intake parses it properly)."""
    head, _, client = topic.rpartition("/")
    return head.rpartition("/")[2], client


class FloodGate(queue.Queue[Incoming]):
    """A two-lane inbox with per-(client, kind) token buckets on `put` (see module docstring)."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_slow: int = MAX_SLOW) -> None:
        super().__init__()
        self.fast_put = threading.Condition(self.mutex)  # notified when the fast lane gets a message
        self.max_slow = max_slow  # heartbeats queued at most
        self.limits = Limiter(GATE_FACTOR * rate_per_s, GATE_FACTOR * burst)
        self.clock = clock
        self.ack: Callable[[Incoming], None] | None = None  # the link's ack, for QoS 1 messages refused here
        self.refused: dict[str, int] = {}  # kind -> messages refused at the gate (written under gate_lock)
        self.gate_lock = threading.Lock()

    def put(self, item: Incoming, block: bool = True, timeout: float | None = None) -> None:
        if self._passes(item) is not None:
            super().put(item, block, timeout)

    def put_many(self, items: list[Incoming]) -> None:
        """`put` each of `items` (one network turn's messages, in order) under one lock and one wake-up."""
        keep: list[Incoming] = []
        slow = 0  # heartbeats of this batch kept so far: the lane's bound counts them too
        for item in items:
            kind = self._passes(item, slow)
            if kind is not None:
                keep.append(item)
                slow += kind in SLOW_KINDS
        if keep:
            with self.not_empty:  # what Queue.put does per item (this queue is unbounded: never full)
                for item in keep:
                    self._put(item)
                self.unfinished_tasks += len(keep)
                self.not_empty.notify()

    def get_many(self, n: int, timeout: float, not_before: float = 0.0) -> list[Incoming]:
        """Up to `n` messages, fast lane first: wait up to `timeout` for one; then, while only heartbeats wait
        (fewer than `n`), until `not_before` (time.monotonic()) for more; then take what is there. Any other
        message ends that wait at once: it is QoS 1, and the broker sends a client only so many unacked
        (max_inflight_messages), so its ack must not wait for heartbeats to gather."""
        with self.not_empty:
            end = time.monotonic() + timeout
            while not self._qsize():
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self.not_empty.wait(left)
            while not self.fast and self._qsize() < n:
                left = not_before - time.monotonic()
                if left <= 0:
                    break
                self.fast_put.wait(left)
            out = [self._get() for _ in range(min(n, self._qsize()))]
            self.not_full.notify()
            return out

    def _passes(self, item: Incoming, queued: int = 0) -> str | None:
        """The bucket and the heartbeat lane's bound (steps 1-3; `queued`: heartbeats about to join the lane):
        the item's kind when it passes (a retained one always does), None when refused; a refused QoS 1
        message is acked here."""
        kind, client = _kind_client(item.topic)
        if item.retain:
            return kind
        with self.gate_lock:  # two links (telemetry_link) may put at once
            ok = self.limits.allow((client, kind), self.clock()) and not (
                kind in SLOW_KINDS and len(self.slow) + queued >= self.max_slow
            )
            if not ok:
                self.refused[kind] = self.refused.get(kind, 0) + 1
        if ok:
            return kind
        if item.qos and self.ack is not None:
            self.ack(item)
        return None

    def refused_total(self) -> int:
        return sum(self.refused.values())

    # queue.Queue's storage hooks (called under its lock): two lanes, the fast one first
    def _init(self, maxsize: int) -> None:
        self.fast: deque[Incoming] = deque()
        self.slow: deque[Incoming] = deque()

    def _qsize(self) -> int:
        return len(self.fast) + len(self.slow)

    def _put(self, item: Incoming) -> None:
        if _kind_client(item.topic)[0] in SLOW_KINDS:
            self.slow.append(item)
        else:
            self.fast.append(item)
            self.fast_put.notify()

    def _get(self) -> Incoming:
        return self.fast.popleft() if self.fast else self.slow.popleft()


__all__ = ["GATE_FACTOR", "MAX_SLOW", "FloodGate"]
