"""The coordinator service: registry, round scheduler, durable ingest, aggregation, result broadcast.

One thread owns everything (the MQTT link only fills queues). A loop iteration:
  1. drain up to `BATCH` incoming messages, handle them in ONE SQLite transaction (a savepoint per
     message, so one bad message never spoils the batch), COMMIT, then ack them (paho manual ack) and
     only then publish the replies the handlers queued;
  2. `tick()`: mark silent clients offline, open a round when enough clients are online, close or
     extend the open round (docs/ARCHITECTURE.md, "Round lifecycle").

Restart after kill -9: the newest verified checkpoint + replay of the logged results gives the values;
an open round is reopened with the updates already committed (an update acked before the crash is in
the log; one delivered but not acked is re-delivered by the broker and deduped on (client, round)).

    coord = Coordinator(load_coordinator_config("coordinator.toml"), stop_after_round=4)
    coord.run()          # returns after round 4 closed and its result was PUBACKed; coord.stop() from another thread
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from coordinator.aggregate import aggregate, late_pairs
from coordinator.checkpoint import (
    checkpoint_path,
    rebuild_values,
    value_chunks,
    write_checkpoint,
)
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor, DriftStats
from coordinator.eventlog import EventLog, PlanRow, ResultRow, UpdateRow
from coordinator.ingest import Reject, check_join, check_update, decode_reject
from coordinator.metrics import Metrics, MetricsServer
from coordinator.scheduler import close_decision, round_seeds, sample_clients
from shared.apply import apply_round, values_checksum
from shared.codec import DecodeError, decode, encode
from shared.config import ConfigError
from shared.fingerprint import fp_tag as make_fp_tag
from shared.maskfile import Mask, load_mask
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
from shared.mqtt import Incoming, MqttLink, read_secret, tls_for
from shared.topics import Topics

log = logging.getLogger(__name__)

BATCH = 512
OFFLINE_CHECK_S = 1.0
JOIN_GRACE_S = 2.0
REJOIN_NAG_S = 10.0
Publish = tuple[str, bytes, int, bool]
INBOUND: dict[str, type[Message]] = {  # topic kind -> the message the coordinator accepts on it
    "up": Update,
    "join": Join,
    "hb": Heartbeat,
    "status": Status,
    "sync": SyncRequest,
}


class StateMismatch(RuntimeError):
    """The state_dir belongs to another run (model, mask, fleet or master seed differ)."""


class Coordinator:
    """In-process coordinator. `run()` blocks until `stop()` or the configured number of rounds closed."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        mask: Mask | None = None,
        initial_values: torch.Tensor | None = None,
        fingerprint: str | None = None,
        stop_after_round: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        problems = (
            config.validate() if mask is None else [p for p in config.validate() if not p.startswith("mask:")]
        )
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.clock = clock
        self.topics = Topics(config.fleet)
        self.mask = mask if mask is not None else load_mask(_need(config.mask, "mask"))
        self.fingerprint = fingerprint or self._model_fingerprint()
        if self.mask.meta.fingerprint != self.fingerprint:
            raise ConfigError(
                [
                    f"mask: built for model {self.mask.meta.fingerprint[:12]}..., fleet model is {self.fingerprint[:12]}..."
                ]
            )
        self.mask_id = self.mask.mask_id
        self.fp_tag = make_fp_tag(self.fingerprint)
        self.nnz = self.mask.nnz
        self.v0 = initial_values if initial_values is not None else self._initial_values()
        if self.v0.dtype != torch.float32 or tuple(self.v0.shape) != (self.nnz,):
            raise ValueError(
                f"initial values must be float32 ({self.nnz},), got {self.v0.dtype} {tuple(self.v0.shape)}"
            )
        targets = [
            x for x in (stop_after_round, config.rounds - 1 if config.rounds else None) if x is not None
        ]
        self.stop_after_round: int | None = min(targets) if targets else None
        self.state_dir = Path(config.state_dir)
        self.log = EventLog(self.state_dir, config.sqlite_synchronous)
        self.metrics = Metrics()
        self.drift = (
            DriftMonitor(grad, config.dist, config.drift_thresholds(), keep_history=False)
            if (grad := self.mask.flat_grad()) is not None
            else None
        )  # owns c_t: GradIP is computed once, stored, and fed to the monitor
        self.drift_on = config.drift_control and self.drift is not None
        if config.drift_control and self.drift is None:
            log.info("drift_control: the mask has no pre-training gradient (grad.*), so MEERKAT-VP is off")
        self._stop = threading.Event()
        self._pending_mids: set[int] = set()
        self._unjoined: dict[str, float] = {}
        self._last_offline_check = 0.0
        self.link: MqttLink | None = None
        self.metrics_server: MetricsServer | None = None
        self._check_meta()
        self.values, self.last_round = self._recover_values()
        self.plan: PlanRow | None = self._recover_plan()
        self._recover_drift()
        self.metrics.current_round.set(self.last_round)

    # -- setup -----------------------------------------------------------------------------------
    def _model_fingerprint(self) -> str:
        if self.config.model_dir is None:
            return self.mask.meta.fingerprint
        from shared.fingerprint import fingerprint_model_dir

        return fingerprint_model_dir(self.config.model_dir)

    def _initial_values(self) -> torch.Tensor:
        from shared.sidecar import initial_values_from_dir

        return initial_values_from_dir(_need(self.config.model_dir, "model_dir"), self.mask.layers)

    def _check_meta(self) -> None:
        want = {
            "fingerprint": self.fingerprint, "mask_id": self.mask_id, "nnz": str(self.nnz),
            "fleet": self.config.fleet, "master_seed": str(self.config.master_seed),
            "v0_checksum": values_checksum(self.v0),
        }  # fmt: skip
        with self.log.transaction():
            for key, value in want.items():
                have = self.log.get_meta(key)
                if have is None:
                    self.log.set_meta(key, value)
                elif have != value:
                    raise StateMismatch(
                        f"{self.state_dir}: logged {key} is {have!r} but this coordinator has {value!r}; "
                        "use a fresh state_dir for a new run"
                    )

    def _recover_values(self) -> tuple[torch.Tensor, int]:
        return rebuild_values(self.log, self.v0, self.mask_id, self.fingerprint)

    def _recover_plan(self) -> PlanRow | None:
        plan = self.log.open_plan()
        if plan is None:
            return None
        if plan.round != self.last_round + 1:
            raise RuntimeError(
                f"open round {plan.round} in the log does not follow the last result {self.last_round}"
            )
        n = len(self.log.updates(round=plan.round, status="accepted"))
        log.info("reopening round %d with %d committed updates", plan.round, n)
        return plan

    def _recover_drift(self) -> None:
        """Flags from the drift table (sticky), GradIP history from the logged updates (no c_t recomputed)."""
        if self.drift is None:
            return
        if self.drift_on:
            for client, r in self.log.limited_clients().items():
                self.drift.restore_limited(client, r)
        now = self.clock()
        with self.log.transaction():
            for client, r, gradip in self.log.gradip_history():
                st = self.drift.observe_gradip(client, r, gradip)
                if st is not None and self.drift_on:  # thresholds changed since the update was logged
                    self._record_limited(client, r, st, now)
        if self.drift_on:
            self.metrics.clients_limited.set(len(self.drift.limited()))
            if self.drift.limited():
                log.info("drift: %d clients limited to 1 local step: %s", len(self.drift.limited()),
                         " ".join(sorted(self.drift.limited())))  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker, start /metrics, republish the retained plan and latest result."""
        c = self.config
        subs = [(self.topics.filter(k), self.topics.qos(k)) for k in INBOUND]
        tls = tls_for(c.broker, c.tls_ca, c.tls_cert, c.tls_key)
        self.link = MqttLink(
            c.broker, c.client_id, subscriptions=subs, manual_ack=True, clean_session=False,
            username=c.username, password=read_secret(c.password_file), tls=tls,
        )
        self.link.start()
        if c.metrics:
            self.metrics_server = MetricsServer(self.metrics, c.metrics_host, c.metrics_port, c.metrics_token)
            self.metrics_server.start()
        if self.last_round >= 0:
            last = self.log.results(after=self.last_round - 1)[0]
            for topic, payload, qos, retain in self._result_publishes(last):
                self._publish(topic, payload, qos, retain)
        if self.plan is not None:
            self._publish_plan(self.plan)

    def stop(self) -> None:
        """Ask `run()` to return (thread-safe)."""
        self._stop.set()

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    def done(self) -> bool:
        return self.stop_after_round is not None and self.last_round >= self.stop_after_round

    def run(self) -> int:
        """Serve until stop() or the target round closed; returns 0 (exceptions propagate)."""
        if self.link is None:
            self.start()
        try:
            while not self._stop.is_set() and not self.done():
                self.step(0.1)
            self._flush(timeout=10.0)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.log.close()

    def _flush(self, timeout: float) -> None:
        """Wait until every QoS1 publish so far is PUBACKed (so a caller that exits loses nothing)."""
        end = time.monotonic() + timeout
        while self._pending_mids and time.monotonic() < end:
            self._drain_published(0.05)
        if self._pending_mids:
            log.warning("%d publishes not acknowledged by the broker at shutdown", len(self._pending_mids))

    # -- one loop iteration ----------------------------------------------------------------------
    def step(self, timeout: float = 0.1) -> None:
        assert self.link is not None, "start() first"
        batch: list[Incoming] = []
        try:
            batch.append(self.link.inbox.get(timeout=timeout))
            while len(batch) < BATCH:
                batch.append(self.link.inbox.get_nowait())
        except queue.Empty:
            pass
        if batch:
            out: list[Publish] = []
            with self.log.transaction():
                for msg in batch:
                    self._handle_safely(msg, out)
            for msg in batch:  # committed: now the broker may forget them
                self.link.ack(msg)
            for pub in out:
                self._publish(*pub)
        self._drain_published(0.0)
        self.tick()

    def _drain_published(self, timeout: float) -> None:
        assert self.link is not None
        try:
            self._pending_mids.discard(
                self.link.published.get(timeout=timeout) if timeout else self.link.published.get_nowait()
            )
            while True:
                self._pending_mids.discard(self.link.published.get_nowait())
        except queue.Empty:
            pass

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert self.link is not None
        mid = self.link.publish(topic, payload, qos, retain)
        if qos > 0:
            self._pending_mids.add(mid)

    # -- ingest ----------------------------------------------------------------------------------
    def _handle_safely(self, msg: Incoming, out: list[Publish]) -> None:
        db = self.log.db
        db.execute("SAVEPOINT msg")
        try:
            self._handle(msg, out)
        except sqlite3.Error:
            raise  # the log itself failed: nothing may be acked
        except Exception as exc:  # a bug in a handler must not take the service down
            db.execute("ROLLBACK TO msg")
            log.exception("internal error handling a message on %s", msg.topic)
            self._reject("?", msg.topic, Reject("internal", ErrorCode.INTERNAL, repr(exc)), out, reply=False)
        db.execute("RELEASE msg")

    def _handle(self, msg: Incoming, out: list[Publish]) -> None:
        now = self.clock()
        try:
            kind, arg = self.topics.parse(msg.topic)
        except ValueError as exc:
            self._reject("?", msg.topic, Reject("bad_topic", ErrorCode.INTERNAL, str(exc)), out, reply=False)
            return
        client = str(arg)
        self.metrics.messages.labels(kind).inc()
        if kind == "status" and not msg.payload:
            return  # a retained status being cleared
        if kind not in INBOUND:
            self._reject(
                client,
                msg.topic,
                Reject("bad_topic", ErrorCode.INTERNAL, f"{kind} is not for the coordinator"),
                out,
                reply=False,
            )
            return
        try:
            m: Message = decode(msg.payload, INBOUND[kind], client=client)
        except DecodeError as exc:
            self._reject(client, msg.topic, decode_reject(exc), out, reply=kind in ("up", "join", "sync"))
            return
        if isinstance(m, Join) or (isinstance(m, Status) and not m.online):
            self._unjoined.pop(client, None)
        else:
            self._note_live(client, now)
        if isinstance(m, Update):
            self._on_update(m, msg.topic, now, out)
        elif isinstance(m, Join):
            self._on_join(m, msg.topic, now, out)
        elif isinstance(m, Heartbeat):
            tele = {k: v for k, v in asdict(m).items() if k != "client"}
            self.log.record_heartbeat(client, tele, now)
        elif isinstance(m, Status):
            self.log.set_online(client, m.online, now)
        elif isinstance(m, SyncRequest):
            self._on_sync(m, msg.topic, now, out)

    def _note_live(self, client: str, now: float) -> None:
        """Remember a live client we have no Join from; `_nag_unjoined` asks it to join after a grace period."""
        if client not in self._unjoined and self.log.client_state(client) not in ("joined", "rejected"):
            self._unjoined[client] = now

    def _nag_unjoined(self, now: float) -> None:
        """A client live for JOIN_GRACE_S without a Join (it joined while we were down) gets
        ErrorMsg(UNKNOWN_CLIENT) and re-sends its Join; asked again every REJOIN_NAG_S until it does."""
        for client, since in list(self._unjoined.items()):
            if now - since < JOIN_GRACE_S:
                continue
            if self.log.client_state(client) in ("joined", "rejected"):
                del self._unjoined[client]
                continue
            log.info("client %s is live but has not joined (since our start): asking it to join", client)
            msg = ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "unknown client: send Join")
            self._publish(self.topics.to(client), encode(msg), 1, False)
            self._unjoined[client] = now + REJOIN_NAG_S - JOIN_GRACE_S

    def _reject(self, client: str, topic: str, rej: Reject, out: list[Publish], reply: bool = True) -> None:
        log.warning(
            "rejected %s from %s: %s (%s)",
            topic.rsplit("/", 2)[-2] if "/" in topic else topic,
            client,
            rej.reason,
            rej.detail,
        )
        self.log.count_reject(rej.reason, client, topic, rej.detail, self.clock())
        self.metrics.rejected.labels(rej.reason).inc()
        if reply and client != "?":
            out.append(
                (
                    self.topics.to(client),
                    encode(ErrorMsg(int(rej.code), f"{rej.reason}: {rej.detail}"[:1000])),
                    1,
                    False,
                )
            )

    def _on_join(self, j: Join, topic: str, now: float, out: list[Publish]) -> None:
        rej = check_join(j, self.fingerprint, self.mask_id)
        self.log.upsert_join(
            j.client, state="rejected" if rej else "joined", reason=rej.reason if rej else "",
            fingerprint=j.fingerprint, mask_id=j.mask_id, n_samples=j.n_samples, budget_gib=j.budget_gib,
            capabilities=dict(j.capabilities), last_round=j.last_round, now=now,
        )  # fmt: skip
        if rej is not None:
            self._reject(j.client, topic, rej, out)
        else:
            log.info("client %s joined (n_samples %d, at round %d)", j.client, j.n_samples, j.last_round)

    def _on_update(self, u: Update, topic: str, now: float, out: list[Publish]) -> None:
        is_open = self.plan is not None and u.round == self.plan.round
        plan = self.plan if is_open else (self.log.get_plan(u.round) if u.round <= self.last_round else None)
        rej = check_update(u, plan, self.fp_tag, self.config.max_abs_grad)
        if rej is not None:
            self._reject(u.client, topic, rej, out)
            return
        have = self.log.find_update(u.client, u.round)
        if have is not None:
            if have[0] == u.msg_id:
                self.metrics.duplicates.inc()
                log.debug("duplicate update %s round %d msg %d ignored", u.client, u.round, u.msg_id)
            else:
                self._reject(
                    u.client,
                    topic,
                    Reject(
                        "conflict",
                        ErrorCode.BAD_UPDATE,
                        f"round {u.round} already has msg {have[0]}; first wins",
                    ),
                    out,
                    reply=False,
                )
            return
        if is_open:
            status = "accepted"
        elif self.config.straggler == "next":
            status = "late"
        else:
            status = "dropped"
        assert plan is not None  # check_update rejects an unplanned round
        gradip = self._gradip(plan, u.grads)
        self.log.insert_update(u.client, u.round, u.msg_id, u.grads, u.n_samples, u.loss, status, now, gradip)
        self.metrics.updates_accepted.labels(status).inc()
        if status == "dropped":
            self._reject(
                u.client,
                topic,
                Reject("late_dropped", ErrorCode.STALE_ROUND, f"round {u.round} already closed"),
                out,
                reply=False,
            )
        elif status == "late":
            self.log.event("late", f"{u.client} round {u.round}: folded into the next result", u.round, now)
        if gradip is not None:
            self._observe_drift(u.client, u.round, gradip, now)  # last: nothing after it can roll back

    def _on_sync(self, s: SyncRequest, topic: str, now: float, out: list[Publish]) -> None:
        self.log.touch(s.client, now)
        out.extend(self.sync_reply(s.client, s.have_round))

    def sync_reply(self, client: str, have_round: int) -> list[Publish]:
        """Replay of the missed results when at most replay_max behind, else the values in chunks."""
        to = self.topics.to(client)
        behind = self.last_round - have_round
        if 0 <= behind <= self.config.replay_max:
            results = tuple(
                self._result_msg(r) for r in self.log.results(after=have_round, upto=self.last_round)
            )
            try:
                return [(to, encode(Replay(results)), 1, False)]
            except ValueError as exc:  # over the payload limit: fall back to a checkpoint
                log.info("replay for %s too large (%s): sending a checkpoint", client, exc)
        checksum = values_checksum(self.values)
        chunks = value_chunks(self.values, self.config.chunk_bytes)
        log.info(
            "sending %s the values of round %d in %d chunks (it has round %d)",
            client,
            self.last_round,
            len(chunks),
            have_round,
        )
        return [
            (to, encode(CheckpointChunk(self.last_round, i, len(chunks), checksum, data)), 1, False)
            for i, data in enumerate(chunks)
        ]

    # -- GradIP (MEERKAT-VP) ---------------------------------------------------------------------
    def _gradip(self, plan: PlanRow, grads: tuple[float, ...]) -> list[float] | None:
        """g_{k,t} * c_t with c_t = <mean pre-training gradient on the mask, z_t>; None without mask grads."""
        if self.drift is None:
            return None
        if plan.dist != self.drift.dist:
            log.warning("round %d ran with dist %s, the drift monitor uses %s: no GradIP", plan.round, plan.dist,
                        self.drift.dist)  # fmt: skip
            return None
        return self.drift.compute_gradip(plan.seeds, grads)

    def _observe_drift(self, client: str, round: int, gradip: list[float], now: float) -> None:
        """Feed the monitor, persist the client's statistics, record a new limit decision."""
        assert self.drift is not None
        flagged = self.drift.observe_gradip(client, round, gradip)
        st = flagged or self.drift.stats(client)
        if st is None:
            self.log.put_drift(client, self.drift.steps_seen(client), None, None, None, None, now)
        else:
            self.log.put_drift(client, st.n_steps, st.early, st.late, st.rho_later, st.rho_quie, now)
        if flagged is not None and self.drift_on:
            self._record_limited(client, round, flagged, now)
            self.metrics.clients_limited.set(len(self.drift.limited()))

    def _record_limited(self, client: str, round: int, st: DriftStats, now: float) -> None:
        """The one log line, event, SQLite flag and counter of a MEERKAT-VP decision (inside a transaction)."""
        nxt = self.last_round + (2 if self.plan is not None else 1)  # the next plan not yet published
        detail = (
            f"client={client} steps=1 from_round={nxt} rho_later={st.rho_later:.3g} "
            f"rho_quie={st.rho_quie:.2f} n_steps={st.n_steps}"
        )
        self.log.set_limited(client, round, now)
        self.log.event("drift_limit", detail, round, now)
        self.metrics.drift_limited.inc()
        log.info("drift_limit %s", detail)

    def _steps_for(self, client: str) -> int:
        """T, or 1 for a client MEERKAT-VP limited (it keeps its data pointer: all its data is still seen)."""
        T = self.config.steps
        return self.drift.steps_for(client, T) if self.drift_on and self.drift is not None else T

    # -- rounds ----------------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        if now - self._last_offline_check >= OFFLINE_CHECK_S:
            self._last_offline_check = now
            with self.log.transaction():
                gone = self.log.mark_offline_before(now - self.config.offline_after_s)
            for c in gone:
                log.info("client %s silent for %.0f s: offline", c, self.config.offline_after_s)
            self.metrics.clients_online.set(self.log.count_online())
            self._nag_unjoined(now)
        if self.plan is None:
            if not self.done():
                self._maybe_open(now)
            return
        plan = self.plan
        reported = self.log.reported_clients(plan.round)
        d = close_decision(
            plan.steps,
            reported,
            now,
            plan.deadline,
            self.config.min_updates,
            plan.extensions,
            self.config.max_extensions,
        )
        if d.action == "close":
            self.close_round(d.reason)
        elif d.action == "extend":
            self._extend(plan, reported, now, d.reason)

    def _maybe_open(self, now: float) -> None:
        c = self.config
        eligible = self.log.eligible_clients(self.fingerprint, self.mask_id)
        if len(eligible) < c.min_clients:
            return
        r = self.last_round + 1
        sampled = sample_clients(eligible, c.clients_per_round, c.master_seed, r)
        plan = PlanRow(
            round=r, state="open", opened_at=now, deadline=now + c.round_deadline_s,
            seeds=round_seeds(c.master_seed, r, c.steps), steps={k: self._steps_for(k) for k in sampled},
            lr=c.lr, eps=c.eps, dist=c.dist, batch_size=c.batch_size, base_round=r - 1,
            base_checksum=values_checksum(self.values), extensions=0,
        )  # fmt: skip
        with self.log.transaction():
            self.log.insert_plan(plan)
            self.log.event("open", f"{len(sampled)} of {len(eligible)} online clients sampled", r, now)
        self.plan = plan
        self.metrics.round_open.set(1)
        log.info(
            "round %d open: %d clients x %d steps (%d limited to 1 by MEERKAT-VP), deadline in %.0f s",
            r,
            len(sampled),
            c.steps,
            sum(1 for t in plan.steps.values() if t < c.steps),
            c.round_deadline_s,
        )
        self._publish_plan(plan)

    def _extend(self, plan: PlanRow, reported: list[str], now: float, why: str) -> None:
        c = self.config
        eligible = self.log.eligible_clients(self.fingerprint, self.mask_id)
        want = max(c.min_updates - len(reported), 0) if c.clients_per_round else len(eligible)
        extra = sample_clients(
            eligible, want, c.master_seed, plan.round, plan.extensions + 1, exclude=plan.steps
        )
        steps = {**plan.steps, **{k: self._steps_for(k) for k in extra}}
        new = PlanRow(
            **{
                **asdict(plan),
                "steps": steps,
                "deadline": now + c.round_deadline_s,
                "extensions": plan.extensions + 1,
            }
        )
        with self.log.transaction():
            self.log.replan(plan.round, steps, new.deadline, new.extensions)
            self.log.event("extend", f"{why}; added {extra}", plan.round, now)
        self.plan = new
        log.warning(
            "round %d: %s; deadline extended (%d), added %d clients",
            plan.round,
            why,
            new.extensions,
            len(extra),
        )
        self._publish_plan(new)

    def close_round(self, why: str = "") -> RoundResult:
        """Aggregate the open round's committed updates (+ pending late ones), apply, log, publish."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("close_round: no round is open")
        c, now = self.config, self.clock()
        ups = self.log.updates(round=plan.round, status="accepted")
        late = (
            [u for u in self.log.updates(status="late") if u.round < plan.round]
            if c.straggler == "next"
            else []
        )
        if not ups:
            raise RuntimeError(f"close_round: round {plan.round} has no update")
        seeds, scalars = self._combine(plan, ups, late)
        new_values = apply_round(self.values, seeds, scalars, plan.lr, plan.dist)
        checksum = values_checksum(new_values)
        row = ResultRow(plan.round, tuple(seeds), tuple(scalars), plan.lr, plan.dist, len(ups) + len(late),
                        checksum, now, now - plan.opened_at)  # fmt: skip
        with self.log.transaction():
            self.log.insert_result(row)
            self.log.mark_used([(u.client, u.round) for u in ups], plan.round, "accepted")
            self.log.mark_used([(u.client, u.round) for u in late], plan.round, "folded")
            self.log.event("close", f"{why}; {len(ups)} updates + {len(late)} late", plan.round, now)
        self.values, self.last_round, self.plan = new_values, plan.round, None
        self.metrics.rounds_closed.inc()
        self.metrics.current_round.set(plan.round)
        self.metrics.round_open.set(0)
        self.metrics.round_duration.observe(row.duration_s)
        loss = math.fsum(u.loss for u in ups) / len(ups)
        log.info(
            "round %d closed (%s): %d updates, %d late, mean loss %.4f, checksum %s",
            plan.round,
            why,
            len(ups),
            len(late),
            loss,
            checksum[:12],
        )
        for pub in self._result_publishes(row):
            self._publish(*pub)
        if (plan.round + 1) % c.checkpoint_every == 0:
            self.write_checkpoint()
        return self._result_msg(row)

    def _combine(
        self, plan: PlanRow, ups: list[UpdateRow], late: list[UpdateRow]
    ) -> tuple[list[int], list[float]]:
        """Seeds and scalars of the result: the round's aggregate plus late updates of older rounds."""
        c, T = self.config, len(plan.seeds)
        per = {u.client: list(u.grads) for u in ups}
        n = {u.client: u.n_samples for u in ups}
        G = aggregate(c.aggregation, per, n, T, clip_norm=c.clip_norm, trim_fraction=c.trim_fraction)
        seeds, scalars = list(plan.seeds), G
        if late:
            total = math.fsum(float(u.n_samples) for u in ups + late)
            on_time = math.fsum(float(u.n_samples) for u in ups) / total
            scalars = [g * on_time for g in G]
            for r in sorted({u.round for u in late}):
                group = [u for u in late if u.round == r]
                old = self.log.get_plan(r)
                assert old is not None
                share = math.fsum(float(u.n_samples) for u in group) / total
                s, g = late_pairs(
                    {u.client: list(u.grads) for u in group},
                    {u.client: u.n_samples for u in group},
                    old.seeds,
                    share,
                )
                seeds += s
                scalars += g
        return seeds, scalars

    def write_checkpoint(self) -> Path:
        path = checkpoint_path(self.state_dir, self.last_round)
        checksum = write_checkpoint(path, self.last_round, self.values, self.mask_id, self.fingerprint)
        now = self.clock()
        with self.log.transaction():
            self.log.add_checkpoint(self.last_round, str(path), checksum, now)
            old = self.log.checkpoints()[self.config.keep_checkpoints :]
            for round, _p, _ in old:
                self.log.remove_checkpoint(round)
        for _, p, _ in old:
            Path(p).unlink(missing_ok=True)
        log.info("checkpoint of round %d written: %s", self.last_round, path)
        return path

    # -- messages out ----------------------------------------------------------------------------
    def _plan_msg(self, p: PlanRow) -> RoundPlan:
        return RoundPlan(
            fleet=self.config.fleet, round=p.round, seeds=p.seeds, lr=p.lr, eps=p.eps, dist=p.dist, steps=p.steps,
            base_round=p.base_round, deadline=p.deadline, fingerprint=self.fingerprint, mask_id=self.mask_id,
            batch_size=p.batch_size, values_checksum=p.base_checksum,
        )  # fmt: skip

    def _publish_plan(self, p: PlanRow) -> None:
        self._publish(self.topics.plan, encode(self._plan_msg(p)), 1, True)

    @staticmethod
    def _result_msg(r: ResultRow) -> RoundResult:
        return RoundResult(r.round, r.seeds, r.scalars, r.lr, r.dist, r.n_clients, r.values_checksum)

    def _result_publishes(self, r: ResultRow) -> list[Publish]:
        payload = encode(self._result_msg(r))
        return [
            (self.topics.result(r.round), payload, 1, False),
            (self.topics.result_latest, payload, 1, True),
        ]


def _need(value: Path | None, key: str) -> Path:
    if value is None:
        raise ConfigError([f"{key}: required"])
    return value
