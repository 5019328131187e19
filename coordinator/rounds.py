"""The round book: every rule of the coordinator's round lifecycle, with no I/O.

Events go in (`on_join`, `on_status`, `on_heartbeat`, `on_update`, `on_sync`, or `handle(msg, now)` for
any of them, `on_reject` for what the pump could not decode, and `tick(now)` for the clock); actions come
out. Time is always an argument: the book never reads a clock, a socket or a file.

    book = RoundBook(config, fingerprint=fp, mask_id=mask.mask_id, values=v0)       # no event log at all
    acts = book.handle(Join(client="c1", ...), now=0.0) + book.tick(now=0.0)
    for a in acts:
        Publish(message, to)    -> to=None: broadcast (RoundPlan retained on `plan`; RoundResult on
                                   `result/{r}` + retained `result/latest`); to=client: on `to/{client}`
        Persist(record)         -> durable record (`EventLog.persist`); an in-memory run may ignore it
        WriteCheckpoint(r, v)   -> write the sparse checkpoint of round r (`coordinator/checkpoint.py`)
        Duplicate(c, r, msg_id) -> a re-sent update was ignored (a metric; nothing to do)

The book keeps in memory everything its decisions need: the client registry (joined / online / last
seen), the values and last closed round, the open plan with its accepted updates, pending late
updates, the plans and stored msg_ids of the last LATE_WINDOW rounds (late validation, dedupe), the
last `replay_max` results (Replay) and the MEERKAT-VP monitor. The event log is for recovery and audit:
`Recovered` is what a restarted pump hands the constructor (coordinator/recovery.py reads it).

Rules, each in one place (docs/ARCHITECTURE.md "Round lifecycle" names them):
  join / unknown-client nag   on_join, _note_live, _nag          (ErrorMsg UNKNOWN_CLIENT)
  online / offline            on_status, on_heartbeat, _offline
  open + sampling             _maybe_open  (scheduler.round_seeds / sample_clients)
  deadline, extension         tick -> scheduler.close_decision_n -> close_round / _extend
  validation                  on_update -> ingest.check_update
  dedupe, conflict            on_update (same msg_id: Duplicate; another: reject `conflict`, first wins)
  stragglers, late folding    on_update (late | dropped), close_round -> aggregate.result_scalars
  MEERKAT-VP limits           _observe_drift, _steps_for
  replay vs checkpoint        sync_reply
  re-publish after reconnect  reconnected  (devices re-send their kept Updates on seeing the plan)
  hostile devices (docs/SECURITY.md, COORDINATOR.md "Hostile devices"):
    rate limits               handle -> _admit (token bucket per client and kind; RATE_LIMITED notice)
    FedAvg weight             _weight (min of Update n, Join n, weight_cap_factor x median Join n)
    adaptive |g| cap          grad_cap (k x median |g| of the last accepted updates, floor, fixed cap)
    late age                  on_update (late_max_age)
    quorum + grace            tick (scheduler.quorum_met_n / close_decision_n)
    benching silent clients   close_round -> _count_misses; _prove (Heartbeat AND Join after the bench)
    unknown ids               on_status / on_heartbeat / on_join: no row, bounded LRUs only
    sync budget               on_sync (joined only; reply bytes per minute; checkpoint_every_s)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from coordinator.aggregate import Group, result_scalars
from coordinator.checkpoint import value_chunks
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor, DriftStats
from coordinator.ingest import Reject, check_join, check_update
from coordinator.median import SlidingMedian
from coordinator.privacy import with_privacy
from coordinator.ratelimit import Limiter, LruDict
from coordinator.records import (
    ClientRow,
    DriftRecord,
    EventRecord,
    HeartbeatRecord,
    JoinRecord,
    LimitRecord,
    OfflineRecord,
    OnlineRecord,
    PlanRecord,
    PlanRow,
    Record,
    RejectRecord,
    ReplanRecord,
    ResultRecord,
    ResultRow,
    SeenRecord,
    UpdateRecord,
    UpdateRow,
)
from coordinator.scheduler import close_decision_n, quorum_met_n, round_seeds, sample_clients
from shared.apply import apply_round, values_checksum
from shared.codec import encode
from shared.fingerprint import fp_tag as make_fp_tag
from shared.messages import (
    MAX_SEEDS,
    CheckpointChunk,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    Join,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    Status,
    SyncRequest,
    Update,
)

log = logging.getLogger(__name__)

OFFLINE_CHECK_S = 1.0  # how often tick() looks for silent clients and unjoined live ones
JOIN_GRACE_S = 2.0  # a live client without a Join is asked to join after this long...
REJOIN_NAG_S = 10.0  # ...and again every this long until it does
LATE_WINDOW = 64  # plans and dedupe keys of this many closed rounds are kept (late_max_age <= this)
RATE_NOTICE_S = 10.0  # a rate-limited client gets at most one ErrorMsg(RATE_LIMITED) per this long
RESEND_GRACE_S = 30.0  # after a reconnect, a round due sooner gets this long (at most round_deadline_s) for re-sends
KIND_OF: dict[type, str] = {Update: "up", Join: "join", Heartbeat: "hb", Status: "status", SyncRequest: "sync"}
TELEMETRY = tuple(f.name for f in fields(Heartbeat) if f.name != "client")  # a HeartbeatRecord's keys, in order


# -- actions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Publish:
    """Send `message`: to=None broadcasts it (plan or result), to=client sends it on `to/{client}`."""

    message: RoundPlan | RoundResult | Replay | CheckpointChunk | ErrorMsg
    to: str | None = None


@dataclass(frozen=True)
class Persist:
    """Make `record` durable (before acking the messages of the batch and before publishing)."""

    record: Record


@dataclass(frozen=True)
class WriteCheckpoint:
    """Write the values after `round` as a sparse checkpoint (every `checkpoint_every` rounds)."""

    round: int
    values: torch.Tensor


@dataclass(frozen=True)
class Duplicate:
    """A re-sent update (same client, round and msg_id) was ignored."""

    client: str
    round: int
    msg_id: int


@dataclass(frozen=True)
class Dropped:
    """A client message dropped unanswered (rate limit, reply budget): a metric, nothing is stored."""

    client: str
    kind: str
    reason: str


Action = Publish | Persist | WriteCheckpoint | Duplicate | Dropped


@dataclass(frozen=True)
class Recovered:
    """What a restarted coordinator hands the book (coordinator/recovery.py reads it from the event log)."""

    values: torch.Tensor  # after last_round
    last_round: int
    open_plan: PlanRow | None = None
    plans: tuple[PlanRow, ...] = ()  # the last LATE_WINDOW rounds' plans + those of pending late updates
    pending: tuple[UpdateRow, ...] = ()  # the open round's accepted updates + late updates not yet folded
    stored: dict[tuple[str, int], int] = field(default_factory=dict)  # (client, round) -> msg_id, same rounds
    results: tuple[ResultRow, ...] = ()  # the newest results (at least the last replay_max), round order
    clients: tuple[ClientRow, ...] = ()
    limited: dict[str, int] = field(default_factory=dict)  # MEERKAT-VP flags: client -> round flagged
    gradip: Iterable[tuple[str, int, Sequence[float]]] = ()  # logged GradIP, insertion order
    drift_steps: dict[str, int] = field(default_factory=dict)  # logged MEERKAT-VP step count per client


def plan_message(p: PlanRow, fleet: str, fingerprint: str, mask_id: str) -> RoundPlan:
    return RoundPlan(
        fleet=fleet, round=p.round, seeds=p.seeds, lr=p.lr, eps=p.eps, dist=p.dist, steps=p.steps,
        base_round=p.base_round, deadline=p.deadline, fingerprint=fingerprint, mask_id=mask_id,
        batch_size=p.batch_size, values_checksum=p.base_checksum,
    )  # fmt: skip


def result_message(r: ResultRow) -> RoundResult:
    return RoundResult(r.round, r.seeds, r.scalars, r.lr, r.dist, r.n_clients, r.values_checksum)


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
        self.drift_on = config.drift_control and drift is not None
        self.stop_after_round = stop_after_round
        rec = recovered or Recovered(values=values, last_round=-1)
        self.values, self.last_round = rec.values, rec.last_round
        self.plan: PlanRow | None = rec.open_plan
        self.plans: dict[int, PlanRow] = {p.round: p for p in rec.plans}
        if self.plan is not None:
            self.plans[self.plan.round] = self.plan
        self.accepted: dict[str, UpdateRow] = {}  # the open round's on-time updates
        self.late: dict[tuple[str, int], UpdateRow] = {}  # stored late, not yet folded
        for u in rec.pending:
            if self.plan is not None and u.round == self.plan.round and u.status == "accepted":
                self.accepted[u.client] = u
            elif u.status == "late":
                self.late[(u.client, u.round)] = u
        self.stored: dict[tuple[str, int], int] = dict(rec.stored)
        self._stored_rounds: dict[int, list[str]] = {}  # round -> clients with a key in `stored` (cheap forgetting)
        for client, r in self.stored:
            self._stored_rounds.setdefault(r, []).append(client)
        self.results: deque[ResultRow] = deque(rec.results, maxlen=max(1, config.replay_max))
        self.clients: dict[str, ClientRow] = {c.client: c for c in rec.clients}
        self._n_online = sum(1 for c in self.clients.values() if self._samplable(c))  # = len(online()), kept by _put_client
        # live client without a Join -> (when to ask it next, last seen); bounded: unknown ids never get a row
        self.unjoined: LruDict[str, tuple[float, float]] = LruDict()
        self.refused: LruDict[str, float] = LruDict()  # ids whose Join was refused (not nagged), not persisted
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
        self.quorum_since: float | None = None  # when the open round first met its quorum
        self._last_offline_check = -math.inf
        self._reflagged: list[tuple[str, int, DriftStats]] = []
        if drift is not None:
            if self.drift_on:
                for client, r in rec.limited.items():
                    drift.restore_limited(client, r)
            for client, r, gradip in rec.gradip:
                st = drift.observe_gradip(client, r, gradip)
                if st is not None and self.drift_on:  # thresholds changed since the update was logged
                    self._reflagged.append((client, r, st))
            for client, n in rec.drift_steps.items():  # a pruned log has fewer GradIP rows than steps seen
                drift.restore_steps(client, n)

    # -- queries ---------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.stop_after_round is not None and self.last_round >= self.stop_after_round

    def online(self) -> list[str]:
        """Joined, online clients of this model + mask, sorted by id (the ones a plan may sample)."""
        return sorted(
            c.client for c in self.clients.values()
            if c.state == "joined" and c.online and c.fingerprint == self.fingerprint and c.mask_id == self.mask_id
        )  # fmt: skip

    def n_online(self) -> int:
        """len(online()) in O(1) (a counter kept on every registry change: the pump reads it per batch)."""
        return self._n_online

    def _samplable(self, c: ClientRow) -> bool:
        return c.state == "joined" and c.online and c.fingerprint == self.fingerprint and c.mask_id == self.mask_id

    def _put_client(self, row: ClientRow) -> None:
        """The one way the registry changes, so the online counter stays exact."""
        old = self.clients.get(row.client)
        self._n_online += self._samplable(row) - (old is not None and self._samplable(old))
        self.clients[row.client] = row

    def eligible(self) -> list[str]:
        """The online clients a plan may sample: benched ones (silent bench_after_misses rounds) excluded."""
        return [c for c in self.online() if c not in self.benched]

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
        row = self.clients.get(client)
        w = n_update if row is None or row.state != "joined" else min(n_update, row.n_samples)
        if self.config.weight_cap_factor > 0:
            if self._median_n is None:
                ns = [c.n_samples for c in self.clients.values() if c.state == "joined" and c.fingerprint == self.fingerprint]
                self._median_n = float(np.median(ns)) if ns else 0.0
            if self._median_n > 0:
                w = min(w, math.floor(self.config.weight_cap_factor * self._median_n))
        return max(1, w)

    def limited(self) -> set[str]:
        """Clients MEERKAT-VP limits to one local step (empty with drift_control off)."""
        return self.drift.limited() if self.drift_on and self.drift is not None else set()

    def plan_message(self, p: PlanRow) -> RoundPlan:
        return with_privacy(plan_message(p, self.config.fleet, self.fingerprint, self.mask_id), self.config)

    # -- events ----------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """What a (re)started coordinator does first: records of re-flags during recovery, then the
        latest result and the open plan re-published (both retained)."""
        acts: list[Action] = []
        for client, r, st in self._reflagged:
            acts += self._limit(client, r, st, now)
        self._reflagged = []
        if self.results:
            acts.append(Publish(result_message(self.results[-1])))
        if self.plan is not None:
            acts.append(Publish(self.plan_message(self.plan)))
        return acts

    def reconnected(self, now: float) -> list[Action]:
        """The pump's link (re)connected and (re)subscribed: the broker may have lost our session and with
        it the Updates it PUBACKed to devices while we were away. Re-publish the latest result and the
        open plan (retained): a device that answered that round sends its kept Update again on seeing the
        plan (docs/PROTOCOL.md "Delivery"). A deadline due sooner than min(RESEND_GRACE_S, round_deadline_s)
        is moved there, so those re-sent Updates count on time; persisted like an extension, not counted as one."""
        acts: list[Action] = []
        if self.results:
            acts.append(Publish(result_message(self.results[-1])))
        plan = self.plan
        if plan is None:
            return acts
        grace = now + min(RESEND_GRACE_S, self.config.round_deadline_s)
        if plan.deadline < grace and set(self.accepted) != set(plan.steps):
            new = replace(plan, deadline=grace)
            self.plan = self.plans[plan.round] = new
            log.info("round %d: link reconnected, deadline moved to now + %.0f s for re-sent updates", plan.round,
                     grace - now)  # fmt: skip
            acts += [
                Persist(ReplanRecord(plan.round, dict(plan.steps), new.deadline, plan.extensions)),
                Persist(EventRecord("reconnect", f"{len(self.accepted)} of {len(plan.steps)} updates held; "
                                    "plan re-published for re-sends", plan.round, now)),
            ]  # fmt: skip
        acts.append(Publish(self.plan_message(self.plans[plan.round])))
        return acts

    def handle(self, msg: Message, now: float) -> list[Action]:
        """Dispatch one decoded client message (its `client` field filled from the topic), rate-limited."""
        kind = KIND_OF.get(type(msg))
        if kind is None:
            raise TypeError(f"RoundBook.handle: {type(msg).__name__} is not a client -> coordinator message")
        client: str = msg.client  # type: ignore[union-attr]
        if not self.rates.allow((client, kind), now):
            return self._limited(client, kind, "rate_limited", f"over {self.config.rate_per_s:g}/s on {kind}", now)
        if isinstance(msg, Update):
            return self.on_update(msg, now)
        if isinstance(msg, Join):
            return self.on_join(msg, now)
        if isinstance(msg, Heartbeat):
            return self.on_heartbeat(msg, now)
        if isinstance(msg, Status):
            return self.on_status(msg, now)
        if isinstance(msg, SyncRequest):
            return self.on_sync(msg, now)
        raise TypeError(f"RoundBook.handle: {type(msg).__name__} is not a client -> coordinator message")

    def on_join(self, j: Join, now: float) -> list[Action]:
        """A valid Join registers the client (a row). A refused one from an id that is joined changes
        nothing (without the broker ACL anyone can send it: the first valid Join wins, no reply); from any
        other id it is answered and remembered in a bounded LRU only (no row for ids that never joined)."""
        quant = self.config.quant if self.config.quant_policy == "same" else None
        rej = check_join(j, self.fingerprint, self.mask_id, quant)
        have = self.clients.get(j.client)
        if rej is not None:
            if have is not None and have.state == "joined":
                spoof = Reject("join_ignored", rej.code, f"{rej.detail}; {j.client} stays joined")
                return self.on_reject(j.client, "join", spoof, now, reply=False)
            self.unjoined.pop(j.client, None)
            self.refused[j.client] = now
            return self.on_reject(j.client, "join", rej, now)
        self.unjoined.pop(j.client, None)
        self.refused.pop(j.client, None)
        self._median_n = None
        self._prove(j.client, "join")
        self._put_client(ClientRow(j.client, "joined", j.fingerprint, j.mask_id, j.n_samples, True, now))
        acts: list[Action] = [Persist(JoinRecord(
            j.client, "joined", "", j.fingerprint, j.mask_id, j.n_samples, j.budget_gib,
            dict(j.capabilities), j.last_round, now,
        ))]  # fmt: skip
        log.info("client %s joined (n_samples %d, at round %d)", j.client, j.n_samples, j.last_round)
        return acts

    def on_status(self, s: Status, now: float) -> list[Action]:
        if s.online:
            self._note_live(s.client, now)
        else:
            self.unjoined.pop(s.client, None)
        if not self._seen(s.client, now, online=s.online):
            return []  # an id that never joined: no row (a spoofed id must not cost a row)
        return [Persist(OnlineRecord(s.client, s.online, now))]

    def on_heartbeat(self, h: Heartbeat, now: float) -> list[Action]:
        self._note_live(h.client, now)
        if not self._seen(h.client, now, online=True):
            return []
        self._prove(h.client, "hb")
        tele = {k: getattr(h, k) for k in TELEMETRY}  # asdict(h) less client: scalars only, no deep copy
        acts: list[Action] = [Persist(HeartbeatRecord(h.client, tele, now))]
        if h.client in self.benched and now >= self.bench_nagged.get(h.client, -math.inf):
            # benched: its Join proves it is back (PROTOCOL.md §8 client 3: UNKNOWN_CLIENT -> send Join)
            self.bench_nagged[h.client] = now + REJOIN_NAG_S
            acts.append(Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "benched after missed rounds: send Join"),
                                to=h.client))  # fmt: skip
        return acts

    def on_sync(self, s: SyncRequest, now: float) -> list[Action]:
        """Replay / checkpoint only to joined clients (others: UNKNOWN_CLIENT), within the client's reply
        byte allowance, and checkpoint chunks at most every checkpoint_every_s (else RATE_LIMITED)."""
        self._note_live(s.client, now)
        row = self.clients.get(s.client)
        if row is None or row.state != "joined":
            rej = Reject("unknown_client", ErrorCode.UNKNOWN_CLIENT, "sync before Join: send Join")
            return self.on_reject(s.client, "sync", rej, now)
        self._seen(s.client, now)
        if self.reply_bytes.level(s.client, now) < 0:
            return self._limited(s.client, "sync", "reply_budget", "reply bytes per minute used up", now)
        reply = self.sync_reply(s.client, s.have_round)
        chunks = [a for a in reply if isinstance(a.message, CheckpointChunk)]
        if chunks:
            last = self.last_checkpoint.get(s.client)
            if last is not None and now - last < self.config.checkpoint_every_s:
                why = f"checkpoint sent {now - last:.1f} s ago (at most every {self.config.checkpoint_every_s:g} s)"
                return self._limited(s.client, "sync", "checkpoint_cooldown", why, now)
            self.last_checkpoint[s.client] = now
        cost = sum(len(a.message.data) + 128 if isinstance(a.message, CheckpointChunk) else len(encode(a.message))
                   for a in reply)  # fmt: skip
        self.reply_bytes.take(s.client, now, cost)
        return [Persist(SeenRecord(s.client, now)), *reply]

    def _limited(self, client: str, kind: str, reason: str, detail: str, now: float) -> list[Action]:
        """Drop a message (counted, nothing stored); tell the client RATE_LIMITED at most every RATE_NOTICE_S."""
        acts: list[Action] = [Dropped(client, kind, reason)]
        last = self.noticed.get(client)
        if last is None or now - last >= RATE_NOTICE_S:
            self.noticed[client] = now
            log.warning("client %s limited on %s: %s", client, kind, detail)
            acts.append(Publish(ErrorMsg(int(ErrorCode.RATE_LIMITED), f"{reason}: {detail}"[:1000]), to=client))
        return acts

    def on_update(self, u: Update, now: float) -> list[Action]:
        """Validate, dedupe, store as accepted (open round) / late / dropped, feed MEERKAT-VP."""
        self._note_live(u.client, now)
        is_open = self.plan is not None and u.round == self.plan.round
        plan = self.plan if is_open else (self.plans.get(u.round) if u.round <= self.last_round else None)
        if plan is None and u.round <= self.last_round:  # closed so long ago that its plan is forgotten
            rej: Reject | None = Reject("too_late", ErrorCode.STALE_ROUND, f"round {u.round} closed long ago")
        else:
            rej = check_update(u, plan, self.fp_tag, self.grad_cap())
        if rej is not None:
            return self.on_reject(u.client, "up", rej, now)
        assert plan is not None  # check_update rejects an unplanned round
        have = self.stored.get((u.client, u.round))
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
        weight = self.weight(u.client, u.n_samples)
        if weight != u.n_samples:
            log.info("update %s round %d: FedAvg weight %d (it claimed n_samples %d)", u.client, u.round, weight,
                     u.n_samples)  # fmt: skip
        row = UpdateRow(u.client, u.round, u.msg_id, u.grads, weight, u.loss, now, status, None)
        gradip = self._gradip(plan, u.grads)
        self.stored[(u.client, u.round)] = u.msg_id
        self._stored_rounds.setdefault(u.round, []).append(u.client)
        self._seen(u.client, now)
        acts: list[Action] = [Persist(UpdateRecord(row, None if gradip is None else tuple(gradip)))]
        if status != "dropped":
            self._remember_grads(u.grads)
            self.misses.pop(u.client, None)
        if status == "accepted":
            self.accepted[u.client] = row
        elif status == "late":
            self.late[(u.client, u.round)] = row
            acts.append(Persist(EventRecord("late", f"{u.client} round {u.round}: folded into the next result",
                                            u.round, now)))  # fmt: skip
        else:
            rej = Reject("late_dropped", ErrorCode.STALE_ROUND, f"round {u.round} already closed (straggler = drop)")
            acts += self.on_reject(u.client, "up", rej, now)
        if gradip is not None:
            acts += self._observe_drift(u.client, u.round, gradip, now)
        return acts

    def _remember_grads(self, grads: Sequence[float]) -> None:
        self.grad_hist.push(tuple(map(abs, grads)))  # grads: floats (Update checked them), so abs = |float|
        self.grad_seen += 1
        self._grad_cap = None

    def _prove(self, client: str, proof: str) -> None:
        """A benched client is sampled again once it sent a Heartbeat AND a Join after it was benched."""
        got = self.benched.get(client)
        if got is None:
            return
        got.add(proof)
        if got >= {"hb", "join"}:
            del self.benched[client]
            self.misses.pop(client, None)
            log.info("client %s proved liveness (heartbeat + Join): sampled again", client)

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
            acts += self._offline(now) + self._nag(now)
        if self.plan is None:
            if not self.done():
                acts += self._maybe_open(now)
            return acts
        plan, c = self.plan, self.config
        # counts, not sets: accepted is a subset of plan.steps (check_update rejects clients not sampled,
        # and a re-plan only adds clients), so this tick costs O(1) however large the round
        n, got = len(plan.steps), len(self.accepted)
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

    def _offline(self, now: float) -> list[Action]:
        cutoff = now - self.config.offline_after_s
        gone = sorted(
            c.client for c in self.clients.values() if c.online and (c.seen_at is None or c.seen_at < cutoff)
        )
        for k in gone:
            self._put_client(replace(self.clients[k], online=False))
            log.info("client %s silent for %.0f s: offline", k, self.config.offline_after_s)
        return [Persist(OfflineRecord(tuple(gone)))] if gone else []

    def _note_live(self, client: str, now: float) -> None:
        """Remember a live client we have no Join from; `_nag` asks it to join after JOIN_GRACE_S (a
        bounded LRU: ids that never join cost no row and at most MAX_KEYS entries)."""
        c = self.clients.get(client)
        if (c is not None and c.state in ("joined", "rejected")) or client in self.refused:
            return
        due = self.unjoined[client][0] if client in self.unjoined else now + JOIN_GRACE_S
        self.unjoined[client] = (due, now)

    def _nag(self, now: float) -> list[Action]:
        """ErrorMsg(UNKNOWN_CLIENT) to each live client without a Join (it joined while we were down:
        Join is not retained); the client re-sends its Join. Again every REJOIN_NAG_S until it does."""
        acts: list[Action] = []
        for client, (due, seen) in sorted(self.unjoined.items()):
            c = self.clients.get(client)
            if (c is not None and c.state in ("joined", "rejected")) or now - seen > self.config.offline_after_s:
                del self.unjoined[client]  # joined, or silent: stop asking
                continue
            if now < due:
                continue
            log.info("client %s is live but has not joined (since our start): asking it to join", client)
            acts.append(Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "unknown client: send Join"), to=client))
            self.unjoined[client] = (now + REJOIN_NAG_S, seen)
        return acts

    def _seen(self, client: str, now: float, online: bool | None = None) -> bool:
        """Note a registered client's activity; False (and nothing kept) for an id with no row."""
        c = self.clients.get(client)
        if c is None:
            return False
        # replace(c, seen_at=..., online=...) spelled out: this runs for every message
        self._put_client(ClientRow(c.client, c.state, c.fingerprint, c.mask_id, c.n_samples,
                                   c.online if online is None else online, now))  # fmt: skip
        return True

    # -- rounds ----------------------------------------------------------------------------------
    def _steps_for(self, client: str) -> int:
        """T, or 1 for a client MEERKAT-VP limited (it keeps its data pointer: all its data is still seen)."""
        T = self.config.steps
        return self.drift.steps_for(client, T) if self.drift_on and self.drift is not None else T

    def _maybe_open(self, now: float) -> list[Action]:
        c = self.config
        if self._n_online < c.min_clients:  # O(1) test first: this runs on every tick while the fleet joins
            return []
        eligible = self.eligible()
        if len(eligible) < c.min_clients:
            return []
        r = self.last_round + 1
        sampled = sample_clients(eligible, c.clients_per_round, c.master_seed, r)
        plan = PlanRow(
            round=r, state="open", opened_at=now, deadline=now + c.round_deadline_s,
            seeds=round_seeds(c.master_seed, r, c.steps), steps={k: self._steps_for(k) for k in sampled},
            lr=c.lr, eps=c.eps, dist=c.dist, batch_size=c.batch_size, base_round=r - 1,
            base_checksum=values_checksum(self.values), extensions=0,
        )  # fmt: skip
        self.plan, self.plans[r], self.accepted, self.quorum_since = plan, plan, {}, None
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
        c = self.config
        eligible = self.eligible()
        want = max(c.min_updates - len(self.accepted), 0) if c.clients_per_round else len(eligible)
        extra = sample_clients(eligible, want, c.master_seed, plan.round, plan.extensions + 1, exclude=plan.steps)
        steps = {**plan.steps, **{k: self._steps_for(k) for k in extra}}
        new = replace(plan, steps=steps, deadline=now + c.round_deadline_s, extensions=plan.extensions + 1)
        self.plan = self.plans[plan.round] = new
        log.warning("round %d: %s; deadline extended (%d), added %d clients", plan.round, why, new.extensions,
                    len(extra))  # fmt: skip
        return [
            Persist(ReplanRecord(plan.round, steps, new.deadline, new.extensions)),
            Persist(EventRecord("extend", f"{why}; added {extra}", plan.round, now)),
            Publish(self.plan_message(new)),
        ]

    def close_round(self, now: float, why: str = "") -> list[Action]:
        """Aggregate the open round's updates (+ pending late ones under policy "next"), apply, publish."""
        plan, c = self.plan, self.config
        if plan is None:
            raise RuntimeError("close_round: no round is open")
        if not self.accepted:
            raise RuntimeError(f"close_round: round {plan.round} has no update")
        reported = [self.accepted[k] for k in sorted(self.accepted)]
        acts: list[Action] = []
        ups = reported
        if self.drift is not None:
            drift_acts, ups = self._check_spikes(plan.round, reported, now)
            acts += drift_acts + self._check_fleet_decay(plan.round, reported, now)
        late = self._late_to_fold(len(plan.seeds)) if c.straggler == "next" else []
        on_time = Group(plan.seeds, {u.client: u.grads for u in ups}, {u.client: u.n_samples for u in ups})
        groups = [
            Group(self.plans[r].seeds, {u.client: u.grads for u in late if u.round == r},
                  {u.client: u.n_samples for u in late if u.round == r})
            for r in sorted({u.round for u in late})
        ]  # fmt: skip
        seeds, scalars = result_scalars(c.aggregation, on_time, groups, clip_norm=c.clip_norm,
                                        trim_fraction=c.trim_fraction)  # fmt: skip
        new_values = apply_round(self.values, seeds, scalars, plan.lr, plan.dist)
        checksum = values_checksum(new_values)
        n_clients = len({u.client for u in ups} | {u.client for u in late})
        row = ResultRow(plan.round, tuple(seeds), tuple(scalars), plan.lr, plan.dist, n_clients, checksum, now,
                        now - plan.opened_at)  # fmt: skip
        used = tuple((u.client, u.round, "accepted") for u in ups) + tuple((u.client, u.round, "folded") for u in late)
        self.values, self.last_round, self.plan, self.accepted = new_values, plan.round, None, {}
        for u in late:
            del self.late[(u.client, u.round)]
        self.plans[plan.round] = replace(plan, state="closed")
        benched = self._count_misses(plan, {u.client for u in reported})
        self.results.append(row)
        self._forget_before(plan.round + 1 - LATE_WINDOW)
        loss = math.fsum(u.loss for u in ups) / len(ups)
        log.info("round %d closed (%s): %d updates, %d late, mean loss %.4f, checksum %s", plan.round, why, len(ups),
                 len(late), loss, checksum[:12])  # fmt: skip
        acts += [
            Persist(ResultRecord(row, used)),
            Persist(EventRecord("close", f"{why}; {len(ups)} updates + {len(late)} late", plan.round, now)),
            *(Persist(EventRecord("bench", f"{k}: sampled and silent {self.config.bench_after_misses} rounds in a "
                                  "row; sampled again after a Heartbeat and a Join", plan.round, now))
              for k in benched),
            Publish(result_message(row)),
        ]  # fmt: skip
        if (plan.round + 1) % c.checkpoint_every == 0:
            acts.append(WriteCheckpoint(plan.round, new_values))
        return acts

    def _late_to_fold(self, T: int) -> list[UpdateRow]:
        """The pending late updates of the oldest rounds first, whole rounds only, while the result stays
        within MAX_SEEDS (seed, scalar) pairs; the rest stay pending for the next result."""
        out: list[UpdateRow] = []
        pairs = T
        for r in sorted({r for _, r in self.late}):
            group = sorted((u for u in self.late.values() if u.round == r), key=lambda u: u.client)
            used = max(len(u.grads) for u in group)
            if pairs + used > MAX_SEEDS:
                break
            pairs += used
            out += group
        return out

    def _count_misses(self, plan: PlanRow, reported: set[str]) -> list[str]:
        """Sampled and silent: one more miss; bench_after_misses in a row benches the client (returned)."""
        k = self.config.bench_after_misses
        newly = []
        for client in sorted(plan.steps):
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

    def _forget_before(self, oldest: int) -> None:
        """Drop plans and dedupe keys older than the late window (except rounds with pending late updates)."""
        keep = {r for _, r in self.late}
        for r in [r for r in self.plans if r < oldest and r not in keep]:
            del self.plans[r]
        for r in [r for r in self._stored_rounds if r < oldest and r not in keep]:  # O(rounds), not O(keys)
            for client in self._stored_rounds.pop(r):
                del self.stored[(client, r)]
        if self.drift is not None:
            self.drift.forget_before(min([oldest, *keep]))

    # -- sync ------------------------------------------------------------------------------------
    def sync_reply(self, client: str, have_round: int) -> list[Publish]:
        """Replay of the missed results when at most replay_max behind (empty when up to date), else the
        values in checkpoint chunks (also for a client ahead of us, or a Replay over the payload limit)."""
        behind = self.last_round - have_round
        if 0 <= behind <= self.config.replay_max:
            results = [r for r in self.results if r.round > have_round]
            if len(results) == behind:
                replay = Replay(tuple(result_message(r) for r in results))
                try:
                    encode(replay)
                    return [Publish(replay, to=client)]
                except ValueError as exc:
                    log.info("replay for %s too large (%s): sending a checkpoint", client, exc)
        checksum = values_checksum(self.values)
        chunks = value_chunks(self.values, self.config.chunk_bytes)
        log.info("sending %s the values of round %d in %d chunks (it has round %d)", client, self.last_round,
                 len(chunks), have_round)  # fmt: skip
        return [
            Publish(CheckpointChunk(self.last_round, i, len(chunks), checksum, data), to=client)
            for i, data in enumerate(chunks)
        ]

    # -- MEERKAT-VP ------------------------------------------------------------------------------
    def _gradip(self, plan: PlanRow, grads: Sequence[float]) -> list[float] | None:
        """g_{k,t} * c_t with c_t = <mean pre-training gradient on the mask, z_t>; None without a monitor."""
        if self.drift is None:
            return None
        if plan.dist != self.drift.dist:
            log.warning("round %d ran with dist %s, the drift monitor uses %s: no GradIP", plan.round, plan.dist,
                        self.drift.dist)  # fmt: skip
            return None
        return self.drift.compute_gradip(plan.seeds, grads)

    def _observe_drift(self, client: str, round: int, gradip: list[float], now: float) -> list[Action]:
        """Feed the monitor, persist the client's statistics, record a new limit decision."""
        assert self.drift is not None
        flagged = self.drift.observe_gradip(client, round, gradip)
        st = flagged or self.drift.stats(client)
        if st is None:
            rec = DriftRecord(client, self.drift.steps_seen(client), None, None, None, None, now)
        else:
            rec = DriftRecord(client, st.n_steps, st.early, st.late, st.rho_later, st.rho_quie, now)
        acts: list[Action] = [Persist(rec)]
        if flagged is not None and self.drift_on:
            acts += self._limit(client, round, flagged, now)
        return acts

    def _check_spikes(self, round: int, ups: list[UpdateRow], now: float) -> tuple[list[Action], list[UpdateRow]]:
        """The divergence rule at close: an update whose max |g| is spike_ratio x the round's median |g| flags
        its client (1 local step from the next plan, sticky) and is left out of this round's aggregate (it
        stays `accepted` in the log with no used_in). Acts only with drift_control; a round where every
        update spiked keeps them all (no outlier to leave out)."""
        assert self.drift is not None
        was = self.drift.limited()
        spiked = self.drift.observe_round(round, {u.client: u.grads for u in ups})
        if not spiked or not self.drift_on:
            return [], ups
        keep = [u for u in ups if u.client not in spiked]
        if not keep:
            log.warning("round %d: every update spiked (%d): none left out", round, len(ups))
            keep = ups
        acts: list[Action] = []
        for client in sorted(spiked):
            st = spiked[client]
            left_out = len(keep) < len(ups)
            detail = (f"client={client} max_abs_g={st.peak:.4g} ratio={st.ratio:.3g} median={st.median:.4g} "
                      f"left_out={str(left_out).lower()}")  # fmt: skip
            if client not in was:
                acts += self._limit(client, round, f"{detail} reason=spike", now)
            else:
                log.info("drift_spike %s (already limited)", detail)
                acts.append(Persist(EventRecord("drift_spike", detail, round, now)))
        return acts, keep

    def _check_fleet_decay(self, round: int, ups: list[UpdateRow], now: float) -> list[Action]:
        """The fleet-relative decay rule at close (drift_decay_rule = "fleet"): a client whose rho_later is
        drift_fleet_ratio x the median of the round's clients is flagged (1 local step from the next plan,
        sticky); its update stays in this round's aggregate. Acts only with drift_control; not computed
        under another decay_rule."""
        assert self.drift is not None
        if self.drift.thresholds.decay_rule != "fleet":
            return []  # O(clients x window) per close: only when the rule is on
        flagged = self.drift.observe_fleet(round, [u.client for u in ups])
        acts: list[Action] = []
        for client in sorted(flagged) if self.drift_on else ():
            fs = flagged[client]
            acts += self._limit(client, round, f"rho_later={fs.rho_later:.3g} fleet_median={fs.median:.3g} "
                                f"ratio={fs.ratio:.3g} n_steps={fs.n_steps} reason=decay", now)  # fmt: skip
        return acts

    def _decay_detail(self, st: DriftStats) -> str:
        return f"rho_later={st.rho_later:.3g} rho_quie={st.rho_quie:.2f} n_steps={st.n_steps} reason=decay"

    def _limit(self, client: str, round: int, why: str | DriftStats, now: float) -> list[Action]:
        """The log line, event and durable flag of one MEERKAT-VP decision (`why`: the decay statistics or
        the text of the spike rule)."""
        nxt = self.last_round + (2 if self.plan is not None else 1)  # the next plan not yet published
        detail = f"client={client} steps=1 from_round={nxt} " + (
            self._decay_detail(why) if isinstance(why, DriftStats) else why
        )
        log.info("drift_limit %s", detail)
        return [Persist(LimitRecord(client, round, now)), Persist(EventRecord("drift_limit", detail, round, now))]
