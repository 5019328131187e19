"""Hostile-device admission: what the book lets a client cost it. No I/O, no clock (`now` is an argument).

docs/SECURITY.md and docs/COORDINATOR.md "Hostile devices" name the rules; each lives here once:
  rate limits        rate_limit   (token bucket per client and message kind; RATE_LIMITED notice)
  sync budget        reply_budget, charge_reply (reply bytes per minute; checkpoint_every_s)
  FedAvg weight      weight       (min of Update n, Join n, weight_cap_factor x median Join n)
  adaptive |g| cap   grad_cap     (k x median |g| of the last accepted updates, floor, fixed cap)
  benching           count_misses, prove, bench_nag (sampled and silent bench_after_misses rounds in a
                     row: not sampled until a Heartbeat AND a Join after the bench)

A refused message is `Dropped` (a metric, nothing stored) plus at most one ErrorMsg(RATE_LIMITED) per
client every RATE_NOTICE_S (`drop`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from coordinator.actions import Action, Dropped, Publish
from coordinator.config import CoordinatorConfig
from coordinator.median import SlidingMedian
from coordinator.ratelimit import Limiter, LruDict
from coordinator.registry import REJOIN_NAG_S, ClientRegistry
from shared.codec import encode
from shared.messages import CheckpointChunk, ErrorCode, ErrorMsg

log = logging.getLogger(__name__)

RATE_NOTICE_S = 10.0  # a rate-limited client gets at most one ErrorMsg(RATE_LIMITED) per this long


class Admission:
    """Per-client budgets, weights and benching over a `ClientRegistry` (read only here)."""

    def __init__(self, config: CoordinatorConfig, registry: ClientRegistry) -> None:
        self.config, self.registry = config, registry
        self.rates = Limiter(config.rate_per_s, config.rate_burst)  # (client, kind) -> bucket
        self.reply_bytes = Limiter(config.reply_bytes_per_min / 60.0, config.reply_bytes_per_min)
        self.last_checkpoint: LruDict[str, float] = LruDict()  # client -> when it was last sent chunks
        self.noticed: LruDict[str, float] = LruDict()  # client -> when it was last told RATE_LIMITED
        self.misses: dict[str, int] = {}  # joined client -> rounds in a row it was sampled and silent
        self.benched: dict[str, set[str]] = {}  # client -> proofs of life since benched ("hb", "join")
        self.bench_nagged: LruDict[str, float] = LruDict()  # benched client -> when to ask it to Join again
        self.grad_hist = SlidingMedian(config.grad_cap_window)  # |g| of the last accepted updates
        self.grad_seen = 0  # updates accepted since the start (the adaptive cap needs grad_cap_min_updates)
        self._grad_cap: float | None = None  # cached; None = recompute
        self._median_n: float | None = None  # cached median Join n_samples of joined clients; None = recompute

    # -- refusing ------------------------------------------------------------------------------------
    def rate_limit(self, client: str, kind: str, now: float) -> list[Action]:
        """Empty when the message may go on; else it is dropped (over rate_per_s on its kind)."""
        if self.rates.allow((client, kind), now):
            return []
        return self.drop(client, kind, "rate_limited", f"over {self.config.rate_per_s:g}/s on {kind}", now)

    def reply_budget(self, client: str, now: float) -> list[Action]:
        """Empty when the client may be answered a SyncRequest; else dropped (reply bytes used up)."""
        if self.reply_bytes.level(client, now) < 0:
            return self.drop(client, "sync", "reply_budget", "reply bytes per minute used up", now)
        return []

    def charge_reply(self, client: str, now: float, reply: Sequence[Publish]) -> list[Action]:
        """Empty when `reply` may be sent (its bytes are charged); else dropped: checkpoint chunks go to a
        client at most every checkpoint_every_s."""
        if any(isinstance(a.message, CheckpointChunk) for a in reply):
            last = self.last_checkpoint.get(client)
            if last is not None and now - last < self.config.checkpoint_every_s:
                why = f"checkpoint sent {now - last:.1f} s ago (at most every {self.config.checkpoint_every_s:g} s)"
                return self.drop(client, "sync", "checkpoint_cooldown", why, now)
            self.last_checkpoint[client] = now
        cost = sum(len(a.message.data) + 128 if isinstance(a.message, CheckpointChunk) else len(encode(a.message))
                   for a in reply)  # fmt: skip
        self.reply_bytes.take(client, now, cost)
        return []

    def drop(self, client: str, kind: str, reason: str, detail: str, now: float) -> list[Action]:
        """Drop a message (counted, nothing stored); tell the client RATE_LIMITED at most every RATE_NOTICE_S."""
        acts: list[Action] = [Dropped(client, kind, reason)]
        last = self.noticed.get(client)
        if last is None or now - last >= RATE_NOTICE_S:
            self.noticed[client] = now
            log.warning("client %s limited on %s: %s", client, kind, detail)
            acts.append(Publish(ErrorMsg(int(ErrorCode.RATE_LIMITED), f"{reason}: {detail}"[:1000]), to=client))
        return acts

    # -- weighing --------------------------------------------------------------------------------------
    def grad_cap(self) -> float:
        """The |g| bound of the next update: min(max_abs_grad, max(grad_cap_floor, k x median |g|)) over
        the grads of the last grad_cap_window accepted updates, once grad_cap_min_updates were accepted."""
        c = self.config
        if c.grad_cap_k <= 0 or self.grad_seen < c.grad_cap_min_updates or not self.grad_hist:
            return c.max_abs_grad
        if self._grad_cap is None:
            med = self.grad_hist.median()
            self._grad_cap = min(c.max_abs_grad, max(c.grad_cap_floor, c.grad_cap_k * med))
        return self._grad_cap

    def weight(self, client: str, n_update: int) -> int:
        """The FedAvg weight the coordinator grants: min(n_samples of the Update, n_samples of the Join,
        weight_cap_factor x the median Join n_samples of the joined clients), at least 1."""
        row = self.registry.get(client)
        w = n_update if row is None or row.state != "joined" else min(n_update, row.n_samples)
        if self.config.weight_cap_factor > 0:
            if self._median_n is None:
                fp = self.registry.fingerprint
                ns = [c.n_samples for c in self.registry.clients.values() if c.state == "joined" and c.fingerprint == fp]
                self._median_n = float(np.median(ns)) if ns else 0.0
            if self._median_n > 0:
                w = min(w, math.floor(self.config.weight_cap_factor * self._median_n))
        return max(1, w)

    def heard(self, client: str, grads: Sequence[float]) -> None:
        """An update was stored for aggregation (on time or late): its |g| feeds the cap, its client answered."""
        self.grad_hist.push(tuple(map(abs, grads)))  # grads: floats (Update checked them), so abs = |float|
        self.grad_seen += 1
        self._grad_cap = None
        self.misses.pop(client, None)

    def joined(self, client: str) -> None:
        """A valid Join: the median Join n_samples changes, and a Join is one proof of life."""
        self._median_n = None
        self.prove(client, "join")

    # -- benching --------------------------------------------------------------------------------------
    def count_misses(self, sampled: Sequence[str], reported: set[str]) -> list[str]:
        """Sampled and silent: one more miss; bench_after_misses in a row benches the client (returned)."""
        k = self.config.bench_after_misses
        newly = []
        for client in sorted(sampled):
            if client in reported:
                self.misses.pop(client, None)
                continue
            self.misses[client] = self.misses.get(client, 0) + 1
            if k and self.misses[client] >= k and client not in self.benched:
                self.benched[client] = set()
                newly.append(client)
                log.warning("client %s sampled and silent %d rounds in a row: not sampled until it proves "
                            "liveness (heartbeat + Join)", client, k)  # fmt: skip
        return newly

    def prove(self, client: str, proof: str) -> None:
        """A benched client is sampled again once it sent a Heartbeat AND a Join after it was benched."""
        got = self.benched.get(client)
        if got is None:
            return
        got.add(proof)
        if got >= {"hb", "join"}:
            del self.benched[client]
            self.misses.pop(client, None)
            log.info("client %s proved liveness (heartbeat + Join): sampled again", client)

    def bench_nag(self, client: str, now: float) -> list[Publish]:
        """A Heartbeat from a benched client: ask it for a Join (its proof of being back), every REJOIN_NAG_S."""
        if client not in self.benched or now < self.bench_nagged.get(client, -math.inf):
            return []
        # benched: its Join proves it is back (PROTOCOL.md §8 client 3: UNKNOWN_CLIENT -> send Join)
        self.bench_nagged[client] = now + REJOIN_NAG_S
        return [Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "benched after missed rounds: send Join"), to=client)]
