"""Coordinator workers: 2+ `meerkat coordinator` processes with the same config (`cluster = true`, the event
log on PostgreSQL, one `worker_id` each) share the fleet's ingest; exactly one of them runs the rounds.

Ingest (every worker): an MQTT 5 link with a persistent session (clean_start=False + `worker_session_s`)
subscribes to `$share/meerkat-{fleet}/meerkat/v1/{fleet}/{up,join,hb,status,sync}/+`, so the broker hands
each message to one worker. A worker makes the intake decision of each message of its batch
(`intake.admit`: parse, drop, decode, validate), appends them to the `inbox` table (`inbox.row_of`) in
ONE transaction, commits, THEN acks (nothing is acked before it is
durable; an unacked message stays in the worker's session and comes back when the worker returns).

Leader (one worker): holds `pg_try_advisory_lock(fleet)` on a dedicated connection and is the only one
with a `RoundBook` (a `Coordinator` built at take-over: recovery from the log, `coordinator/recovery.py`).
It reads the inbox in id order after `meta.inbox_done`, feeds each row's decision to the book as the
single pump does (`Coordinator.feed`: the same actions, the same counters), and commits the book's records
with the new `inbox_done` in one transaction (`Coordinator.advance`), then publishes. The book is the
single coordinator's: the same inbox gives the same RoundResults.

Failover: the leader's PostgreSQL session ends when it dies (kill -9 closes its socket), which releases
the lock. Standbys try it every LOCK_POLL_S; the winner recovers, resumes the inbox after `inbox_done`
and re-publishes the latest result and the open plan (devices re-send kept Updates on a re-published
plan, docs/PROTOCOL.md "Delivery"; dedupe on (client, round) + msg_id makes re-sends harmless). Mosquitto
keeps routing a dead worker's share to its session until it expires (worker_session_s) or the worker
returns under the same id; so the leader re-publishes the plan once more after worker_session_s: what
that session swallowed is re-sent to the living workers.

The run's lifecycle is the single coordinator's (coordinator/lifecycle.py): the leader publishes the
retained RunState on `run` (running at take-over; finishing on `meerkat stop`, which reaches it through the
log's meta `stop_request`; finished / stopped when its target round closed), persists it in the log's meta
and writes the run report into its own state_dir. A worker that takes the lock of an ended run (RunOver:
the leader ended it and exited) exits 0 too; one that finds the target round closed but the run not yet
ended (the leader died in between) ends it.

    worker = Worker(load_coordinator_config("coordinator.toml", overrides={"worker_id": "w1"}))
    worker.run()    # until stop() or the run ended (a standby: until the leader ended it)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.actions import Action
from coordinator.config import CoordinatorConfig
from coordinator.inbox import Inbox, row_of
from coordinator.intake import INBOUND, admit
from coordinator.lifecycle import RunOver
from coordinator.links import BATCH, broker_link, take_batch
from coordinator.logstore import lock_key
from coordinator.report import write_run_report
from coordinator.server import Coordinator
from shared.config import ConfigError
from shared.mqtt import MqttLink
from shared.topics import Topics

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.5  # a standby tries the leader lock this often
LOCK_CHECK_S = 2.0  # the leader checks its lock connection this often (gone: it exits, a standby takes over)
FORGET_EVERY_S = 2.0  # the leader deletes consumed inbox rows this often


def shared_filter(topics: Topics, kind: str) -> str:
    """The shared-subscription filter of a message kind: one share group per fleet."""
    return f"$share/meerkat-{topics.fleet}/{topics.filter(kind)}"


class LeaderLock:
    """A session-level advisory lock on its own connection: held until released or the session ends."""

    def __init__(self, url: str, fleet: str) -> None:
        import psycopg

        from coordinator.logstore import redact_url

        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"leader lock {redact_url(url)}: cannot connect: {str(exc).strip()}") from exc
        self.key = lock_key("leader", fleet)
        self.held = False

    def try_acquire(self) -> bool:
        row = self.db.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        self.held = bool(row and row[0])
        return self.held

    def check(self) -> None:
        """Raise RuntimeError when the connection that holds the lock is gone (so is the lock)."""
        import psycopg

        try:
            self.db.execute("SELECT 1")
        except psycopg.Error as exc:
            raise RuntimeError(f"leader lock connection lost ({exc}); another worker takes over") from exc

    def close(self) -> None:
        self.db.close()  # ends the session: the lock, if held, is released


class Worker:
    """One coordinator worker (see the module docstring). `run()` blocks; `stop()` from another thread."""

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time) -> None:
        problems = config.validate()
        if not config.cluster:
            problems.append("cluster: a Worker needs cluster = true")
        if not config.worker_id:  # checked here, not in validate(): `meerkat status --config` needs none
            problems.append("worker_id: required with cluster = true (one name per worker, e.g. --set worker_id=w1)")
        for key, path in (("mask", config.mask), ("model_dir", config.model_dir)):
            if path is not None and not Path(path).exists():  # a standby loads them only when it takes over
                problems.append(f"{key}: {path} does not exist")
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.clock = clock
        self.name = config.worker_id
        self.topics = Topics(config.fleet)
        self.inbox = Inbox(config.event_log, config.fleet, self.name)
        self.lock = LeaderLock(config.event_log, config.fleet)
        self.link: MqttLink | None = None
        self.coord: Coordinator | None = None
        self.position = 0  # the leader's inbox position (= meta inbox_done once committed)
        self.ingested = 0  # messages this worker appended to the inbox
        self._stop = threading.Event()
        self._next_try = 0.0
        self._next_check = 0.0
        self._next_forget = 0.0
        self._republish_at: float | None = None
        self._busy = False  # the last inbox read was a full batch: do not wait on the link

    def start(self) -> None:
        c = self.config
        subs = [(shared_filter(self.topics, k), self.topics.qos(k)) for k in INBOUND]
        self.link = broker_link(c, f"{c.client_id}-{c.worker_id}", subs, session_expiry_s=c.worker_session_s)

    def stop(self) -> None:
        self._stop.set()

    @property
    def leader(self) -> bool:
        return self.coord is not None

    def run(self) -> int:
        """Ingest, and lead when holding the lock, until stop() or the run ended (the leader: its target round
        closed, the ended run told to the fleet; a standby: it took the lock of an ended run); returns 0."""
        if self.link is None:
            self.start()
        coord: Coordinator | None = None
        try:
            while not self._stop.is_set():
                self.ingest(0.005 if self._busy else 0.05)
                if self.coord is None:
                    if time.monotonic() >= self._next_try:
                        self._next_try = time.monotonic() + LOCK_POLL_S
                        if self.lock.try_acquire() and self.take_over():
                            break  # the run had ended already
                else:
                    self.lead()
                    if self.coord.done():
                        break
            coord = self.coord
            if coord is not None and coord.done():
                coord.end_run()  # finished / stopped: persisted, published retained on `run`
            if coord is not None:
                coord.drain()  # every result and the RunState PUBACKed before we exit
        finally:
            self.close()
        if coord is not None and coord.ended and self.config.report:
            write_run_report(Path(self.config.state_dir), self.config.event_log)
        return 0

    def close(self) -> None:
        log.info("worker %s: %d messages ingested; %s", self.name, self.ingested,
                 "was the leader" if self.coord is not None else "was a standby")  # fmt: skip
        if self.coord is not None:
            self.coord.close()  # stops the link (shared) and the event log
        elif self.link is not None:
            self.link.stop()
        self.link = None
        self.inbox.close()
        self.lock.close()

    # -- every worker ------------------------------------------------------------------------------
    def ingest(self, timeout: float) -> int:
        """One batch from the link into the inbox: admit, append (commit), THEN ack. Returns its size."""
        assert self.link is not None, "start() first"
        batch = take_batch(self.link.inbox, timeout)
        if self.coord is not None:  # the leader's metrics count its own link's flood gate (a standby's: not counted)
            self.coord.tally.gate(self.link.inbox)
        if not batch:
            return 0
        rows = [row_of(admit(self.topics, msg)) for msg in batch]  # drops too: the leader counts them
        self.inbox.append(rows)  # committed
        self.link.ack_many(batch)
        self.ingested += len(rows)
        return len(batch)

    # -- the leader --------------------------------------------------------------------------------
    def take_over(self) -> bool:
        """Holding the lock: recover a Coordinator from the log and start leading. True when the run ended
        (nothing to lead: the worker exits) or its target round is closed (run() ends the run, then exits)."""
        assert self.link is not None
        t0 = time.perf_counter()
        try:
            coord = Coordinator(self.config, clock=self.clock)  # recovery from PostgreSQL
        except RunOver as exc:  # the leader ended the run and exited, releasing the lock
            log.info("worker %s: %s", self.name, exc)
            return True
        self.position = int(coord.log.get_meta("inbox_done") or 0)
        with coord.log.transaction():
            coord.log.set_meta("leader", self.name)
            coord.log.event("leader", f"worker {self.name} leads from inbox position {self.position}", now=self.clock())
        coord.start(link=self.link)  # re-publishes the latest result and the open plan
        self.coord = coord
        self._republish_at = time.monotonic() + self.config.worker_session_s + 1.0
        log.info("worker %s: leader (recovered in %.2f s, round %d, %s, inbox after %d: %d rows)", self.name,
                 time.perf_counter() - t0, coord.last_round,
                 "no open round" if coord.plan is None else f"round {coord.plan.round} open",
                 self.position, self.inbox.pending(self.position))  # fmt: skip
        return coord.done()  # the leader before us died between the target round's close and the end of the run

    def lead(self) -> None:
        """One leader iteration: a batch of the inbox to the book, its records + position committed together."""
        coord = self.coord
        assert coord is not None
        rows = self.inbox.after(self.position, BATCH)
        self._busy = len(rows) == BATCH
        acts: list[Action] = []
        for row in rows:
            acts += coord.feed(row.decision())
        coord.advance(acts, meta={"inbox_done": str(rows[-1].id)} if rows else {})
        if rows:
            self.position = rows[-1].id
        mono = time.monotonic()
        if self._republish_at is not None and mono >= self._republish_at:
            self._republish_at = None
            log.info("worker %s: worker_session_s passed since take-over: re-publishing the open plan", self.name)
            coord.republish()
        if mono >= self._next_forget:
            self._next_forget = mono + FORGET_EVERY_S
            self.inbox.forget(self.position)
        if mono >= self._next_check:
            self._next_check = mono + LOCK_CHECK_S
            self.lock.check()
