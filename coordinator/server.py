"""The coordinator service: a pump between the MQTT link, the round book and the event log.

All round rules live in `coordinator/rounds.py` (`RoundBook`); this module only moves bytes. One thread
owns everything (the MQTT link only fills queues). A loop iteration:
  1. drain up to `BATCH` incoming messages: the intake decision of each (coordinator/intake.py: parse,
     drop, decode), fed to the book; persist every record the book returned in ONE SQLite transaction, COMMIT, then
     ack the messages (paho manual ack), and only then publish what the book asked for;
  2. `book.tick(now)`: offline marking, the join nag, open / extend / close the round; same order
     (commit, then publish, then write a checkpoint when asked).

Restart after kill -9: `coordinator/recovery.py` rebuilds the book from the log. An update acked before
the crash is in the log; one delivered but not acked is re-delivered and deduped on (client, round).

    coord = Coordinator(load_coordinator_config("coordinator.toml"), stop_after_round=4)
    coord.run()          # returns after round 4 closed and its result was PUBACKed; coord.stop() from another thread
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from coordinator.actions import Action, Dropped, Duplicate, Persist, Publish, WriteCheckpoint
from coordinator.checkpoint import keep_checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.dashboard import pages as dashboard_pages
from coordinator.evaluator import CoordinatorEvaluator
from coordinator.eventlog import EventLog
from coordinator.heartbeats import HeartbeatBuffer
from coordinator.intake import Decision, admit, clear_topic, feed
from coordinator.lifecycle import RunLifecycle, take_stop
from coordinator.links import SETTLE_S, connect_links, take_batch
from coordinator.metrics import Metrics, MetricsServer
from coordinator.publisher import Publisher
from coordinator.records import DuplicateRecord, PlanRow, ResultRecord
from coordinator.recovery import StateMismatch as StateMismatch
from coordinator.recovery import check_meta, recover
from coordinator.report import write_run_report
from coordinator.retention import prune_log
from coordinator.rounds import RoundBook
from coordinator.tally import Tally
from shared.apply import values_checksum
from shared.config import ConfigError
from shared.fingerprint import fingerprint_model_dir
from shared.maskfile import Mask, load_mask
from shared.messages import RoundResult
from shared.mqtt import Incoming, MqttLink
from shared.sidecar import initial_values_from_dir
from shared.topics import Topics

log = logging.getLogger(__name__)

ALIVE_EVERY_S = 2.0  # how often the pump writes its liveness (meta alive_at) for `meerkat status`


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
        problems = [p for p in config.validate() if mask is None or not p.startswith("mask:")]
        if problems:
            raise ConfigError(problems)
        self.config, self.clock = config, clock
        self.topics = Topics(config.fleet)
        self.mask = mask if mask is not None else load_mask(_need(config.mask, "mask"))
        md = config.model_dir
        self.fingerprint = fingerprint or (self.mask.meta.fingerprint if md is None else fingerprint_model_dir(md))
        if self.mask.meta.fingerprint != self.fingerprint:
            raise ConfigError([f"mask: built for model {self.mask.meta.fingerprint[:12]}..., fleet model is "
                               f"{self.fingerprint[:12]}..."])  # fmt: skip
        self.mask_id = self.mask.mask_id
        self.nnz = self.mask.nnz
        self.v0 = initial_values_from_dir(_need(md, "model_dir"), self.mask.layers) if initial_values is None else initial_values
        if self.v0.dtype != torch.float32 or tuple(self.v0.shape) != (self.nnz,):
            raise ValueError(f"initial values must be float32 ({self.nnz},), got {self.v0.dtype} {tuple(self.v0.shape)}")
        targets = [x for x in (stop_after_round, config.rounds - 1 if config.rounds else None) if x is not None]
        self.stop_after_round: int | None = min(targets) if targets else None
        self.state_dir = Path(config.state_dir)
        self.log = EventLog(self.state_dir, config.sqlite_synchronous, event_log=config.event_log)
        self.metrics = Metrics()
        self._stop = threading.Event()
        self.heartbeats = HeartbeatBuffer()
        self.tally = Tally(self.metrics)
        self.out = Publisher(self.topics, self.tally, self.metrics)
        self._seen_connects = 0  # link connects the book has been told about (reconnected())
        self._alive_at = -float("inf")  # last liveness write (the coordinator's clock)
        self._took_at = 0.0  # time.monotonic() of the last batch taken (coordinator/links.py SETTLE_S)
        self.link: MqttLink | None = None
        self.tele_link: MqttLink | None = None  # heartbeats only (telemetry_link)
        self.metrics_server: MetricsServer | None = None
        check_meta(self.log, self.state_dir, {
            "fingerprint": self.fingerprint, "mask_id": self.mask_id, "nnz": str(self.nnz),
            "fleet": config.fleet, "master_seed": str(config.master_seed), "v0_checksum": values_checksum(self.v0),
        })  # fmt: skip
        try:  # an ended run is not started again (RunOver: `meerkat coordinator` says so and exits 0)
            self.life = RunLifecycle.load(self.log.views.meta(), self.stop_after_round)
        except Exception:
            self.log.close()
            raise
        self.ended = False  # the run ended in this process (finished or stopped): run() writes the report
        self.book = RoundBook.from_config(
            config, self.mask, fingerprint=self.fingerprint, values=self.v0, stop_after_round=self.stop_after_round,
            recovered=recover(self.log, self.v0, self.mask_id, self.fingerprint, config.replay_max),
        )  # fmt: skip
        self.metrics.current_round.set(self.book.last_round)
        self.evaluator = CoordinatorEvaluator(config, self.mask, self.fingerprint) if config.eval_data else None
        self._eval_round: int | None = None  # a closed round the evaluator has not seen yet
        if self.book.vp.limited():
            log.info("drift: %d clients limited to 1 local step: %s", len(self.book.vp.limited()),
                     " ".join(sorted(self.book.vp.limited())))  # fmt: skip

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

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, link: MqttLink | None = None) -> None:
        """Start /metrics, connect to the broker, republish the retained plan and latest result. `link`: a
        started link to use instead (a cluster worker's, coordinator/workers.py: it drains the inbox itself).
        /metrics first: a taken port (PortInUse, exit 9) stops the start before anything is connected."""
        c = self.config
        if c.metrics:
            self.metrics.watch_fleet(self.state_dir, c.metrics_per_device, c.event_log)
            pages = dashboard_pages(self.state_dir, self.metrics.bytes_totals, c.event_log) if c.dashboard else None
            self.metrics_server = MetricsServer(self.metrics, c.metrics_host, c.metrics_port, c.metrics_token, pages=pages)
            self.metrics_server.start()
        if link is None:
            link, self.tele_link = connect_links(c, self.topics)
        self.link = self.out.link = link
        now = self.clock()
        state, meta = self.life.begin(self.book, now)  # the book stops after the target round (config or a stop)
        self.stop_after_round = self.book.stop_after_round
        self._carry_out([*self.book.start(now), Publish(state)], meta=meta)
        if self.evaluator is not None and self.book.last_round == -1:
            self._evaluate(-1)  # the baseline: v_0, before round 0 (the dashboard and the report mark it)

    def stop(self) -> None:
        """Ask `run()` to return (thread-safe)."""
        self._stop.set()

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    def done(self) -> bool:
        return self.book.done()

    def run(self) -> int:
        """Serve until stop() or the run ended (the target round closed: the configured count or `meerkat
        stop`); returns 0 (exceptions propagate). An ended run is told to the fleet (retained RunState) and
        its report written (coordinator/report.py)."""
        if self.link is None:
            self.start()
        try:
            while not self._stop.is_set() and not self.done():
                self.step(0.1)
            if self.done():
                self.end_run()
            self.drain()
        finally:
            self.close()
        if self.ended and self.config.report:
            write_run_report(self.state_dir, self.config.event_log)
        return 0

    def end_run(self) -> None:
        """The book is done: the run is finished (round count) or stopped (`meerkat stop`), persisted and
        published retained on `run` (devices idle on it)."""
        state, meta = self.life.end(self.book, self.clock())
        self._carry_out([Publish(state)], meta=meta)
        self.ended = True
        log.info("run %s after round %d (%s); the fleet is told on %s", state.state, state.last_round,
                 state.reason, self.topics.run)  # fmt: skip

    def close(self) -> None:
        if self.tele_link is not None:
            self.tele_link.stop()
            self.tele_link = None
        if self.link is not None:
            self.link.stop()
            self.link = self.out.link = None
            self._beat(self.clock(), stopped=True)  # a clean stop: status says "stopped", not "not seen"
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.log.close()

    def drain(self, timeout: float = 10.0) -> None:
        """Before exiting: the held heartbeats written, and every QoS1 publish so far PUBACKed (or `timeout`)."""
        self.flush_heartbeats()
        self.out.wait(timeout)

    # -- one loop iteration ----------------------------------------------------------------------
    def step(self, timeout: float = 0.1) -> None:
        assert self.link is not None, "start() first"
        self._check_reconnect()
        batch = take_batch(self.link.inbox, timeout, self._took_at + SETTLE_S)
        self._took_at = time.monotonic()
        self.tally.gate(self.link.inbox)
        acts: list[Action] = []
        for msg in batch:
            acts += self.feed(admit(self.topics, msg))
        self.advance(acts, acks=batch)

    def _check_reconnect(self) -> None:
        """After each (re)connect + SUBACK of our link: the book re-publishes the open plan, so devices
        re-send Updates a broker that lost our session forgot (docs/PROTOCOL.md "Delivery"). `connected`
        is set only after the SUBACK, so the re-sends find our subscriptions in place."""
        assert self.link is not None
        if self.link.connected.is_set() and self.link.connect_count != self._seen_connects:
            self._seen_connects = self.link.connect_count
            log.info("link to the broker up (connect #%d): re-publishing the open plan", self._seen_connects)
            self._carry_out(self.book.reconnected(self.clock()))

    def advance(self, acts: Sequence[Action], acks: Sequence[Incoming] = (), meta: dict[str, str] | None = None) -> None:
        """The end of every loop iteration: `acts` (the book's answers to a batch) persisted with `meta` (a
        cluster leader's inbox position, coordinator/workers.py) in ONE transaction, THEN `acks` acked, THEN
        published; PUBACKs collected; the clock ticked."""
        self._check_reconnect()
        self._carry_out(acts, acks=acks, meta=meta)
        self.out.collect(0.0)
        self.tick()
        if self.heartbeats.due():
            self.flush_heartbeats()  # a quiet fleet: no other write to carry them

    def republish(self) -> None:
        """Re-publish the latest result and the open plan as after a reconnect (book.reconnected)."""
        self._carry_out(self.book.reconnected(self.clock()))

    def tick(self) -> None:
        now = self.clock()
        self._carry_out(self.book.tick(now))
        # `meerkat stop`: the state_dir's file; on PostgreSQL also the log's (cluster workers)
        shared_log = None if self.config.event_log == "sqlite" else self.log
        change = self.life.poll_stop(self.book, now, lambda: take_stop(self.state_dir, shared_log))
        if change is not None:
            self.stop_after_round = self.book.stop_after_round
            self._carry_out([Publish(change[0])], meta=change[1])
        self._beat(now)

    def _beat(self, now: float, stopped: bool = False) -> None:
        """Liveness for `meerkat status` (meta alive_at, one small transaction every ALIVE_EVERY_S)."""
        if stopped or not self._alive_at <= now < self._alive_at + ALIVE_EVERY_S:
            with self.log.transaction():
                self.log.beat(now, stopped=stopped)
            self._alive_at = now

    # -- in: an intake decision -> the book -------------------------------------------------------
    def feed(self, d: Decision) -> list[Action]:
        """The book's actions for one intake decision (the single pump's or a cluster inbox row's), counted
        the same way in both: messages and bytes per kind whenever the topic parsed."""
        if d.nbytes is not None:
            self.tally.received(d.kind, d.nbytes)
        clear = clear_topic(self.topics, d)
        if clear is not None and self.link is not None:
            self.link.publish(clear, b"", qos=1, retain=True)
        return feed(self.book, d, self.clock())

    # -- out: commit, ack, publish -----------------------------------------------------------------
    def _carry_out(
        self, acts: Sequence[Action], acks: Sequence[Incoming] = (), meta: dict[str, str] | None = None
    ) -> None:
        """Persist the records (and `meta` keys) in one transaction, THEN ack, THEN publish / checkpoint, in
        the book's order."""
        if not acts and not acks and not meta:
            self.tally.apply()
            return
        records = [a.record for a in acts if isinstance(a, Persist)]
        # a duplicate's per-round counter (`meerkat status`) is durable with the batch that acks it
        records += [DuplicateRecord(a.round) for a in acts if isinstance(a, Duplicate)]
        writes = self.heartbeats.defer(records, stopping=self._stop.is_set())
        if writes or meta:
            with self.log.transaction():
                self.log.persist_many(writes)
                for key, value in (meta or {}).items():
                    self.log.set_meta(key, value)
        if acks:
            assert self.link is not None
            self.link.ack_many(acks)  # committed: now the broker may forget them
        for rec in records:
            self.tally.count(rec)
            if isinstance(rec, ResultRecord) and self.evaluator is not None and self.evaluator.due(rec.result.round):
                self._eval_round = rec.result.round
        for a in acts:
            if isinstance(a, Publish):
                self.out.send(a)
            elif isinstance(a, WriteCheckpoint):
                self._write_checkpoint(a.round, a.values)
            elif isinstance(a, Duplicate):
                self.metrics.duplicates.inc()
            elif isinstance(a, Dropped):
                self.tally.add(self.metrics.dropped, a.reason)
        self.metrics.clients_online.set(self.book.registry.n_online())
        self.metrics.clients_limited.set(len(self.book.vp.limited()))
        if self._eval_round is not None:
            self._evaluate(self._eval_round)
        self.tally.apply()

    def flush_heartbeats(self) -> None:
        """Write the heartbeats still held (run() does this before it returns)."""
        held = self.heartbeats.take()
        if held:
            with self.log.transaction():
                self.log.persist_many(held)
        self.heartbeats.flushed = time.monotonic()

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

    def _write_checkpoint(self, round: int, values: torch.Tensor) -> Path:
        c = self.config
        path = keep_checkpoint(self.log, self.state_dir, round, values, self.mask_id, self.fingerprint,
                               c.keep_checkpoints, self.clock())  # fmt: skip
        if c.retain_rounds:  # retention (docs/COORDINATOR.md "Retention")
            prune_log(self.log, round, c.retain_rounds, c.replay_max, c.drift_window)
        return path


def _need(value: Path | None, key: str) -> Path:
    if value is None:
        raise ConfigError([f"{key}: required"])
    return value
