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
  deadline, extension         tick -> scheduler.close_decision -> close_round / _extend
  validation                  on_update -> ingest.check_update
  dedupe, conflict            on_update (same msg_id: Duplicate; another: reject `conflict`, first wins)
  stragglers, late folding    on_update (late | dropped), close_round -> aggregate.result_scalars
  MEERKAT-VP limits           _observe_drift, _steps_for
  replay vs checkpoint        sync_reply
  re-publish after reconnect  reconnected  (devices re-send their kept Updates on seeing the plan)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from coordinator.aggregate import Group, result_scalars
from coordinator.checkpoint import value_chunks
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor, DriftStats
from coordinator.ingest import Reject, check_join, check_update
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
from coordinator.scheduler import close_decision, round_seeds, sample_clients
from shared.apply import apply_round, values_checksum
from shared.codec import encode
from shared.fingerprint import fp_tag as make_fp_tag
from shared.messages import (
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
RESEND_GRACE_S = 30.0  # after a reconnect, a round due sooner gets this long (at most round_deadline_s) for re-sends
LATE_WINDOW = 64  # an update for a round more than this many rounds before the open one is `too_late`


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


Action = Publish | Persist | WriteCheckpoint | Duplicate


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
        self.results: deque[ResultRow] = deque(rec.results, maxlen=max(1, config.replay_max))
        self.clients: dict[str, ClientRow] = {c.client: c for c in rec.clients}
        self.unjoined: dict[str, float] = {}  # live client without a Join -> when to ask it (next)
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

    # -- queries ---------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.stop_after_round is not None and self.last_round >= self.stop_after_round

    def online(self) -> list[str]:
        """Joined, online clients of this model + mask, sorted by id (the ones a plan may sample)."""
        return sorted(
            c.client for c in self.clients.values()
            if c.state == "joined" and c.online and c.fingerprint == self.fingerprint and c.mask_id == self.mask_id
        )  # fmt: skip

    def limited(self) -> set[str]:
        """Clients MEERKAT-VP limits to one local step (empty with drift_control off)."""
        return self.drift.limited() if self.drift_on and self.drift is not None else set()

    def plan_message(self, p: PlanRow) -> RoundPlan:
        return plan_message(p, self.config.fleet, self.fingerprint, self.mask_id)

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
        """Dispatch one decoded client message (its `client` field filled from the topic)."""
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
        self.unjoined.pop(j.client, None)
        rej = check_join(j, self.fingerprint, self.mask_id)
        state = "rejected" if rej else "joined"
        self.clients[j.client] = ClientRow(j.client, state, j.fingerprint, j.mask_id, j.n_samples, True, now)
        acts: list[Action] = [Persist(JoinRecord(
            j.client, state, rej.reason if rej else "", j.fingerprint, j.mask_id, j.n_samples, j.budget_gib,
            dict(j.capabilities), j.last_round, now,
        ))]  # fmt: skip
        if rej is not None:
            return acts + self.on_reject(j.client, "join", rej, now)
        log.info("client %s joined (n_samples %d, at round %d)", j.client, j.n_samples, j.last_round)
        return acts

    def on_status(self, s: Status, now: float) -> list[Action]:
        if s.online:
            self._note_live(s.client, now)
        else:
            self.unjoined.pop(s.client, None)
        self._seen(s.client, now, online=s.online)
        return [Persist(OnlineRecord(s.client, s.online, now))]

    def on_heartbeat(self, h: Heartbeat, now: float) -> list[Action]:
        self._note_live(h.client, now)
        self._seen(h.client, now, online=True)
        tele = {k: v for k, v in asdict(h).items() if k != "client"}
        return [Persist(HeartbeatRecord(h.client, tele, now))]

    def on_sync(self, s: SyncRequest, now: float) -> list[Action]:
        self._note_live(s.client, now)
        self._seen(s.client, now)
        return [Persist(SeenRecord(s.client, now)), *self.sync_reply(s.client, s.have_round)]

    def on_update(self, u: Update, now: float) -> list[Action]:
        """Validate, dedupe, store as accepted (open round) / late / dropped, feed MEERKAT-VP."""
        self._note_live(u.client, now)
        is_open = self.plan is not None and u.round == self.plan.round
        plan = self.plan if is_open else (self.plans.get(u.round) if u.round <= self.last_round else None)
        if plan is None and u.round <= self.last_round - LATE_WINDOW:
            rej: Reject | None = Reject(
                "too_late", ErrorCode.STALE_ROUND, f"round {u.round} is more than {LATE_WINDOW} rounds old"
            )
        else:
            rej = check_update(u, plan, self.fp_tag, self.config.max_abs_grad)
        if rej is not None:
            return self.on_reject(u.client, "up", rej, now)
        assert plan is not None  # check_update rejects an unplanned round
        have = self.stored.get((u.client, u.round))
        if have is not None:
            if have == u.msg_id:
                log.debug("duplicate update %s round %d msg %d ignored", u.client, u.round, u.msg_id)
                return [Duplicate(u.client, u.round, u.msg_id)]
            detail = f"round {u.round} already has msg {have}; first wins"
            return self.on_reject(u.client, "up", Reject("conflict", ErrorCode.BAD_UPDATE, detail), now, reply=False)
        status = "accepted" if is_open else ("late" if self.config.straggler == "next" else "dropped")
        row = UpdateRow(u.client, u.round, u.msg_id, u.grads, u.n_samples, u.loss, now, status, None)
        gradip = self._gradip(plan, u.grads)
        self.stored[(u.client, u.round)] = u.msg_id
        self._seen(u.client, now)
        acts: list[Action] = [Persist(UpdateRecord(row, None if gradip is None else tuple(gradip)))]
        if status == "accepted":
            self.accepted[u.client] = row
        elif status == "late":
            self.late[(u.client, u.round)] = row
            acts.append(Persist(EventRecord("late", f"{u.client} round {u.round}: folded into the next result",
                                            u.round, now)))  # fmt: skip
        else:
            rej = Reject("late_dropped", ErrorCode.STALE_ROUND, f"round {u.round} already closed")
            acts += self.on_reject(u.client, "up", rej, now, reply=False)
        if gradip is not None:
            acts += self._observe_drift(u.client, u.round, gradip, now)
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
            acts += self._offline(now) + self._nag(now)
        if self.plan is None:
            if not self.done():
                acts += self._maybe_open(now)
            return acts
        plan, c = self.plan, self.config
        d = close_decision(plan.steps, list(self.accepted), now, plan.deadline, c.min_updates, plan.extensions,
                           c.max_extensions)  # fmt: skip
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
            self.clients[k] = replace(self.clients[k], online=False)
            log.info("client %s silent for %.0f s: offline", k, self.config.offline_after_s)
        return [Persist(OfflineRecord(tuple(gone)))] if gone else []

    def _note_live(self, client: str, now: float) -> None:
        """Remember a live client we have no Join from; `_nag` asks it to join after JOIN_GRACE_S."""
        c = self.clients.get(client)
        if client not in self.unjoined and (c is None or c.state not in ("joined", "rejected")):
            self.unjoined[client] = now + JOIN_GRACE_S

    def _nag(self, now: float) -> list[Action]:
        """ErrorMsg(UNKNOWN_CLIENT) to each live client without a Join (it joined while we were down:
        Join is not retained); the client re-sends its Join. Again every REJOIN_NAG_S until it does."""
        acts: list[Action] = []
        for client, due in sorted(self.unjoined.items()):
            if now < due:
                continue
            c = self.clients.get(client)
            if c is not None and c.state in ("joined", "rejected"):
                del self.unjoined[client]
                continue
            log.info("client %s is live but has not joined (since our start): asking it to join", client)
            acts.append(Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "unknown client: send Join"), to=client))
            self.unjoined[client] = now + REJOIN_NAG_S
        return acts

    def _seen(self, client: str, now: float, online: bool | None = None) -> None:
        c = self.clients.get(client) or ClientRow(client, "unknown")
        self.clients[client] = replace(c, seen_at=now, online=c.online if online is None else online)

    # -- rounds ----------------------------------------------------------------------------------
    def _steps_for(self, client: str) -> int:
        """T, or 1 for a client MEERKAT-VP limited (it keeps its data pointer: all its data is still seen)."""
        T = self.config.steps
        return self.drift.steps_for(client, T) if self.drift_on and self.drift is not None else T

    def _maybe_open(self, now: float) -> list[Action]:
        c = self.config
        eligible = self.online()
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
        self.plan, self.plans[r], self.accepted = plan, plan, {}
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
        eligible = self.online()
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
        ups = [self.accepted[k] for k in sorted(self.accepted)]
        late = sorted(self.late.values(), key=lambda u: (u.round, u.client)) if c.straggler == "next" else []
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
        self.results.append(row)
        self._forget_before(plan.round + 1 - LATE_WINDOW)
        loss = math.fsum(u.loss for u in ups) / len(ups)
        log.info("round %d closed (%s): %d updates, %d late, mean loss %.4f, checksum %s", plan.round, why, len(ups),
                 len(late), loss, checksum[:12])  # fmt: skip
        acts: list[Action] = [
            Persist(ResultRecord(row, used)),
            Persist(EventRecord("close", f"{why}; {len(ups)} updates + {len(late)} late", plan.round, now)),
            Publish(result_message(row)),
        ]
        if (plan.round + 1) % c.checkpoint_every == 0:
            acts.append(WriteCheckpoint(plan.round, new_values))
        return acts

    def _forget_before(self, oldest: int) -> None:
        """Drop plans and dedupe keys older than the late window (except rounds with pending late updates)."""
        keep = {r for _, r in self.late}
        for r in [r for r in self.plans if r < oldest and r not in keep]:
            del self.plans[r]
        for key in [k for k in self.stored if k[1] < oldest and k[1] not in keep]:
            del self.stored[key]

    # -- sync ------------------------------------------------------------------------------------
    def sync_reply(self, client: str, have_round: int) -> list[Action]:
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

    def _limit(self, client: str, round: int, st: DriftStats, now: float) -> list[Action]:
        """The log line, event and durable flag of one MEERKAT-VP decision."""
        nxt = self.last_round + (2 if self.plan is not None else 1)  # the next plan not yet published
        detail = (
            f"client={client} steps=1 from_round={nxt} rho_later={st.rho_later:.3g} "
            f"rho_quie={st.rho_quie:.2f} n_steps={st.n_steps}"
        )
        log.info("drift_limit %s", detail)
        return [Persist(LimitRecord(client, round, now)), Persist(EventRecord("drift_limit", detail, round, now))]
