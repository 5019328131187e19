"""The coordinator service: a pump between the MQTT link, the round book and the event log.

All round rules live in `coordinator/rounds.py` (`RoundBook`); this module only moves bytes. One thread
owns everything (the MQTT link only fills queues). A loop iteration:
  1. drain up to `BATCH` incoming messages: parse the topic (the client id comes from it), decode, feed
     each to the book; persist every record the book returned in ONE SQLite transaction, COMMIT, then
     ack the messages (paho manual ack), and only then publish what the book asked for;
  2. `book.tick(now)`: offline marking, the join nag, open / extend / close the round; same order
     (commit, then publish, then write a checkpoint when asked).

Restart after kill -9: `coordinator/recovery.py` reads what the book needs from the log (values =
newest verified checkpoint + replay of the logged results; an open round with its committed updates).
An update acked before the crash is in the log; one delivered but not acked is re-delivered by the
broker and deduped on (client, round).

    coord = Coordinator(load_coordinator_config("coordinator.toml"), stop_after_round=4)
    coord.run()          # returns after round 4 closed and its result was PUBACKed; coord.stop() from another thread
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from coordinator.checkpoint import checkpoint_path, write_checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.dashboard import pages as dashboard_pages
from coordinator.drift import DriftMonitor
from coordinator.evaluator import CoordinatorEvaluator
from coordinator.eventlog import EventLog
from coordinator.ingest import Reject, decode_reject
from coordinator.metrics import Metrics, MetricsServer
from coordinator.records import (
    DuplicateRecord,
    HeartbeatRecord,
    JoinRecord,
    LimitRecord,
    OfflineRecord,
    OnlineRecord,
    PlanRecord,
    PlanRow,
    Record,
    RejectRecord,
    ResultRecord,
    UpdateRecord,
)
from coordinator.recovery import recover
from coordinator.retention import retention_bounds
from coordinator.rounds import Action, Dropped, Duplicate, Persist, Publish, RoundBook, WriteCheckpoint
from shared.apply import values_checksum
from shared.codec import DecodeError, decode, encode
from shared.config import ConfigError
from shared.maskfile import Mask, load_mask
from shared.messages import (
    ErrorCode,
    Heartbeat,
    Join,
    Message,
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
ALIVE_EVERY_S = 2.0  # how often the pump writes its liveness (meta alive_at) for `meerkat status`
HB_FLUSH_S = 2.0  # heartbeats are written at most this late (telemetry, last seen; see _defer_heartbeats)
INBOUND: dict[str, type[Message]] = {  # topic kind -> the message the coordinator accepts on it
    "up": Update,
    "join": Join,
    "hb": Heartbeat,
    "status": Status,
    "sync": SyncRequest,
}
NO_RETAIN = frozenset({"up", "join", "hb", "sync"})  # a retained message here is dropped unread (status is retained by design)


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
        self.log = EventLog(self.state_dir, config.sqlite_synchronous, event_log=config.event_log)
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._pending_mids: set[int] = set()
        self._heartbeats: dict[str, HeartbeatRecord] = {}  # newest per client, not yet written (_defer_heartbeats)
        self._hb_written: dict[str, Any] = {}  # client -> eval_round of its last written heartbeat (this process)
        self._hb_flushed = time.monotonic()
        self._children: dict[tuple[int, str], Any] = {}  # (id(metric), label) -> metric.labels(label) (_add)
        self._tally: dict[tuple[int, str], float] = {}  # labelled increments not yet applied (_add, _apply_tally)
        self._seen_connects = 0  # link connects the book has been told about (reconnected())
        self._alive_at = -float("inf")  # last liveness write (the coordinator's clock)
        self.link: MqttLink | None = None
        self.metrics_server: MetricsServer | None = None
        self._check_meta()
        self.book = RoundBook.from_config(
            config, self.mask, fingerprint=self.fingerprint, values=self.v0, stop_after_round=self.stop_after_round,
            recovered=recover(self.log, self.v0, self.mask_id, self.fingerprint, config.replay_max),
        )  # fmt: skip
        self.metrics.current_round.set(self.book.last_round)
        self.evaluator = CoordinatorEvaluator(config, self.mask, self.fingerprint) if config.eval_data else None
        self._eval_round: int | None = None  # a closed round the evaluator has not seen yet
        if self.book.vp_limited():
            log.info("drift: %d clients limited to 1 local step: %s", len(self.book.vp_limited()),
                     " ".join(sorted(self.book.vp_limited())))  # fmt: skip

    # the book's state, for callers that held it on the Coordinator
    @property
    def values(self) -> torch.Tensor:
        return self.book.values

    @property
    def last_round(self) -> int:
        return self.book.last_round

    @property
    def plan(self) -> PlanRow | None:
        return self.book.plan

    @property
    def drift(self) -> DriftMonitor | None:
        return self.book.drift

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

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, link: MqttLink | None = None) -> None:
        """Connect to the broker, start /metrics, republish the retained plan and latest result. `link`: a
        started link to use instead (a cluster worker's, coordinator/workers.py: it drains the inbox itself)."""
        c = self.config
        if link is None:
            subs = [(self.topics.filter(k), self.topics.qos(k)) for k in INBOUND]
            tls = tls_for(c.broker, c.tls_ca, c.tls_cert, c.tls_key)
            link = MqttLink(
                c.broker, c.client_id, subscriptions=subs, manual_ack=True, clean_session=False,
                username=c.username, password=read_secret(c.password_file), tls=tls,
            )
            link.start()
        self.link = link
        if c.metrics:
            self.metrics.watch_fleet(self.state_dir, c.metrics_per_device, c.event_log)
            pages = dashboard_pages(self.state_dir, self.metrics.bytes_totals, c.event_log) if c.dashboard else None
            self.metrics_server = MetricsServer(self.metrics, c.metrics_host, c.metrics_port, c.metrics_token, pages=pages)
            self.metrics_server.start()
        self._carry_out(self.book.start(self.clock()))

    def stop(self) -> None:
        """Ask `run()` to return (thread-safe)."""
        self._stop.set()

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    def done(self) -> bool:
        return self.book.done()

    def run(self) -> int:
        """Serve until stop() or the target round closed; returns 0 (exceptions propagate)."""
        if self.link is None:
            self.start()
        try:
            while not self._stop.is_set() and not self.done():
                self.step(0.1)
            self._flush(timeout=10.0)
            self.flush_heartbeats()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None
            self._beat(self.clock(), stopped=True)  # a clean stop: status says "stopped", not "not seen"
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
        self._check_reconnect()
        batch = take_batch(self.link.inbox, timeout)
        if batch:
            acts: list[Action] = []
            for msg in batch:
                acts += self._feed(msg)
            self._carry_out(acts, acks=batch)
        self._drain_published(0.0)
        self.tick()
        if self._heartbeats and time.monotonic() - self._hb_flushed >= HB_FLUSH_S:
            self.flush_heartbeats()  # a quiet fleet: no other write to carry them

    def _check_reconnect(self) -> None:
        """After each (re)connect + SUBACK of our link: the book re-publishes the open plan, so devices
        re-send Updates a broker that lost our session forgot (docs/PROTOCOL.md "Delivery"). `connected`
        is set only after the SUBACK, so the re-sends find our subscriptions in place."""
        assert self.link is not None
        if self.link.connected.is_set() and self.link.connect_count != self._seen_connects:
            self._seen_connects = self.link.connect_count
            log.info("link to the broker up (connect #%d): re-publishing the open plan", self._seen_connects)
            self._carry_out(self.book.reconnected(self.clock()))

    def lead_step(self, acts: Sequence[Action], meta: dict[str, str]) -> None:
        """A cluster leader's loop iteration (coordinator/workers.py): `acts` are the book's answers to a
        batch of the PostgreSQL inbox; they are persisted with `meta` (the inbox position) in ONE
        transaction, then published (no MQTT acks: workers ack after writing the inbox); then as step()."""
        self._check_reconnect()
        self._carry_out(acts, meta=meta)
        self._drain_published(0.0)
        self.tick()
        if self._heartbeats and time.monotonic() - self._hb_flushed >= HB_FLUSH_S:
            self.flush_heartbeats()

    def republish(self) -> None:
        """Re-publish the latest result and the open plan as after a reconnect (book.reconnected)."""
        self._carry_out(self.book.reconnected(self.clock()))

    def tick(self) -> None:
        now = self.clock()
        self._carry_out(self.book.tick(now))
        self._beat(now)

    def _beat(self, now: float, stopped: bool = False) -> None:
        """Liveness for `meerkat status` (meta alive_at, one small transaction every ALIVE_EVERY_S)."""
        if stopped or not self._alive_at <= now < self._alive_at + ALIVE_EVERY_S:
            with self.log.transaction():
                self.log.beat(now, stopped=stopped)
            self._alive_at = now

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
        self._add(self.metrics.bytes_sent, self.topics.parse(topic)[0], len(payload))
        if qos > 0:
            self._pending_mids.add(mid)

    # -- in: topic -> decoded message -> the book --------------------------------------------------
    def _feed(self, msg: Incoming) -> list[Action]:
        """The book's actions for one incoming message; a failure to parse or decode is a counted reject."""
        now = self.clock()
        try:
            kind, arg = self.topics.parse(msg.topic)
        except ValueError as exc:
            return self.book.on_reject("?", msg.topic, Reject("bad_topic", ErrorCode.INTERNAL, str(exc)), now, False)
        client = str(arg)
        self._add(self.metrics.messages, kind)
        self._add(self.metrics.bytes_received, kind, len(msg.payload))
        if kind == "status" and not msg.payload:
            return []  # a retained status being cleared
        if kind not in INBOUND:
            rej = Reject("bad_topic", ErrorCode.INTERNAL, f"{kind} is not for the coordinator")
            return self.book.on_reject(client, kind, rej, now, reply=False)
        if msg.retain and kind in NO_RETAIN:
            # delivered because we (re)subscribed: a device parked it retained, e.g. a bomb that would
            # otherwise be decoded again at every restart. Never a legitimate message: drop it unread.
            log.warning("retained message on %s dropped unread (%d bytes)", msg.topic, len(msg.payload))
            return [Dropped(client, kind, "retained")]
        try:
            m: Message = decode(msg.payload, INBOUND[kind], client=client)
        except DecodeError as exc:
            return self.book.on_reject(client, kind, decode_reject(exc), now, reply=kind in ("up", "join", "sync"))
        try:
            return self.book.handle(m, now)
        except Exception as exc:  # a bug in the book must not take the service down
            log.exception("internal error handling a message on %s", msg.topic)
            return self.book.on_reject(client, kind, Reject("internal", ErrorCode.INTERNAL, repr(exc)), now, False)

    # -- out: commit, ack, publish -----------------------------------------------------------------
    def _carry_out(
        self, acts: Sequence[Action], acks: Sequence[Incoming] = (), meta: dict[str, str] | None = None
    ) -> None:
        """Persist the records (and `meta` keys) in one transaction, THEN ack, THEN publish / checkpoint, in
        the book's order."""
        if not acts and not acks and not meta:
            self._apply_tally()
            return
        records = [a.record for a in acts if isinstance(a, Persist)]
        # a duplicate's per-round counter (`meerkat status`) is durable with the batch that acks it
        records += [DuplicateRecord(a.round) for a in acts if isinstance(a, Duplicate)]
        writes = self._defer_heartbeats(records)
        if writes or meta:
            with self.log.transaction():
                self.log.persist_many(writes)
                for key, value in (meta or {}).items():
                    self.log.set_meta(key, value)
        if acks:
            assert self.link is not None
            for msg in acks:  # committed: now the broker may forget them
                self.link.ack(msg)
        for rec in records:
            self._count(rec)
        for a in acts:
            if isinstance(a, Publish):
                self._send(a)
            elif isinstance(a, WriteCheckpoint):
                self._write_checkpoint(a.round, a.values)
            elif isinstance(a, Duplicate):
                self.metrics.duplicates.inc()
            elif isinstance(a, Dropped):
                self._add(self.metrics.dropped, a.reason)
        self.metrics.clients_online.set(self.book.n_online())
        self.metrics.clients_limited.set(len(self.book.vp_limited()))
        if self._eval_round is not None:
            self._evaluate(self._eval_round)
        self._apply_tally()

    def _defer_heartbeats(self, records: list[Record]) -> list[Record]:
        """Heartbeats (QoS 0, 667/s at 10,000 devices) are not written one by one: the newest per client
        waits here and goes out with the next write after HB_FLUSH_S, or AHEAD of any record that sets a
        client's online state (Join, Status, offline marking), so the log's final state is what writing
        each in order gives (the heartbeat SQL never moves seen_at back). A device's first heartbeat and
        a heartbeat with a new evaluation are written at once. A kill -9 loses at most HB_FLUSH_S of telemetry and last-seen times, nothing a
        round or an update depends on."""
        now = time.monotonic()
        out: list[Record] = []
        for rec in records:
            if isinstance(rec, HeartbeatRecord):
                ev = rec.telemetry.get("eval_round")
                if rec.client not in self._hb_written or (ev is not None and self._hb_written[rec.client] != ev):
                    # a device's first telemetry, and each new evaluation (rare: every eval_every rounds), are
                    # written at once: the newest-wins deferral below would drop an evaluation point
                    self._hb_written[rec.client] = ev
                    self._heartbeats.pop(rec.client, None)
                    out.append(rec)
                    continue
            if isinstance(rec, HeartbeatRecord):
                self._heartbeats.pop(rec.client, None)  # re-insert: flush order = order of the newest beat
                self._heartbeats[rec.client] = rec
                continue
            if isinstance(rec, (JoinRecord, OnlineRecord, OfflineRecord)) and self._heartbeats:
                out += self._heartbeats.values()
                self._heartbeats = {}
            out.append(rec)
        if self._heartbeats and (now - self._hb_flushed >= HB_FLUSH_S or self._stop.is_set()):
            out += self._heartbeats.values()
            self._heartbeats = {}
        if not self._heartbeats:
            self._hb_flushed = now
        return out

    def flush_heartbeats(self) -> None:
        """Write the heartbeats still held (run() does this before it returns)."""
        if self._heartbeats:
            with self.log.transaction():
                self.log.persist_many(list(self._heartbeats.values()))
            self._heartbeats = {}
        self._hb_flushed = time.monotonic()

    def _count(self, rec: Record) -> None:
        m = self.metrics
        if isinstance(rec, UpdateRecord):  # the common one first
            self._add(m.updates_accepted, rec.update.status)
        elif isinstance(rec, RejectRecord):
            self._add(m.rejected, rec.reason)
        elif isinstance(rec, PlanRecord):
            m.round_open.set(1)
        elif isinstance(rec, ResultRecord):
            m.rounds_closed.inc()
            m.current_round.set(rec.result.round)
            m.round_open.set(0)
            m.round_duration.observe(rec.result.duration_s)
            if self.evaluator is not None and self.evaluator.due(rec.result.round):
                self._eval_round = rec.result.round
        elif isinstance(rec, LimitRecord):
            m.drift_limited.inc()

    def _add(self, metric: Any, label: str, amount: float = 1.0) -> None:
        """metric.labels(label).inc(amount), applied by `_apply_tally` at the end of the batch (`_carry_out`):
        one inc per (metric, label) and batch instead of ~3 per message (labels() validates and locks, inc
        locks). The labels are topic kinds, statuses and reject/drop reasons: a small fixed set, so the
        children are cached. The totals are the same (whole numbers, exact in a float)."""
        key = (id(metric), label)
        if key not in self._children:
            self._children[key] = metric.labels(label)
        self._tally[key] = self._tally.get(key, 0.0) + amount

    def _apply_tally(self) -> None:
        for key, amount in self._tally.items():
            self._children[key].inc(amount)
        self._tally.clear()

    def _send(self, p: Publish) -> None:
        """A plan retained on `plan`; a result on `result/{r}` and retained on `result/latest`; else `to/{c}`."""
        payload = encode(p.message)
        if p.to is not None:
            self._publish(self.topics.to(p.to), payload, 1, False)
        elif isinstance(p.message, RoundPlan):
            self._publish(self.topics.plan, payload, 1, True)
        elif isinstance(p.message, RoundResult):
            self._publish(self.topics.result(p.message.round), payload, 1, False)
            self._publish(self.topics.result_latest, payload, 1, True)
        else:
            raise TypeError(f"cannot broadcast a {type(p.message).__name__}")

    def _evaluate(self, round: int) -> None:
        """The coordinator's own evaluation of the values after `round` (committed + published already)."""
        self._eval_round = None
        assert self.evaluator is not None
        if round != self.book.last_round:
            return  # the values of that round are gone (a later round closed in the same batch)
        t0 = time.perf_counter()
        try:
            rec = self.evaluator.evaluate(round, self.book.values, self.clock())
        except Exception:  # a broken eval set must not stop the fleet
            log.exception("eval after round %d failed", round)
            return
        self.metrics.eval_seconds.observe(time.perf_counter() - t0)
        self._carry_out([Persist(rec)])

    # -- direct calls (tests, tools) ---------------------------------------------------------------
    def close_round(self, why: str = "") -> RoundResult:
        """Close the open round now (whatever the deadline says); returns its result."""
        acts = self.book.close_round(self.clock(), why)
        self._carry_out(acts)
        return next(a.message for a in acts if isinstance(a, Publish) and isinstance(a.message, RoundResult))

    def sync_reply(self, client: str, have_round: int) -> list[Publish]:
        """What the book answers a SyncRequest(have_round): a Replay or checkpoint chunks, for `to/{client}`."""
        return [a for a in self.book.sync_reply(client, have_round) if isinstance(a, Publish)]

    def write_checkpoint(self) -> Path:
        return self._write_checkpoint(self.book.last_round, self.book.values)

    def _write_checkpoint(self, round: int, values: torch.Tensor) -> Path:
        path = checkpoint_path(self.state_dir, round)
        checksum = write_checkpoint(path, round, values, self.mask_id, self.fingerprint)
        now = self.clock()
        with self.log.transaction():
            self.log.add_checkpoint(round, str(path), checksum, now)
            old = self.log.checkpoints()[self.config.keep_checkpoints :]
            for r, _p, _ in old:
                self.log.remove_checkpoint(r)
        for _, p, _ in old:
            Path(p).unlink(missing_ok=True)
        log.info("checkpoint of round %d written: %s", round, path)
        if self.config.retain_rounds:
            self.prune(round)
        return path

    def prune(self, last_round: int) -> dict[str, int]:
        """Retention (at each checkpoint): drop what recovery and the audit window of retain_rounds no
        longer need, so a long run's disk stays flat (docs/COORDINATOR.md "Retention")."""
        c = self.config
        ckpts = [r for r, _, _ in self.log.checkpoints()]
        before, results_before = retention_bounds(last_round, c.retain_rounds, c.replay_max, ckpts)
        if before <= 0 and results_before <= 0:
            return {}
        with self.log.transaction():
            gone = self.log.prune(before, results_before, c.drift_window)
        log.info("retention: pruned rounds < %d (results < %d): %s", before, results_before,
                 " ".join(f"{k}={v}" for k, v in gone.items()))  # fmt: skip
        return gone


def take_batch(inbox: queue.Queue[Incoming], timeout: float) -> list[Incoming]:
    """Up to BATCH messages: wait up to `timeout` for the first, then take what is already there."""
    batch: list[Incoming] = []
    try:
        batch.append(inbox.get(timeout=timeout))
        while len(batch) < BATCH:
            batch.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return batch


def _need(value: Path | None, key: str) -> Path:
    if value is None:
        raise ConfigError([f"{key}: required"])
    return value
