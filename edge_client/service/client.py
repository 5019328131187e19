"""The edge client loop: a pump between MQTT, SQLite, the engine and the round rules.

The rules (which plan to train, when to apply, reset or sync) live in `ClientRounds`
(edge_client/service/rounds.py), which does no I/O. This module decodes what arrives, feeds it to the
core, and carries out the actions it returns: persist first (StateStore, outbox), then publish; train
through the `Trainer`.

One thread (the caller's) owns the state; paho's thread only fills `link.inbox` / `link.published`; a
heartbeat thread publishes QoS0 telemetry. Each `tick()` does, in order:
  1. on a (re)connection: publish retained Status(online), make every outbox row due, core.connected(now)
     (Join); on a lost connection: core.disconnected(now);
  2. drain PUBACKs: mark the acked outbox rows;
  3. publish outbox rows that are due (after a restart: all of them; the coordinator dedupes);
  4. decode incoming messages (plan, result/{r}, result/latest, to/{client}): core.handle(msg, now);
  5. core.tick(now): a SyncRequest when the core asks, then at most ONE SPSA step, saved as a step row,
     taken only when the device policy allows it now (edge_client/service/policy.py); while it does
     not, the step is left undone (the core asks for the same one at the next tick) and the loop waits
     `policy.poll_s` for messages between checks.
So a SIGTERM, a round result or a PUBACK is never more than one step away.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from edge_client.privacy import DeviceBudget
from edge_client.service.actions import (
    Action,
    Commit,
    DropQueued,
    DropRound,
    Exit,
    LoadValues,
    QueueUpdate,
    ResendUpdates,
    SaveStep,
    SendJoin,
    SendSync,
    SlowDown,
    TrainStep,
)
from edge_client.service.carry import heartbeat_message, join_message, sync_message, train_step
from edge_client.service.config import ClientConfig
from edge_client.service.limits import apply_limits
from edge_client.service.policy import DevicePolicy
from edge_client.service.rounds import ClientRounds, Identity
from edge_client.service.sensors import Sensors, SystemSensors
from edge_client.service.state import ClientState, StateStore, StorageFull
from edge_client.service.telemetry import Telemetry
from edge_client.service.trainer import Trainer
from shared.codec import DecodeError, decode, encode
from shared.evaluation import EvalResult
from shared.messages import (
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Status,
)
from shared.mqtt import MqttLink, Will, tls_for
from shared.topics import Topics

log = logging.getLogger(__name__)

T = TypeVar("T")
INBOUND: dict[str, type[Message] | tuple[type[Message], ...]] = {  # topic kind -> what may arrive on it
    "plan": RoundPlan,
    "result": RoundResult,
    "result_latest": RoundResult,
    "to": (Replay, CheckpointChunk, ErrorMsg),
    "run": RunState,  # 1.3: the run's lifecycle (retained)
}
RETAINED = frozenset({"plan", "result_latest"})  # topics it reads where a zero-length payload clears a retained one
STORAGE_RETRY_S = 5.0  # a full disk: try the same write again this often (nothing half-written was committed)


class StoppedWhileStorageFull(StorageFull):
    """SIGTERM arrived while a write kept failing for lack of space: the write was not committed."""


class EdgeClient:
    def __init__(
        self, cfg: ClientConfig, trainer: Trainer, budget_gib: float | None = None, sensors: Sensors | None = None
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.cid = cfg.client_id
        self.topics = Topics(cfg.fleet)
        self.budget_gib = cfg.memory_budget_gib if budget_gib is None else budget_gib
        self.stop_event = threading.Event()
        self.store = StateStore(cfg.state_dir, cfg.resend_after_s)
        self.st: ClientState  # the persisted state, as the last write returned it
        self.st, values = self.store.open(trainer.fingerprint, trainer.mask_id, trainer.initial_values())
        self.trainer.set_values(values)
        log.info(
            "state: round %d, checksum %s, data pointer %d, %d queued update(s)",
            self.st.round, self.st.checksum[:12], self.st.data_pointer, len(self.store.outbox),
        )
        me = Identity(cfg.client_id, cfg.fleet, trainer.fingerprint, trainer.mask_id, trainer.n_samples, cfg.quant)
        # a trainer with a private step can serve DP fleets; its spent budget comes back from the state
        privacy = (DeviceBudget(trainer.n_samples, self.store.dp_spends(), max_epsilon=cfg.dp_max_epsilon)
                   if hasattr(trainer, "private_step") else None)  # fmt: skip
        self.rounds = ClientRounds(
            me, trainer.initial_values, values=values, round=self.st.round, data_pointer=self.st.data_pointer,
            trained_round=self.st.trained_round, trained_msg_id=self.st.trained_msg_id,
            progress=self.store.progress(), sync_retry_s=cfg.sync_retry_s, privacy=privacy,
            exit_when_run_over=cfg.exit_when_run_over,
        )  # fmt: skip
        self.counters = self.rounds.counters  # one set of counters: the core's rules and the pump's I/O
        self._seen_connects = 0
        self.exit: Exit | None = None  # set when the core says this device cannot take part (run() returns its code)
        self._quiet_until = 0.0  # monotonic: no outbox re-send before (RATE_LIMITED)
        self.last_step_s: float | None = None
        self.link = self._make_link()
        self._hb_thread: threading.Thread | None = None
        self.telemetry: Telemetry | None = None
        self.last_eval: tuple[int, EvalResult] | None = None  # (round, result): repeated on every heartbeat
        self._sensors = sensors  # None: the real ones (SystemSensors), made in run() beside the telemetry
        self.policy: DevicePolicy | None = None  # set in run(); None (tests driving tick()) = always allowed
        self.started = time.monotonic()
        self.trained_s = 0.0  # wall seconds spent in local steps since start (share of time trained)

    # -- setup -----------------------------------------------------------------------------------
    def _status(self, online: bool) -> bytes:
        return encode(Status(client="", online=online, ts=time.time()))

    def _make_link(self) -> MqttLink:
        c, t = self.cid, self.topics
        tls = tls_for(self.cfg.broker, self.cfg.tls_ca, self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_insecure)
        return MqttLink(
            self.cfg.broker,
            c,
            subscriptions=[(t.plan, 1), (t.filter("result"), 1), (t.to(c), 1), (t.run, 1)],
            username=self.cfg.username,
            password=self.cfg.read_password(),
            tls=tls,
            will=Will(t.status(c), self._status(False), qos=1, retain=True),
            clean_session=False,
            max_queued=self.cfg.max_queued,
        )

    # -- run -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Until `stop()` (SIGTERM): returns 0 after a clean shutdown (offline status published)."""
        log.info("device policy: %s", apply_limits(self.cfg.policy))
        self.link.start()
        self.telemetry = Telemetry(self.cfg.heartbeat_s, use_gpu=self.cfg.device != "cpu")
        sensors = self._sensors if self._sensors is not None else SystemSensors(self.telemetry)
        self.policy = DevicePolicy(self.cfg.policy, sensors)
        self.started = time.monotonic()
        self._hb_thread = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._hb_thread.start()
        try:
            while not self.stop_event.is_set():
                self.tick()
        finally:
            self.shutdown()
        if self.exit is not None:
            return self.exit.code
        return 0

    def stop(self) -> None:
        """Ask the loop to end after the current step (signal-handler safe)."""
        self.stop_event.set()

    def shutdown(self) -> None:
        job = self.rounds.job
        if job is not None:
            log.info("stopping in round %d after step %d/%d (progress saved)", job.plan.round,
                     len(job.results), job.steps)
        self._drain_published(wait_s=2.0 if self.link.connected.is_set() and self.store.outbox.pending() else 0.0)
        self.link.stop(final=[(self.topics.status(self.cid), self._status(False), 1, True)])
        if self.telemetry is not None:
            self.telemetry.close()
        self.store.close()
        log.info("stopped; counters %s", dict(self.counters))

    def tick(self, idle_wait: float = 0.2) -> None:
        connected = self.link.connected.is_set()
        if connected and self.link.connect_count != self._seen_connects:
            self._seen_connects = self.link.connect_count
            self.link.publish(self.topics.status(self.cid), self._status(True), qos=1, retain=True)
            self.store.outbox.reconnected()  # re-send updates whose round is not over: the broker may have lost them
            self._carry_out(self.rounds.connected(time.time()))
        elif not connected and self.rounds.online:
            self._carry_out(self.rounds.disconnected(time.time()))
        self._drain_published()
        if connected and time.monotonic() >= self._quiet_until:
            self._resend_due()
        policy = self.policy
        if policy is not None and self.rounds.job is None and time.monotonic() - policy.checked_at >= self.cfg.policy.poll_s:
            self._check_policy()  # idle: keep the availability the heartbeat reports current (the fleet samples on it)
        paused = policy is not None and not policy.verdict.available
        wait = idle_wait if self.rounds.job is None else self.cfg.policy.poll_s if paused else 0.0
        self._drain_inbox(wait)
        self._carry_out(self.rounds.tick(time.time()))

    # -- actions of the round core ---------------------------------------------------------------
    def _carry_out(self, actions: list[Action]) -> None:
        for act in actions:
            if isinstance(act, TrainStep):
                if self.stop_event.is_set() or not self._may_step():
                    continue  # a step not taken changes nothing; the saved steps resume the round after a restart
                result, then = train_step(self.rounds, self.trainer, act)
                self.last_step_s = result.seconds
                self.trained_s += result.seconds
                self._carry_out(then)
            elif isinstance(act, SaveStep):
                self._durably(partial(self.store.record_step, act.round, act.msg_id, act.step, act.result,
                                      act.data_pointer))
            elif isinstance(act, QueueUpdate):
                upd = act.update
                self.st = self._durably(partial(self.store.finish_training, upd.round, upd.msg_id,
                                                self.topics.up(self.cid), encode(upd), act.data_pointer,
                                                act.spend))
                if self.link.connected.is_set():
                    self._resend_due()
            elif isinstance(act, ResendUpdates):
                self.store.outbox.reconnected()
                if self.link.connected.is_set():
                    self._resend_due()
            elif isinstance(act, Commit):
                self.st = self._durably(partial(self.store.commit_round, act.round, act.values, act.checksum))
                self._maybe_evaluate(act.round, act.values)
            elif isinstance(act, LoadValues):
                self.trainer.set_values(act.values)
            elif isinstance(act, SendJoin):
                join = join_message(self.trainer, self.budget_gib, act.last_round)
                self.link.publish(self.topics.join(self.cid), encode(join), qos=1)
                log.info("joined fleet %s as %s at round %d", self.cfg.fleet, self.cid, act.last_round)
            elif isinstance(act, SendSync):
                self.link.publish(self.topics.sync(self.cid), encode(sync_message(act.have_round)), qos=1)
            elif isinstance(act, DropRound):
                pass  # the Commit before it already dropped the round's saved steps
            else:
                self._carry_out_refusal(act)

    def _may_step(self) -> bool:
        """The device policy's word, read from the sensors now (before every local step)."""
        return self.policy is None or self._check_policy()

    def _check_policy(self) -> bool:
        """Ask the policy; on a change between available and paused, tell the coordinator at once (a
        Heartbeat): it samples only available devices and closes a round whose sampled devices all paused."""
        assert self.policy is not None
        was = self.policy.verdict
        now = self.policy.check()
        if was.available and not now.available:
            self.counters["policy_pauses"] += 1
        if was.reason != now.reason and self.telemetry is not None and self.link.connected.is_set():
            try:
                self.link.publish(self.topics.hb(self.cid), encode(self.heartbeat()), qos=0)
            except (RuntimeError, ValueError) as exc:
                log.warning("heartbeat after a policy change skipped: %s", exc)
        return now.available

    def trained_share(self) -> float:
        """Share of wall time since start spent in local steps (0..1)."""
        return min(1.0, self.trained_s / max(1e-9, time.monotonic() - self.started))

    def _carry_out_refusal(self, act: Action) -> None:
        """What the coordinator's refusals ask for: stop (Exit), forget an update (DropQueued), slow down."""
        if isinstance(act, Exit):
            self.exit = act
            self.stop_event.set()  # run() returns act.code after the usual clean shutdown
        elif isinstance(act, DropQueued):
            n = self.store.outbox.discard(act.round)
            log.info("outbox: %d update(s) of round %d discarded", n, act.round)
        elif isinstance(act, SlowDown):
            self._quiet_until = max(self._quiet_until, time.monotonic() + act.seconds)

    def _durably(self, write: Callable[[], T]) -> T:
        """Run a state write; on a full disk log the path and the fix and retry every STORAGE_RETRY_S (the
        round core already moved on, so skipping the write is not an option). A stop request while the disk
        stays full raises StoppedWhileStorageFull (exit 5: nothing of that write was committed)."""
        failures = 0
        while True:
            try:
                out = write()
            except StorageFull as exc:
                failures += 1
                self.counters["storage_full"] += 1
                if failures == 1 or failures % 12 == 0:
                    log.error("%s; retrying every %.0f s (attempt %d)", exc, STORAGE_RETRY_S, failures)
                if self.stop_event.wait(STORAGE_RETRY_S):
                    raise StoppedWhileStorageFull(f"stopped while the disk is full: {exc}") from None
                continue
            if failures:
                log.warning("state write succeeded after %d failed attempt(s): disk space is back", failures)
            return out

    # -- outbox ----------------------------------------------------------------------------------
    def _drain_published(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                mid = self.link.published.get(timeout=max(0.0, deadline - time.monotonic()) if wait_s else 0)
            except queue.Empty:
                return
            try:
                row = self.store.outbox.acked(mid)
            except sqlite3.OperationalError as exc:  # e.g. disk full: the row stays pending and is re-sent
                log.warning("could not mark a PUBACK in %s (%s): the update will be published again", self.store.db_path, exc)
                continue
            if row is not None:
                log.info("update for round %d (msg_id %016x) acknowledged", row.round, row.msg_id)
                self.counters["updates_acked"] += 1
                if wait_s and not self.store.outbox.pending():
                    return

    def _resend_due(self) -> None:
        for row in self.store.outbox.due():
            try:
                mid = self.link.publish(row.topic, row.payload, qos=row.qos)
            except RuntimeError as exc:
                log.warning("outbox publish of round %d deferred: %s", row.round, exc)
                return
            self.store.outbox.sent(row, mid)
            self.counters["updates_sent"] += 1
            log.info("update for round %d (msg_id %016x) published, mid %d", row.round, row.msg_id, mid)

    # -- incoming --------------------------------------------------------------------------------
    def _drain_inbox(self, wait: float) -> None:
        try:
            msg = self.link.inbox.get(timeout=wait) if wait > 0 else self.link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg.topic, msg.payload)
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, topic: str, payload: bytes) -> None:
        """Decode one incoming message and feed it to the core (a bad one is counted and dropped)."""
        try:
            kind, _arg = self.topics.parse(topic)
        except ValueError as exc:
            self.rounds.reject("bad_topic", f"{exc}")
            return
        if not payload and kind in RETAINED:
            return  # a retained message was cleared (on any other topic it is TRUNCATED: PROTOCOL.md §1)
        kinds = INBOUND.get(kind)
        if kinds is None:
            self.rounds.reject("unexpected_topic", f"message on {topic}")
            return
        try:
            msg = decode(payload, kinds, fleet=self.topics.fleet)
        except DecodeError as exc:
            self.rounds.reject(f"decode_{exc.code.name.lower()}", f"{topic}: {exc}")
            return
        self._carry_out(self.rounds.handle(msg, time.time()))

    # -- evaluation ------------------------------------------------------------------------------
    def _maybe_evaluate(self, round: int, values: torch.Tensor) -> None:
        """After applying round r with r % eval_every == 0: evaluate on the held-out slice, then send a
        heartbeat at once so the coordinator's curve does not wait for the next period."""
        k = self.cfg.eval_every
        evaluate = getattr(self.trainer, "evaluate", None)  # optional: a Trainer without a held-out slice
        if k <= 0 or round < 0 or round % k or evaluate is None:
            return
        try:
            res = evaluate(values)
        except Exception:  # an evaluation problem must not stop training
            log.exception("evaluation after round %d failed", round)
            return
        if res is None:
            return
        self.last_eval = (round, res)
        acc = "-" if res.accuracy is None else f"{res.accuracy:.3f}"
        log.info("eval after round %d: loss %.4f accuracy %s (%d held-out examples)", round, res.loss, acc, res.n)
        if self.telemetry is not None and self.link.connected.is_set():
            try:
                self.link.publish(self.topics.hb(self.cid), encode(self.heartbeat()), qos=0)
            except (RuntimeError, ValueError) as exc:
                log.warning("heartbeat after eval skipped: %s", exc)

    # -- heartbeat -------------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        assert self.telemetry is not None
        # policy off: keys 16-18 stay out, so the device keeps working with a 1.2 coordinator
        on = self.policy is not None and self.cfg.policy.enabled
        return heartbeat_message(self.rounds, self.trainer, time.time(), self.telemetry.read(), self.last_step_s,
                                 self.last_eval, self.policy.verdict if on and self.policy else None,
                                 self.trained_share() if on else None)

    def _heartbeats(self) -> None:
        topic = self.topics.hb(self.cid)
        while not self.stop_event.wait(self.cfg.heartbeat_s):
            if not self.link.connected.is_set():
                continue
            try:
                self.link.publish(topic, encode(self.heartbeat()), qos=0)
            except (RuntimeError, ValueError) as exc:  # queue full, or a reading out of range
                log.warning("heartbeat skipped: %s", exc)


__all__ = ["EdgeClient"]
