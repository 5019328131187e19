"""The edge client loop: the client side of docs/ARCHITECTURE.md "Round lifecycle".

One thread (the caller's) owns the state; paho's thread only fills `link.inbox` / `link.published`; a
heartbeat thread publishes QoS0 telemetry. Each `tick()` does, in order:
  1. on a (re)connection: publish retained Status(online) and Join(last_round = the round our values are at);
  2. drain PUBACKs: delete the acked outbox rows;
  3. publish outbox rows that are due (after a restart: all of them; the coordinator dedupes);
  4. handle incoming messages (plan, result/{r}, result/latest, to/{client});
  5. ask for missed rounds (SyncRequest) when behind, at most every `sync_retry_s`;
  6. run at most ONE SPSA step of the current round, persisted as a progress row.
So a SIGTERM, a round result or a PUBACK is never more than one step away.

Invariant: `self.values` are the values at `self.st.round` (the persisted state); the trainer's buffer
holds the local path while a round trains and is reset to `self.values` whenever a round ends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from edge_client.service.config import ClientConfig
from edge_client.service.state import ClientState, StateStore, StepRecord, values_from_bytes
from edge_client.service.telemetry import Telemetry
from edge_client.service.trainer import Trainer
from shared.apply import apply_round, values_checksum
from shared.codec import DecodeError, decode, encode
from shared.fingerprint import fp_tag
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
from shared.mqtt import MqttLink, Will, tls_for
from shared.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class Job:
    """The round being trained: plan, this client's step count, steps done so far."""

    plan: RoundPlan
    key: int  # u64 identity of (client, plan): the Update's msg_id
    steps: int
    done: list[StepRecord] = field(default_factory=list)
    pointer: int = 0


def plan_key(client: str, plan: RoundPlan) -> int:
    """u64 identity of what this client is asked to do in `plan`: same plan -> same msg_id after a crash."""
    h = hashlib.sha256()
    h.update(f"{client}|{plan.fleet}|{plan.round}|{plan.base_round}|{plan.steps.get(client, 0)}|".encode())
    h.update(f"{plan.lr!r}|{plan.eps!r}|{plan.dist}|{plan.batch_size}|{plan.values_checksum}|".encode())
    h.update(b",".join(str(s).encode() for s in plan.seeds))
    return int.from_bytes(h.digest()[:8], "little")


