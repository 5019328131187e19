"""Hostile-device admission: what the book lets a client cost it. No I/O, no clock (`now` is an argument).

docs/SECURITY.md and docs/COORDINATOR.md "Hostile devices" name the rules; each lives here once:
  rate limits        rate_limit   (token bucket per client and message kind; RATE_LIMITED notice)
  sync budget        reply_budget, charge_reply (reply bytes per minute; checkpoint_every_s)
  Join weight        join_n       (a re-Join cannot raise n_samples; weight_grants can, by the operator)
  FedAvg weight      weight       (min of Update n, Join n, weight_cap_factor x the OTHERS' median Join n)
  adaptive |g| cap   grad_cap     (k x the OTHERS' median |g| level, floor, fixed cap; clipped, not refused)
  benching           count_misses, prove, bench_nag (sampled and silent bench_after_misses rounds in a
                     row: not sampled until a Heartbeat AND a Join after the bench)

A refused message is `Dropped` (a metric, nothing stored) plus at most one ErrorMsg(RATE_LIMITED) per
client every RATE_NOTICE_S (`drop`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from coordinator.actions import Action, Dropped, Publish
from coordinator.config import CoordinatorConfig
from coordinator.influence import GradStats, LooMedian
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
        self.grads = GradStats(config.grad_cap_window)  # per client: its |g| level (since the start)
        self.join_ns = LooMedian()  # joined client on this model -> its granted Join n_samples
        for row in registry.clients.values():
            self._note_join_n(row.client)
        self.grants = config.grants()  # client -> the Join n_samples ceiling the operator granted

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
    def grad_cap(self, client: str) -> float:
        """The |g| bound of `client`'s next update (coordinator/influence.py): min(max_abs_grad,
        max(grad_cap_floor, grad_cap_k x the median |g| level of the OTHER clients)), once they sent
        grad_cap_min_updates updates; the fixed max_abs_grad before. Scalars above it are clipped to it."""
        c = self.config
        level, seen = self.grads.others(client)
        if c.grad_cap_k <= 0 or level is None or seen < c.grad_cap_min_updates:
            return c.max_abs_grad
        return min(c.max_abs_grad, max(c.grad_cap_floor, c.grad_cap_k * level))

    def join_n(self, client: str, claimed: int) -> int:
        """The n_samples a valid Join is granted: the claim, at most the first accepted Join's (a re-Join
        may lower it, never raise it), or at most the operator's weight_grants entry for the client."""
        grant = self.grants.get(client)
        if grant is not None:
            return min(claimed, grant)
        row = self.registry.get(client)
        return min(claimed, row.n_samples) if row is not None and row.n_samples > 0 else claimed

    def weight(self, client: str, n_update: int) -> int:
        """The FedAvg weight the coordinator grants: min(n_samples of the Update, n_samples of the Join,
        weight_cap_factor x the median Join n_samples of the OTHER joined clients), at least 1."""
        row = self.registry.get(client)
        w = n_update if row is None or row.state != "joined" else min(n_update, row.n_samples)
        med = self.join_ns.without(client) if self.config.weight_cap_factor > 0 else None
        if med is not None and med > 0:
            w = min(w, math.floor(self.config.weight_cap_factor * med))
        return max(1, w)

    def heard(self, client: str, grads: Sequence[float]) -> None:
        """An update was stored for aggregation (on time or late): its |g| feeds the others' caps, its client
        answered."""
        self.grads.push(client, grads)
        self.misses.pop(client, None)

    def joined(self, client: str) -> None:
        """A valid Join (its row already put): the Join n_samples of the fleet changes; a Join is one proof of life."""
        self._note_join_n(client)
        self.prove(client, "join")

    def _note_join_n(self, client: str) -> None:
        row = self.registry.get(client)
        if row is not None and row.state == "joined" and row.fingerprint == self.registry.fingerprint:
            self.join_ns.put(client, float(row.n_samples))
        else:
            self.join_ns.drop(client)

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
