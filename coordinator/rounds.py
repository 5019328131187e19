"""The round book: every rule of the coordinator's round lifecycle, with no I/O.

Events go in (`handle(msg, now)` for a decoded client message, `on_reject` for what the pump could not
decode, `tick(now)` for the clock); actions come out (coordinator/actions.py: Publish, Persist, WriteCheckpoint,
Duplicate, Dropped). Time is always an argument: the book never reads a clock, a socket or a file. The event
log is for recovery and audit: `Recovered` is what a restarted pump hands the constructor (recovery.py reads it).

    book = RoundBook.from_config(config, mask, fingerprint=fp, values=v0)   # as the services build it
    acts = book.handle(Join(client="c1", ...), now=0.0) + book.tick(now=0.0)

The book owns the lifecycle (open / extend / close / late-fold / dedupe / sync) and the order of the
actions; four parts it holds decide the rest: `registry` (coordinator/registry.py: joined / online /
last seen, the join nag), `admission` (coordinator/admission.py: rate limits, reply budget, FedAvg
weight, |g| cap, benching), `vp` (coordinator/vp.py: MEERKAT-VP limits) and `availability`
(coordinator/availability.py: devices their policy paused are not sampled, not missed).

Rules, each in one place (docs/ARCHITECTURE.md "Round lifecycle" names them):
  join / nag / offline        on_join, on_status, on_heartbeat; registry.note_live, nag, offline
  open + sampling             _maybe_open  (coordinator/sampling.py open_plan; eligible: not benched,
                              not paused by the device policy); compact plans: RoundBook.extra
  deadline, extension, quorum tick -> scheduler.close_decision_n -> close_round / _extend; every sampled
                              device paused, nothing reported: tick -> close_round at once, empty
  validation                  on_update -> ingest.check_update (fixed max_abs_grad); |g| clipped to admission.grad_cap
  dedupe, conflict            on_update (same msg_id: Duplicate; another: reject `conflict`, first wins)
  stragglers, late folding    on_update (late | dropped, late_max_age), close_round -> aggregate.late_to_fold
  MEERKAT-VP limits           on_update -> vp.observe; close_round -> vp.at_close; plans: vp.steps_for
  step size (lr = "auto")     close_round -> lr.closed (lrctl.py: the result's lr, or undo the last); plans: lr.lr
  replay vs checkpoint        on_sync -> sync_reply (coordinator/sync.py), admission.reply_budget
  re-publish after reconnect  reconnected  (devices re-send their kept Updates on seeing the plan)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import fields, replace

import torch

from coordinator.actions import (
    Action,
    Duplicate,
    Persist,
    Publish,
    Recovered,
    WriteCheckpoint,
    plan_message,
    result_message,  # fmt: skip
)
from coordinator.admission import Admission
from coordinator.aggregate import close_scalars
from coordinator.availability import Availability
from coordinator.centered import FALLBACK_NOTE
from coordinator.config import CoordinatorConfig
from coordinator.dedupe import DedupeKeys
from coordinator.drift import DriftMonitor
from coordinator.ingest import Reject, check_join, check_update
from coordinator.lrctl import FleetLr, undo_pairs
from coordinator.privacy import with_privacy
from coordinator.records import (
    ClientRow,
    EventRecord,
    HeartbeatRecord,
    JoinRecord,
    OnlineRecord,
    PlanRecord,
    PlanRow,
    RejectRecord,  # fmt: skip
    ReplanRecord,
    ResultRecord,
    ResultRow,
    SeenRecord,
    UpdateRecord,
    UpdateRow,
)
from coordinator.registry import ClientRegistry
from coordinator.sampling import extend_plan, open_plan, wire_steps
from coordinator.scheduler import close_decision_n, quorum_met_n
from coordinator.sync import resend_grace, sync_messages
from coordinator.vp import DriftPolicy, monitor_for
from shared.apply import apply_round, values_checksum
from shared.fingerprint import fp_tag as make_fp_tag
from shared.maskfile import Mask
from shared.messages import (
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    Join,
    Message,
    RoundPlan,
    Status,
    SyncRequest,
    Update,
)

log = logging.getLogger(__name__)

OFFLINE_CHECK_S = 1.0  # how often tick() looks for silent clients and unjoined live ones
LATE_WINDOW = 64  # plans of this many closed rounds are kept (late_max_age <= this); dedupe keys: coordinator/dedupe.py
RESEND_GRACE_S = 30.0  # after a reconnect, a round due sooner gets this long (at most round_deadline_s) for re-sends
KIND_OF: dict[type, str] = {Update: "up", Join: "join", Heartbeat: "hb", Status: "status", SyncRequest: "sync"}
TELEMETRY = tuple(f.name for f in fields(Heartbeat) if f.name != "client")  # a HeartbeatRecord's keys, in order


class RoundBook:
    """The coordinator's round state machine. Not thread-safe: one owner feeds it events in order."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        fingerprint: str,
        mask_id: str,
        values: torch.Tensor,
        drift: DriftMonitor | None = None,
        stop_after_round: int | None = None,
        recovered: Recovered | None = None,
    ) -> None:
        """`values`: v_0 (float32 (nnz,)); `recovered` replaces them (and everything else) after a restart.
        `drift`: the MEERKAT-VP monitor (None: no mask gradient, nothing measured). `stop_after_round`:
        open no round after it (the pump stops once it closed)."""
        if values.dtype != torch.float32 or values.dim() != 1:
            raise ValueError(f"values must be a 1-D float32 tensor, got {values.dtype} {tuple(values.shape)}")
        self.config = config
        self.fingerprint, self.mask_id, self.fp_tag = fingerprint, mask_id, make_fp_tag(fingerprint)
        self.drift = drift
        self.stop_after_round = stop_after_round
        rec = recovered or Recovered(values=values, last_round=-1)
        self.values, self.last_round = rec.values, rec.last_round
        self.plan: PlanRow | None = rec.open_plan
        self.plans: dict[int, PlanRow] = {p.round: p for p in rec.plans}
        if self.plan is not None:
            self.plans[self.plan.round] = self.plan
        self.accepted: dict[str, UpdateRow] = {}  # the open round's on-time updates
        # accepted from devices a compact plan's rule covers but the round did not expect (coordinator/sampling.py)
        self.extra: set[str] = set()
        self.late: dict[tuple[str, int], UpdateRow] = {}  # stored late, not yet folded
        for u in rec.pending:
            if self.plan is not None and u.round == self.plan.round and u.status == "accepted":
                self.accepted[u.client] = u
                if u.client not in self.plan.steps:
                    self.extra.add(u.client)
            elif u.status == "late":
                self.late[(u.client, u.round)] = u
        self.dedupe = DedupeKeys(rec.stored, DedupeKeys.window_for(config.straggler, config.late_max_age, LATE_WINDOW))
        self.dedupe.closed(self.last_round, (r for _, r in self.late))
        self.results: deque[ResultRow] = deque(rec.results, maxlen=max(1, config.replay_max))
        self.registry = ClientRegistry(fingerprint=fingerprint, mask_id=mask_id,
                                       offline_after_s=config.offline_after_s, rows=rec.clients)  # fmt: skip
        self.admission = Admission(config, self.registry)
        # devices whose newest Heartbeat says their privacy budget is spent (in memory: heartbeats refill it)
        self.dp_exhausted: set[str] = set()
        self.vp = DriftPolicy(drift, config.drift_control)
        self.vp.restore(rec)
        self.availability = Availability()  # device policies: paused devices are not sampled, not missed
        self.lr = FleetLr(config.lr, config.lr_start, int(values.numel()), rec.lr_state)  # coordinator/lrctl.py
        if self.plan is not None:
            self.availability.round_opened(self.plan.steps)
        self.quorum_since: float | None = None  # when the open round first met its quorum
        self._last_offline_check = -math.inf
        self._small_round = False  # the last close had too few updates for centred clipping (logged on change)

    @classmethod
    def from_config(
        cls,
        config: CoordinatorConfig,
        mask: Mask,
        *,
        fingerprint: str,
        values: torch.Tensor,
        stop_after_round: int | None = None,
        recovered: Recovered | None = None,
    ) -> RoundBook:
        """The book as the services build it (coordinator/server.py, bench/inproc.py): the MEERKAT-VP monitor
        from the mask's pre-training gradient (coordinator/vp.py monitor_for), the rest from `config`."""
        return cls(config, fingerprint=fingerprint, mask_id=mask.mask_id, values=values, drift=monitor_for(config, mask),
                   stop_after_round=stop_after_round, recovered=recovered)  # fmt: skip

    # -- queries ---------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.stop_after_round is not None and self.last_round >= self.stop_after_round

    @property
    def open_round(self) -> int | None:
        return None if self.plan is None else self.plan.round

    def eligible(self) -> list[str]:
        """The online clients a plan may sample: benched ones (silent bench_after_misses rounds) and those
        whose device policy paused them (coordinator/availability.py) and those whose privacy budget is spent
        (their Heartbeat says dp_exhausted; docs/PRIVACY.md) excluded."""
        av = self.availability
        return [c for c in self.registry.online()
                if c not in self.admission.benched and av.paused(c) is None and c not in self.dp_exhausted]

    def plan_message(self, p: PlanRow) -> RoundPlan:
        return with_privacy(plan_message(p, self.config.fleet, self.fingerprint, self.mask_id), self.config)

    def _next_round(self) -> int:
        """The first round whose plan is not published yet (where a MEERKAT-VP decision takes effect)."""
        return self.last_round + (2 if self.plan is not None else 1)

    # -- events ----------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """What a (re)started coordinator does first: records of re-flags during recovery, then the
        latest result and the open plan re-published (both retained)."""
        acts: list[Action] = [Persist(r) for r in self.vp.start(now, self._next_round())]
        if self.results:
            acts.append(Publish(result_message(self.results[-1])))
        if self.plan is not None:
            acts.append(Publish(self.plan_message(self.plan)))
        return acts

    def reconnected(self, now: float) -> list[Action]:
        """The pump's link (re)connected and (re)subscribed: re-publish the latest result and the open plan
        (retained), its deadline moved for re-sent Updates when due sooner than min(RESEND_GRACE_S,
        round_deadline_s) (coordinator/sync.py `resend_grace`)."""
        acts: list[Action] = [Publish(result_message(self.results[-1]))] if self.results else []
        if self.plan is None:
            return acts
        grace_s = min(RESEND_GRACE_S, self.config.round_deadline_s)
        self.plan, records = resend_grace(self.plan, self.accepted, now, grace_s)
        self.plans[self.plan.round] = self.plan
        return [*acts, *(Persist(r) for r in records), Publish(self.plan_message(self.plan))]

    def handle(self, msg: Message, now: float) -> list[Action]:
        """Dispatch one decoded client message (its `client` field filled from the topic), rate-limited."""
        kind = KIND_OF.get(type(msg))
        if kind is None:
            raise TypeError(f"RoundBook.handle: {type(msg).__name__} is not a client -> coordinator message")
        client: str = msg.client  # type: ignore[union-attr]
        dropped = self.admission.rate_limit(client, kind, now)
        if dropped:
            return dropped
        if isinstance(msg, Update):
            return self.on_update(msg, now)
        if isinstance(msg, Join):
            return self.on_join(msg, now)
        if isinstance(msg, Heartbeat):
            return self.on_heartbeat(msg, now)
        if isinstance(msg, Status):
            return self.on_status(msg, now)
        assert isinstance(msg, SyncRequest)  # KIND_OF (checked above) names no other type
        return self.on_sync(msg, now)

    def on_join(self, j: Join, now: float) -> list[Action]:
        """A valid Join registers the client (a row). A refused one from an id that is joined changes
        nothing (without the broker ACL anyone can send it: the first valid Join wins, no reply); from any
        other id it is answered and remembered in a bounded LRU only (no row for ids that never joined)."""
        quant = self.config.quant if self.config.quant_policy == "same" else None
        rej = check_join(j, self.fingerprint, self.mask_id, quant, self.config.plan_form == "compact")
        have = self.registry.get(j.client)
        if rej is not None:
            if have is not None and have.state == "joined":
                spoof = Reject("join_ignored", rej.code, f"{rej.detail}; {j.client} stays joined")
                return self.on_reject(j.client, "join", spoof, now, reply=False)
            self.registry.refuse(j.client, now)
            return self.on_reject(j.client, "join", rej, now)
        n = self.admission.join_n(j.client, j.n_samples)  # a re-Join cannot raise the weight
        self.registry.joining(j.client)
        self.registry.put(ClientRow(j.client, "joined", j.fingerprint, j.mask_id, n, True, now))
        self.admission.joined(j.client)
        acts: list[Action] = [Persist(JoinRecord(
            j.client, "joined", "", j.fingerprint, j.mask_id, n, j.budget_gib, dict(j.capabilities), j.last_round, now,
        ))]  # fmt: skip
        if n != j.n_samples:
            log.warning("client %s joined claiming n_samples %d: kept at %d (its first Join's; the operator raises "
                        "it with weight_grants)", j.client, j.n_samples, n)  # fmt: skip
        log.info("client %s joined (n_samples %d, at round %d)", j.client, n, j.last_round)
        return acts

    def on_status(self, s: Status, now: float) -> list[Action]:
        if s.online:
            self.registry.note_live(s.client, now)
        else:
            self.registry.unjoined.pop(s.client, None)
        if not self.registry.seen(s.client, now, online=s.online):
            return []  # an id that never joined: no row (a spoofed id must not cost a row)
        return [Persist(OnlineRecord(s.client, s.online, now))]

    def on_heartbeat(self, h: Heartbeat, now: float) -> list[Action]:
        self.registry.note_live(h.client, now)
        if not self.registry.seen(h.client, now, online=True):
            return []
        self.admission.prove(h.client, "hb")
        self.availability.note(h.client, h.available, h.pause_reason, h.trained_share)
        tele = {k: getattr(h, k) for k in TELEMETRY}  # asdict(h) less client: scalars only, no deep copy
        if h.dp_exhausted is not None:
            (self.dp_exhausted.add if h.dp_exhausted else self.dp_exhausted.discard)(h.client)
        return [Persist(HeartbeatRecord(h.client, tele, now)), *self.admission.bench_nag(h.client, now)]

    def on_sync(self, s: SyncRequest, now: float) -> list[Action]:
        """Replay / checkpoint only to joined clients (others: UNKNOWN_CLIENT), within the client's reply
        byte allowance, and checkpoint chunks at most every checkpoint_every_s (else RATE_LIMITED)."""
        self.registry.note_live(s.client, now)
        if not self.registry.joined(s.client):
            rej = Reject("unknown_client", ErrorCode.UNKNOWN_CLIENT, "sync before Join: send Join")
            return self.on_reject(s.client, "sync", rej, now)
        self.registry.seen(s.client, now)
        dropped = self.admission.reply_budget(s.client, now)
        if dropped:
            return dropped
        reply = self.sync_reply(s.client, s.have_round)
        dropped = self.admission.charge_reply(s.client, now, reply)
        if dropped:
            return dropped
        return [Persist(SeenRecord(s.client, now)), *reply]

    def on_update(self, u: Update, now: float) -> list[Action]:
        """Validate, dedupe, store as accepted (open round) / late / dropped, feed MEERKAT-VP."""
        self.registry.note_live(u.client, now)
        is_open = self.plan is not None and u.round == self.plan.round
        plan = self.plan if is_open else (self.plans.get(u.round) if u.round <= self.last_round else None)
        if plan is None and u.round <= self.last_round:  # closed so long ago that its plan is forgotten
            rej: Reject | None = Reject("too_late", ErrorCode.STALE_ROUND, f"round {u.round} closed long ago")
        else:
            rej = check_update(u, plan, self.fp_tag, self.config.max_abs_grad, self.registry.joined)
        if rej is not None:
            return self.on_reject(u.client, "up", rej, now)
        assert plan is not None  # check_update rejects an unplanned round
        have = self.dedupe.get(u.client, u.round)
        if have is not None:
            if have == u.msg_id:
                log.debug("duplicate update %s round %d msg %d ignored", u.client, u.round, u.msg_id)
                return [Duplicate(u.client, u.round, u.msg_id)]
            detail = f"round {u.round} already has msg {have}; first wins"
            return self.on_reject(u.client, "up", Reject("conflict", ErrorCode.CONFLICT, detail), now)
        c = self.config
        age = self.last_round - u.round  # closed rounds: 0 = the one that closed last
        if not is_open and c.straggler == "next" and age >= c.late_max_age:
            detail = f"round {u.round} closed {age + 1} rounds ago (late_max_age {c.late_max_age})"
            return self.on_reject(u.client, "up", Reject("too_late", ErrorCode.STALE_ROUND, detail), now)
        status = "accepted" if is_open else ("late" if c.straggler == "next" else "dropped")
        weight, grads, clipped = self.admission.weigh_update(u, now)  # |g| clipped to the others' cap
        row = UpdateRow(u.client, u.round, u.msg_id, grads, weight, u.loss, now, status, None)
        gradip = self.vp.gradip(plan, grads)
        self.dedupe.add(u.client, u.round, u.msg_id)
        self.registry.seen(u.client, now)
        acts: list[Action] = [Persist(UpdateRecord(row, None if gradip is None else tuple(gradip))), *clipped]
        if status != "dropped":
            self.admission.heard(u.client, grads)
        if status == "accepted":
            self.accepted[u.client] = row
            if u.client not in plan.steps:  # a compact plan's rule covers it; the round did not wait for it
                self.extra.add(u.client)
        elif status == "late":
            self.late[(u.client, u.round)] = row
            acts.append(Persist(EventRecord("late", f"{u.client} round {u.round}: folded into the next result",
                                            u.round, now)))  # fmt: skip
        else:
            rej = Reject("late_dropped", ErrorCode.STALE_ROUND, f"round {u.round} already closed (straggler = drop)")
            acts += self.on_reject(u.client, "up", rej, now)
        if gradip is not None:
            acts += [Persist(r) for r in self.vp.observe(u.client, u.round, gradip, now, self._next_round())]
        return acts

    def on_reject(self, client: str, topic: str, rej: Reject, now: float, reply: bool = True) -> list[Action]:
        """Count a rejected message (by reason) and, when `reply`, tell the client why (ErrorMsg)."""
        log.warning("rejected %s from %s: %s (%s)", topic, client, rej.reason, rej.detail)
        acts: list[Action] = [Persist(RejectRecord(rej.reason, client, topic, rej.detail, now))]
        if reply and client != "?":
            acts.append(Publish(ErrorMsg(int(rej.code), f"{rej.reason}: {rej.detail}"[:1000]), to=client))
        return acts

    # -- the clock -------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Offline marking and the join nag (every OFFLINE_CHECK_S), then open, extend or close the round."""
        acts: list[Action] = []
        if now - self._last_offline_check >= OFFLINE_CHECK_S:
            self._last_offline_check = now
            acts += [*self.registry.offline(now), *self.registry.nag(now)]
        if self.plan is None:
            return acts if self.done() else acts + self._maybe_open(now)
        plan, c = self.plan, self.config
        if not self.accepted and self.availability.all_paused():  # nobody left to wait for (O(1): counted)
            return acts + self.close_round(now, f"all {len(plan.steps)} sampled devices paused by their policy")
        # counts, not sets: accepted is a subset of plan.steps + extra (check_update rejects clients not
        # sampled, and a re-plan only adds clients), so this tick costs O(1) however large the round
        n, got = len(plan.steps) + len(self.extra), len(self.accepted)
        if not quorum_met_n(n, got, c.quorum, c.min_updates):
            self.quorum_since = None
        elif self.quorum_since is None:
            self.quorum_since = now
        d = close_decision_n(n, got, now, plan.deadline, c.min_updates, plan.extensions, c.max_extensions,
                             c.quorum, c.quorum_grace_s, self.quorum_since)  # fmt: skip
        if d.action == "close":
            acts += self.close_round(now, d.reason)
        elif d.action == "extend":
            acts += self._extend(plan, now, d.reason)
        return acts

    # -- rounds ----------------------------------------------------------------------------------
    def _maybe_open(self, now: float) -> list[Action]:
        c = self.config
        if self.registry.n_online() < c.min_clients:  # O(1) test first: this runs on every tick while the fleet joins
            return []
        eligible = self.eligible()
        if len(eligible) < c.min_clients:
            return []
        r = self.last_round + 1
        plan = open_plan(c, r, eligible, now, values_checksum(self.values), self.vp.steps_for, self.lr.lr)
        sampled = list(plan.steps)
        self.plan, self.plans[r], self.accepted, self.extra, self.quorum_since = plan, plan, {}, set(), None
        self.availability.round_opened(sampled)
        log.info("round %d open: %d clients x %d steps (%d limited to 1 by MEERKAT-VP), deadline in %.0f s",
                 r, len(sampled), c.steps, sum(1 for t in plan.steps.values() if t < c.steps),
                 c.round_deadline_s)  # fmt: skip
        return [
            Persist(PlanRecord(plan)),
            Persist(EventRecord("open", f"{len(sampled)} of {len(eligible)} online clients sampled", r, now)),
            Publish(self.plan_message(plan)),
        ]

    def _extend(self, plan: PlanRow, now: float, why: str) -> list[Action]:
        """Too few updates at the deadline: more clients into the same round (same seeds), new deadline."""
        eligible = [k for k in self.eligible() if k not in self.extra]
        new, extra = extend_plan(self.config, plan, eligible, len(self.accepted), now, self.vp.steps_for)
        self.availability.round_extended(extra)
        self.plan = self.plans[plan.round] = new
        log.warning("round %d: %s; deadline extended (%d), added %d clients", plan.round, why, new.extensions,
                    len(extra))  # fmt: skip
        return [
            Persist(ReplanRecord(plan.round, new.steps, new.deadline, new.extensions, new.sample_max)),
            Persist(EventRecord("extend", f"{why}; added {extra}", plan.round, now)),
            Publish(self.plan_message(new)),
        ]

    def close_round(self, now: float, why: str = "") -> list[Action]:
        """Aggregate the open round's updates (+ pending late ones under policy "next"), apply, publish."""
        plan, c = self.plan, self.config
        if plan is None:
            raise RuntimeError("close_round: no round is open")
        if not self.accepted and not self.availability.all_paused():
            raise RuntimeError(f"close_round: round {plan.round} has no update")
        reported = [self.accepted[k] for k in sorted(self.accepted)]
        acts: list[Action] = []
        drift_records, ups = self.vp.at_close(plan.round, reported, now, self._next_round())
        acts += [Persist(r) for r in drift_records]
        prev = self.results[-1] if self.results and self.results[-1].dist == plan.dist else None  # undo's candidate
        lr, lr_records, undo = self.lr.closed(plan.round, plan.lr, ups, now, prev)  # lr = "auto": coordinator/lrctl.py
        late: list[UpdateRow] = []  # undo: the previous result's pairs negated; all paused: empty, values unchanged
        (seeds, scalars) = undo_pairs(undo, plan.seeds, lr) if undo is not None else ([], [])
        if ups and undo is None:
            k = close_scalars(c.aggregation, plan.seeds, ups, self.late.values() if c.straggler == "next" else None,
                              {r: p.seeds for r, p in self.plans.items()}, clip_norm=c.clip_norm,
                              trim_fraction=c.trim_fraction, center_clip_k=c.center_clip_k,
                              center_discount=c.center_discount)  # fmt: skip
            if k.small != self._small_round:  # logged when it starts and when it ends, not every round
                self._small_round = k.small
                log.info("round %d: %d on-time updates: %s", plan.round, len(ups), FALLBACK_NOTE[k.small])
            late, seeds, scalars = k.late, k.seeds, k.scalars
        new_values = apply_round(self.values, seeds, scalars, lr, plan.dist) if seeds else self.values
        checksum, n_clients = values_checksum(new_values), len({u.client for u in ups if not undo} | {u.client for u in late})
        row = ResultRow(plan.round, tuple(seeds), tuple(scalars), lr, plan.dist, n_clients, checksum, now,
                        now - plan.opened_at)  # fmt: skip
        used = tuple((u.client, u.round, "accepted") for u in ups) + tuple((u.client, u.round, "folded") for u in late)
        self.values, self.last_round, self.plan, self.accepted, self.extra = new_values, plan.round, None, {}, set()
        for u in late:
            del self.late[(u.client, u.round)]
        # closed: a compact plan keeps only its exceptions (the rule covers every other device it expected, so
        # late updates meet the same T); 64 rounds of full client dicts were 640 MB at 100,000 devices
        self.plans[plan.round] = replace(plan, state="closed", steps=wire_steps(plan))
        excused = self.availability.round_closed()  # paused by their policy: no miss, never benched
        benched = self.admission.count_misses(list(plan.steps), {u.client for u in reported} | excused)
        self.results.append(row)
        self._forget_before(plan.round + 1 - LATE_WINDOW)
        self.dedupe.closed(plan.round, (r for _, r in self.late))
        loss = math.fsum(u.loss for u in ups) / len(ups) if ups else math.nan  # nan: closed empty (all paused)
        log.info("round %d closed (%s): %d updates, %d late, mean loss %.4f, checksum %s", plan.round, why, len(ups),
                 len(late), loss, checksum[:12])  # fmt: skip
        acts += [
            Persist(ResultRecord(row, used, all_accepted=len(ups) == len(reported))),
            Persist(EventRecord("close", f"{why}; {len(ups)} updates + {len(late)} late", plan.round, now)),
            *(Persist(r) for r in lr_records),
            *(Persist(EventRecord("bench", f"{k}: sampled and silent {self.config.bench_after_misses} rounds in a "
                                  "row; sampled again after a Heartbeat and a Join", plan.round, now))
              for k in benched),
            Publish(result_message(row)),
        ]  # fmt: skip
        if (plan.round + 1) % c.checkpoint_every == 0:
            acts.append(WriteCheckpoint(plan.round, new_values))
        return acts

    def _forget_before(self, oldest: int) -> None:
        """Drop plans and dedupe keys older than the late window (except rounds with pending late updates)."""
        keep = {r for _, r in self.late}
        for r in [r for r in self.plans if r < oldest and r not in keep]:
            del self.plans[r]
        self.dedupe.forget_before(oldest, keep)
        self.vp.forget_before(min([oldest, *keep]))

    @property
    def stored(self) -> dict[tuple[str, int], int]:
        """(client, round) -> msg_id of the stored updates an update can still name (coordinator/dedupe.py)."""
        return self.dedupe.keys

    def sync_reply(self, client: str, have_round: int) -> list[Publish]:
        """What a SyncRequest(have_round) is answered (`sync_messages`), for `to/{client}`."""
        return sync_messages(client, have_round, self.values, self.last_round, self.results, self.config.replay_max,
                             self.config.chunk_bytes)  # fmt: skip