class EdgeClient:
    def __init__(self, cfg: ClientConfig, trainer: Trainer, budget_gib: float | None = None) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.cid = cfg.client_id
        self.topics = Topics(cfg.fleet)
        self.budget_gib = cfg.memory_budget_gib if budget_gib is None else budget_gib
        self.fp_tag = fp_tag(trainer.fingerprint)
        self.counters: Counter[str] = Counter()
        self.stop_event = threading.Event()
        self.store = StateStore(cfg.state_dir, cfg.resend_after_s)
        self.st: ClientState
        self.st, self.values = self.store.open(trainer.fingerprint, trainer.mask_id, trainer.initial_values())
        self.trainer.set_values(self.values)
        log.info(
            "state: round %d, checksum %s, data pointer %d, %d queued update(s)",
            self.st.round, self.st.checksum[:12], self.st.data_pointer, len(self.store.outbox),
        )
        self.plan: RoundPlan | None = None
        self.job: Job | None = None
        self.known_round = self.st.round  # highest round the fleet is known to have finished
        self.need_full_sync = False
        self._refused_round = -2
        self._sync_check = False
        self._last_sync = -math.inf
        self._seen_connects = 0
        self._chunks: dict[tuple[int, str], dict[int, bytes]] = {}
        self.last_step_s: float | None = None
        self.link = self._make_link()
        self._hb_thread: threading.Thread | None = None
        self.telemetry: Telemetry | None = None

    # -- setup -----------------------------------------------------------------------------------
    def _status(self, online: bool) -> bytes:
        return encode(Status(client="", online=online, ts=time.time()))

    def _make_link(self) -> MqttLink:
        c, t = self.cid, self.topics
        tls = tls_for(self.cfg.broker, self.cfg.tls_ca, self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_insecure)
        return MqttLink(
            self.cfg.broker,
            c,
            subscriptions=[(t.plan, 1), (t.filter("result"), 1), (t.to(c), 1)],
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
        self.link.start()
        self.telemetry = Telemetry(self.cfg.heartbeat_s, use_gpu=self.cfg.device != "cpu")
        self._hb_thread = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._hb_thread.start()
        try:
            while not self.stop_event.is_set():
                self.tick()
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        """Ask the loop to end after the current step (signal-handler safe)."""
        self.stop_event.set()

    def shutdown(self) -> None:
        if self.job is not None:
            log.info("stopping in round %d after step %d/%d (progress saved)", self.job.plan.round,
                     len(self.job.done), self.job.steps)
        self._drain_published(wait_s=2.0 if self.link.connected.is_set() and self.store.outbox.pending() else 0.0)
        self.link.stop(final=[(self.topics.status(self.cid), self._status(False), 1, True)])
        if self.telemetry is not None:
            self.telemetry.close()
        self.store.close()
        log.info("stopped; counters %s", dict(self.counters))

    def tick(self, idle_wait: float = 0.2) -> None:
        if self.link.connect_count != self._seen_connects and self.link.connected.is_set():
            self._seen_connects = self.link.connect_count
            self._on_connected()
        self._drain_published()
        if self.link.connected.is_set():
            self._resend_due()
        wait = 0.0 if self.job is not None else idle_wait
        self._drain_inbox(wait)
        if self.link.connected.is_set():
            self._maybe_sync()
        if self.job is not None and not self.stop_event.is_set():
            self._step()

    # -- connection ------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        self.link.publish(self.topics.status(self.cid), self._status(True), qos=1, retain=True)
        self._send_join()
        self.store.outbox.reconnected()  # re-send updates whose round is not over: the broker may have lost them
        self._sync_check = True  # results published while we were away may be gone: ask once
        self._last_sync = -math.inf

    def _send_join(self) -> None:
        join = Join(
            client="",
            fingerprint=self.trainer.fingerprint,
            mask_id=self.trainer.mask_id,
            n_samples=self.trainer.n_samples,
            budget_gib=float(self.budget_gib),
            capabilities=self.trainer.capabilities(),
            last_round=max(self.st.round, -1),
        )
        self.link.publish(self.topics.join(self.cid), encode(join), qos=1)
        self.counters["joins"] += 1
        log.info("joined fleet %s as %s at round %d", self.cfg.fleet, self.cid, self.st.round)

    def _drain_published(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                mid = self.link.published.get(timeout=max(0.0, deadline - time.monotonic()) if wait_s else 0)
            except queue.Empty:
                return
            row = self.store.outbox.acked(mid)
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
        try:
            kind, _arg = self.topics.parse(topic)
        except ValueError as exc:
            self._reject("bad_topic", f"{exc}")
            return
        if not payload:
            return  # a retained message was cleared
        try:
            if kind == "plan":
                self._on_plan(decode(payload, RoundPlan))
            elif kind in ("result", "result_latest"):
                self._on_result(decode(payload, RoundResult))
            elif kind == "to":
                msg: Message = decode(payload, (Replay, CheckpointChunk, ErrorMsg))
                if isinstance(msg, Replay):
                    self._on_replay(msg)
                elif isinstance(msg, CheckpointChunk):
                    self._on_chunk(msg)
                elif isinstance(msg, ErrorMsg):
                    self._on_error(msg)
            else:
                self._reject("unexpected_topic", f"message on {topic}")
        except DecodeError as exc:
            self._reject(f"decode_{exc.code.name.lower()}", f"{topic}: {exc}")

    def _reject(self, reason: str, detail: str) -> None:
        self.counters[f"rejected_{reason}"] += 1
        log.warning("dropped message (%s): %s", reason, detail)

    def _on_plan(self, plan: RoundPlan) -> None:
        if plan.fleet != self.cfg.fleet:
            self._reject("wrong_fleet", f"plan for fleet {plan.fleet!r}")
            return
        self.plan = plan
        self.known_round = max(self.known_round, plan.base_round)
        self._consider_plan()

    def _consider_plan(self) -> None:
        plan, st = self.plan, self.st
        if plan is None or self.job is not None and self.job.plan == plan:
            return
        if plan.fingerprint != self.trainer.fingerprint or plan.mask_id != self.trainer.mask_id:
            if self._refused_round != plan.round:  # once per round, not on every reconsideration
                self._refused_round = plan.round
                self.counters["plan_mismatch"] += 1
                log.error(
                    "refusing plan %d: it is for model %s/mask %s, this device holds %s/%s; waiting",
                    plan.round, plan.fingerprint[:12], plan.mask_id, self.trainer.fingerprint[:12], self.trainer.mask_id,
                )
            return
        if self.cid not in plan.steps:
            log.debug("round %d: not sampled", plan.round)
            return
        if plan.round <= st.round:
            return  # we already hold this round's result
        key = plan_key(self.cid, plan)
        if st.trained_round == plan.round and st.trained_plan == key:
            return  # update already queued/sent; waiting for the result
        if plan.base_round > st.round:
            log.info("round %d starts from round %d, we are at %d: catching up first", plan.round,
                     plan.base_round, st.round)
            return  # _maybe_sync asks; the plan is reconsidered after each applied result
        if plan.base_round < st.round:
            log.warning("ignoring plan %d: base round %d is older than our round %d", plan.round,
                        plan.base_round, st.round)
            return
        if plan.values_checksum != st.checksum:
            log.error("plan %d expects values %s at round %d, ours are %s: resyncing from scratch",
                      plan.round, plan.values_checksum[:12], st.round, st.checksum[:12])
            self.counters["checksum_mismatch"] += 1
            self._reset_to_initial()
            return
        self._start_job(plan, key)

    def _start_job(self, plan: RoundPlan, key: int) -> None:
        steps = plan.steps[self.cid]
        done = self.store.progress(plan.round, key)[:steps]
        job = Job(plan, key, steps, done, done[-1].data_pointer if done else self.st.data_pointer)
        if done:  # rebuild the local path v - lr sum_t g_t z_t of the steps already done
            local = apply_round(self.values, plan.seeds[: len(done)], [r.g for r in done], plan.lr, plan.dist)  # type: ignore[arg-type]
            self.trainer.set_values(local)
            log.info("round %d: resuming at step %d/%d", plan.round, len(done), steps)
        else:
            self.trainer.set_values(self.values)
            log.info("round %d: training %d step(s) from round %d", plan.round, steps, plan.base_round)
        self.job = job

    def _on_result(self, res: RoundResult) -> None:
        self.known_round = max(self.known_round, res.round)
        if res.round <= self.st.round:
            return  # duplicate (retained result/latest, or result/{r} next to it)
        if res.round > self.st.round + 1:
            log.info("result %d arrived, we are at round %d: catching up", res.round, self.st.round)
            return  # _maybe_sync asks for the missing ones
        self._apply(res)

    def _apply(self, res: RoundResult) -> bool:
        new = apply_round(self.values, res.seeds, res.scalars, res.lr, res.dist)  # type: ignore[arg-type]
        ck = values_checksum(new)
        if ck != res.values_checksum:
            log.error("round %d result gives checksum %s, coordinator says %s: resyncing from scratch",
                      res.round, ck[:12], res.values_checksum[:12])
            self.counters["checksum_mismatch"] += 1
            self._reset_to_initial()
            return False
        self._commit(res.round, new, ck)
        log.info("applied round %d (%d clients, %d scalars): checksum %s", res.round, res.n_clients,
                 len(res.scalars), ck[:12])
        return True

    def _commit(self, round: int, values: torch.Tensor, checksum: str) -> None:
        self.st = self.store.commit_round(round, values, checksum)
        self.values = values
        if self.job is not None and self.job.plan.round <= round:
            log.info("round %d closed before we finished (%d/%d steps): dropping it", self.job.plan.round,
                     len(self.job.done), self.job.steps)
            self.counters["rounds_missed"] += 1
            self.job = None
        if self.job is None:
            self.trainer.set_values(values)
        self._consider_plan()

    def _reset_to_initial(self) -> None:
        """Our values went wrong somewhere: back to v_0 (round -1) and replay/checkpoint from there."""
        self.job = None
        v0 = self.trainer.initial_values()
        self.need_full_sync = True
        self.st = self.store.commit_round(-1, v0)
        self.values = v0
        self.trainer.set_values(v0)
        self._last_sync = -math.inf

    def _on_replay(self, rep: Replay) -> None:
        log.info("replay of %d result(s) (rounds %s)", len(rep.results),
                 f"{rep.results[0].round}..{rep.results[-1].round}" if rep.results else "-")
        for res in sorted(rep.results, key=lambda r: r.round):
            self.known_round = max(self.known_round, res.round)
            if res.round == self.st.round + 1:
                if not self._apply(res):
                    return
                self.counters["rounds_replayed"] += 1
        self.need_full_sync = False
        self._last_sync = -math.inf if self.st.round < self.known_round else self._last_sync

    def _on_chunk(self, ch: CheckpointChunk) -> None:
        if ch.round <= self.st.round and not self.need_full_sync:
            return  # we hold these values or newer ones already (e.g. the answer to a repeated SyncRequest)
        parts = self._chunks.setdefault((ch.round, ch.sha256), {})
        if ch.total > 4096 or len(self._chunks) > 4:
            self._chunks.clear()
            self._reject("checkpoint_too_big", f"round {ch.round}: {ch.total} chunks")
            return
        parts[ch.index] = ch.data
        if len(parts) < ch.total:
            return
        data = b"".join(parts[i] for i in range(ch.total))
        del self._chunks[(ch.round, ch.sha256)]
        if len(data) != 4 * self.st.nnz or hashlib.sha256(data).hexdigest() != ch.sha256:
            self._reject("checkpoint_bad", f"round {ch.round}: {len(data)} bytes, sha256 mismatch or wrong size")
            return
        values = values_from_bytes(data)
        if not bool(torch.isfinite(values).all()):
            self._reject("checkpoint_bad", f"round {ch.round}: non-finite values")
            return
        log.info("checkpoint of round %d installed (%d values)", ch.round, values.numel())
        self.counters["checkpoints_installed"] += 1
        self.need_full_sync = False
        self.known_round = max(self.known_round, ch.round)
        self._commit(ch.round, values, ch.sha256)

    def _on_error(self, err: ErrorMsg) -> None:
        try:
            name = ErrorCode(err.code).name
        except ValueError:
            name = f"code {err.code}"
        self.counters[f"coordinator_error_{name.lower()}"] += 1
        if err.code == ErrorCode.UNKNOWN_CLIENT:  # it (re)started after our Join: announce ourselves again
            log.info("coordinator does not know us (%s): joining again", err.reason)
            self._send_join()
            return
        level = logging.ERROR if err.code in (ErrorCode.FINGERPRINT_MISMATCH, ErrorCode.MASK_MISMATCH) else logging.WARNING
        log.log(level, "coordinator says %s: %s", name, err.reason)

    def _maybe_sync(self) -> None:
        """SyncRequest when behind, once after each (re)connection, and while a result is overdue."""
        behind = self.need_full_sync or self.st.round < self.known_round
        plan = self.plan
        overdue = (
            plan is not None and self.st.trained_round == plan.round > self.st.round
            and time.time() > plan.deadline + self.cfg.sync_retry_s
        )  # fmt: skip
        if not (behind or overdue or self._sync_check):
            return
        if time.monotonic() - self._last_sync < self.cfg.sync_retry_s:
            return
        self._sync_check = False
        self._last_sync = time.monotonic()
        have = self.st.round
        self.link.publish(self.topics.sync(self.cid), encode(SyncRequest(client="", have_round=have)), qos=1)
        self.counters["sync_requests"] += 1
        log.info("asked for rounds after %d (fleet is at %d)", have, self.known_round)

    # -- training --------------------------------------------------------------------------------
    def _step(self) -> None:
        job = self.job
        assert job is not None
        t = len(job.done)
        p = job.plan
        out = self.trainer.step(p.seeds[t], p.eps, p.lr, p.dist, p.batch_size or self.cfg.batch_size, job.pointer)
        rec = StepRecord(t, out.g, out.loss, out.data_pointer)
        self.store.record_step(p.round, job.key, rec)
        job.done.append(rec)
        job.pointer = out.data_pointer
        self.last_step_s = out.seconds
        self.counters["steps"] += 1
        log.debug("round %d step %d/%d: g=%.6g loss=%.4f %.2fs", p.round, t + 1, job.steps, out.g, out.loss, out.seconds)
        if len(job.done) == job.steps:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        p = job.plan
        grads = tuple(r.g for r in job.done)
        loss = sum(r.loss for r in job.done) / len(job.done)
        upd = Update(round=p.round, msg_id=job.key, grads=grads, n_samples=self.trainer.n_samples,
                     fp_tag=self.fp_tag, loss=loss)
        self.store.finish_training(p.round, job.key, job.key, self.topics.up(self.cid), encode(upd), job.pointer)
        self.st = self.store.load() or self.st
        self.job = None
        self.counters["rounds_trained"] += 1
        log.info("round %d trained: %d step(s), mean loss %.4f; update queued", p.round, len(grads), loss)
        if self.link.connected.is_set():
            self._resend_due()

    # -- heartbeat -------------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        assert self.telemetry is not None
        r = self.telemetry.read()
        job = self.job
        return Heartbeat(
            client="", ts=time.time(), cpu_pct=r.cpu_pct, rss_bytes=r.rss_bytes, gpu_mem_bytes=r.gpu_mem_bytes,
            temp_c=r.temp_c, power_w=r.power_w, step_time_s=self.last_step_s,
            peak_mem_bytes=self.trainer.peak_mem_bytes,
            round=job.plan.round if job is not None else max(self.st.round, -1),
        )

    def _heartbeats(self) -> None:
        topic = self.topics.hb(self.cid)
        while not self.stop_event.wait(self.cfg.heartbeat_s):
            if not self.link.connected.is_set():
                continue
            try:
                self.link.publish(topic, encode(self.heartbeat()), qos=0)
            except (RuntimeError, ValueError) as exc:  # queue full, or a reading out of range
                log.warning("heartbeat skipped: %s", exc)


__all__ = ["EdgeClient", "Job", "plan_key"]
