"""The client's round rules without I/O: decoded messages, connection events and the clock go in,
actions come out. The client side of docs/ARCHITECTURE.md "Round lifecycle", in one place.

`ClientRounds` reads no socket, no database, no clock and holds no model. `EdgeClient`
(edge_client/service/client.py) feeds it what MQTT delivers and carries its actions out against
`StateStore`, `Trainer` and `MqttLink`; an in-process simulator can carry them out in memory instead.
The only arithmetic it does itself is on the flat value buffer (`shared.apply.apply_round`,
`values_checksum`, `edge_client.engine.spsa.local_update`): pure functions, testable on a tiny tensor.

Events (each takes `now`, unix seconds, and returns the actions to carry out, in order; carry them all
out before the next event):
    connected(now)                  a (re)connection: Join, then one SyncRequest at the next tick
    disconnected(now)               no SyncRequest until the next connected()
    handle(msg, now)                a decoded message from a coordinator, dispatched by type:
      on_plan(plan, now)            a RoundPlan (topic `plan`, retained); the plan of a round whose Update
                                    is queued and unconfirmed again -> ResendUpdates
      on_result(result, now)        a RoundResult (result/{r} or result/latest)
      on_replay(replay, now)        a Replay on to/{client}
      on_chunk(chunk, now)          a CheckpointChunk on to/{client} (edge_client/service/chunks.py)
      on_error(err, now)            an ErrorMsg on to/{client}: UNKNOWN_CLIENT -> Join; a refused Join
                                    (FINGERPRINT/MASK/QUANT_MISMATCH) -> Exit when real, else re-Join with
                                    back-off; RATE_LIMITED -> SlowDown (edge_client/service/refusals.py);
                                    a final update refusal -> DropQueued
    tick(now)                       maybe a Join (back-off) or a SyncRequest (+ ResendUpdates when a result
                                    is overdue), then at most ONE TrainStep
    step_done(result, data_pointer) the TrainStep just returned was carried out (engine result, pointer after)

The action types are in edge_client/service/actions.py.

A TrainStep is a request: left undone (e.g. while stopping) it changes nothing and the next tick asks
again. Carried out, it must be answered with step_done() before any other event.

Invariant: `values` are the values at `round` (what `Commit` persisted); the trainer's buffer holds the
local path of `job` while a round trains, and `values` otherwise (`LoadValues` keeps it so).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

import torch

from edge_client.engine.spsa import StepResult, local_update
from edge_client.privacy import DeviceBudget, dp_refusal
from edge_client.service.actions import (
    EXIT_MISMATCH,
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
from edge_client.service.chunks import ChunkAssembler
from edge_client.service.job import FINAL_FOR_UPDATE, Identity, Job, Progress, update_msg_id
from edge_client.service.refusals import REFUSALS, JoinBackoff
from edge_client.service.runwatch import RunWatch
from shared.apply import apply_round, values_checksum
from shared.fingerprint import fp_tag
from shared.logthrottle import LogThrottle
from shared.messages import (
    CheckpointChunk,
    ErrorCode,
    ErrorMsg,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Update,
)
from shared.sampling import plan_steps

log = logging.getLogger(__name__)

__all__ = ["FINAL_FOR_UPDATE", "ClientRounds", "Identity", "Job", "Progress", "update_msg_id"]  # job.py's re-exported


class ClientRounds:
    """Every client-side round rule; see the module docstring for the events and actions.

    A fresh client: `ClientRounds(me, initial_values)`. After a restart, pass what StateStore saved:
    `values` (at `round`), `data_pointer`, `trained_round`/`trained_msg_id` (the last queued Update) and
    `progress` (steps of an unfinished round). `initial_values()` returns v_0 (CPU fp32 (nnz,)); it is
    called for a fresh client and on every reset, so v_0 need not stay in memory."""

    def __init__(
        self,
        me: Identity,
        initial_values: Callable[[], torch.Tensor],
        *,
        values: torch.Tensor | None = None,
        round: int = -1,
        data_pointer: int = 0,
        trained_round: int = -1,
        trained_msg_id: int = 0,
        progress: Progress | None = None,
        sync_retry_s: float = 10.0,
        privacy: DeviceBudget | None = None,
        exit_when_run_over: bool = False,
    ) -> None:
        self.me = me
        self.privacy = privacy  # None: this device cannot train privately and refuses DP plans
        self.fp_tag = fp_tag(me.fingerprint)
        self._initial_values = initial_values
        self.values = initial_values() if values is None else values
        self.round = round
        self.checksum = values_checksum(self.values)
        self.data_pointer = data_pointer
        self.trained_round = trained_round
        self.trained_msg_id = trained_msg_id
        self.sync_retry_s = sync_retry_s
        self.counters: Counter[str] = Counter()
        self._quiet = LogThrottle(log)  # "catching up" comes once per round while far behind: one line per 10 s
        self.plan: RoundPlan | None = None  # the latest plan of our fleet
        self.job: Job | None = None
        self.known_round = round  # highest round the fleet is known to have finished
        self.need_full_sync = False  # reset to v_0: catch up from round -1 whatever known_round says
        self.online = False
        self._saved = progress
        self._refused_round = -2
        self._sync_check = False
        self._last_sync = -math.inf
        self._chunks = ChunkAssembler(int(self.values.numel()), self.reject)
        self.joins = JoinBackoff(me.fleet, (me.fingerprint, me.mask_id), self.counters)  # refusals, slow-down
        self.exiting: Exit | None = None
        self._dp_refused = -2  # the round whose DP refusal was logged last
        self.runs = RunWatch(me.fleet)  # the coordinator's run lifecycle (retained on `run`, protocol 1.3)
        self.exit_when_run_over = exit_when_run_over

    # -- connection ------------------------------------------------------------------------------
    def connected(self, now: float) -> list[Action]:
        self.online = True
        self._sync_check = True  # results published while we were away may be gone: ask once
        self._last_sync = -math.inf
        self.joins.connected(now)
        # refused before: the back-off schedule decides when the next Join goes out
        return [self._join()] if self.joins.may_join_now(now) else []

    def disconnected(self, now: float) -> list[Action]:
        self.online = False
        return []

    def _join(self) -> SendJoin:
        self.counters["joins"] += 1
        log.info("joining fleet %s as %s at round %d", self.me.fleet, self.me.client_id, self.round)
        return SendJoin(max(self.round, -1))

    # -- messages --------------------------------------------------------------------------------
    def handle(self, msg: Message, now: float) -> list[Action]:
        """Dispatch one decoded coordinator -> client message (the mirror of `RoundBook.handle`)."""
        if isinstance(msg, RoundPlan):
            return self.on_plan(msg, now)
        if isinstance(msg, RoundResult):
            return self.on_result(msg, now)
        if isinstance(msg, Replay):
            return self.on_replay(msg, now)
        if isinstance(msg, CheckpointChunk):
            return self.on_chunk(msg, now)
        if isinstance(msg, ErrorMsg):
            return self.on_error(msg, now)
        if isinstance(msg, RunState):
            return self.on_run(msg, now)
        raise TypeError(f"ClientRounds.handle: {type(msg).__name__} is not a coordinator -> client message")

    def on_run(self, rs: RunState, now: float) -> list[Action]:
        """The run's state (runwatch.py): over, the device catches up, then idles or exits 0 (exit_when_run_over)."""
        if self.runs.note(rs, self.round) and rs.over:
            self.known_round = max(self.known_round, rs.last_round)
        return self._run_over_exit()

    def _run_over_exit(self) -> list[Action]:
        rs = self.runs.state
        if not (self.exit_when_run_over and rs is not None and self.runs.over_at(self.round) and self.exiting is None):
            return []
        self.exiting = Exit(0, f"the run is {rs.state} after round {rs.last_round}; this device holds its final "
                               "values (exit_when_run_over)")  # fmt: skip
        return [self.exiting]

    def on_error(self, err: ErrorMsg, now: float) -> list[Action]:
        try:
            code: ErrorCode | None = ErrorCode(err.code)
            name = code.name if code is not None else ""
        except ValueError:
            code, name = None, f"code {err.code}"
        self.joins.heard()
        self.counters[f"coordinator_error_{name.lower().replace(' ', '_')}"] += 1
        if code == ErrorCode.UNKNOWN_CLIENT:  # it (re)started after our Join: announce ourselves again
            if not self.joins.may_join_now(now):
                log.warning("coordinator does not know us (%s): joining again after the back-off", err.reason)
                return []
            log.info("coordinator does not know us (%s): joining again", err.reason)
            return [self._join()]
        if code in REFUSALS:
            why = self.joins.refused(err, name, self.plan, now)
            return [] if why is None else self._exit(why)
        if code == ErrorCode.RATE_LIMITED:
            return [SlowDown(self.joins.rate_limited(err.reason, now))]
        if code in FINAL_FOR_UPDATE and self.trained_round > self.round:
            log.error("coordinator refused our update of round %d for good (%s: %s): not sending it again",
                      self.trained_round, name, err.reason)
            self.counters["updates_refused"] += 1
            return [DropQueued(self.trained_round)]
        log.warning("coordinator says %s: %s", name, err.reason)
        return []

    def _exit(self, why: str) -> list[Action]:
        me, plan = self.me, self.plan
        fleet = "" if plan is None else f"; fleet {me.fleet} runs model {plan.fingerprint[:12]}/mask {plan.mask_id}"
        quant = f", quant {me.quant}" if me.quant else ""
        reason = (
            f"cannot take part in fleet {me.fleet}: {why}{fleet}; this device holds model {me.fingerprint[:12]}/"
            f"mask {me.mask_id}{quant}. Fix: give the device the fleet's model_dir and mask file (the ones in the "
            "coordinator's config; `meerkat mask report MASK` shows a mask's id and model) and its quant, or set "
            "`fleet` to the fleet this device belongs to; then restart the service"
        )
        self.exiting = Exit(EXIT_MISMATCH, reason)
        self.counters["exit_mismatch"] += 1
        log.critical("%s", reason)
        return [self.exiting]

    def reject(self, reason: str, detail: str) -> None:
        """Count and log a message dropped as invalid (also used by the pump for decode errors)."""
        self.counters[f"rejected_{reason}"] += 1
        log.warning("dropped message (%s): %s", reason, detail)

    # -- plans -----------------------------------------------------------------------------------
    def on_plan(self, plan: RoundPlan, now: float) -> list[Action]:
        if plan.fleet != self.me.fleet:
            self.reject("wrong_fleet", f"plan for fleet {plan.fleet!r}")
            return []
        self.plan = plan
        self.joins.heard()
        self.known_round = max(self.known_round, plan.base_round)
        why = self.joins.contradicted(plan)
        if why is not None:
            return self._exit(why)
        if self._answered(plan):
            return self._resend_for_plan(plan)
        return self._consider_plan()

    def _answered(self, plan: RoundPlan) -> bool:
        """Our Update of this plan is queued and its round's result not yet applied."""
        return (
            plan.round > self.round
            and (self.trained_round, self.trained_msg_id) == (plan.round, update_msg_id(self.me.client_id, plan))
        )  # fmt: skip

    def _resend_for_plan(self, plan: RoundPlan) -> list[Action]:
        """The plan of a round we answered arrived again: the coordinator re-published it (its own link
        reconnected, it restarted, or it extended the deadline) or we re-subscribed. Either way it may not
        hold our Update (a broker that lost its session forgets what it PUBACKed), so send it again: an
        Update counts as delivered only when the round's RoundResult is applied (docs/PROTOCOL.md
        "Delivery"); the coordinator dedupes on (client, round, msg_id)."""
        self.counters["resent_on_plan"] += 1
        log.info("plan %d arrived again; our update is still unconfirmed: publishing it again", plan.round)
        return [ResendUpdates()]

    def _consider_plan(self) -> list[Action]:
        plan, me = self.plan, self.me
        if plan is None or self.job is not None and self.job.plan == plan:
            return []
        if plan.fingerprint != me.fingerprint or plan.mask_id != me.mask_id:
            if self._refused_round != plan.round:  # once per round, not on every reconsideration
                self._refused_round = plan.round
                self.counters["plan_mismatch"] += 1
                log.error(
                    "refusing plan %d: it is for model %s/mask %s, this device holds %s/%s; waiting",
                    plan.round, plan.fingerprint[:12], plan.mask_id, me.fingerprint[:12], me.mask_id,
                )
            return []
        steps = plan_steps(plan, me.client_id)  # compact plans (1.3): the exceptions, else the sampling rule
        if not steps:
            if self.privacy is not None and plan.dp_clip is not None:  # keep `exhausted` current: the heartbeat
                # tells the sampler (coordinator) whether a full round would still fit
                self._privacy_refuses(plan, len(plan.seeds), "round %d is not ours, but ours would not fit: %s")
            log.debug("round %d: not sampled", plan.round)
            return []
        if plan.round <= self.round:
            return []  # we already hold this round's result
        msg_id = update_msg_id(me.client_id, plan)
        if self.job is not None and (self.job.plan.round, self.job.msg_id) == (plan.round, msg_id):
            self.job.plan = plan  # re-issued (deadline extension, more clients): the same work for us, go on
            return []
        if (self.trained_round, self.trained_msg_id) == (plan.round, msg_id):
            return []  # update already queued/sent; waiting for the result
        if plan.base_round > self.round:
            self._quiet.log("catchup-plan", logging.INFO, "round %d starts from round %d, we are at %d: catching up "
                            "first (%d rounds behind)", plan.round, plan.base_round, self.round,
                            plan.base_round - self.round)  # fmt: skip
            return []  # tick() asks (known_round); the plan is reconsidered after each commit
        if plan.base_round < self.round:
            log.warning("ignoring plan %d: base round %d is older than our round %d", plan.round,
                        plan.base_round, self.round)
            return []
        if plan.values_checksum != self.checksum:
            log.error("plan %d expects values %s at round %d, ours are %s: resyncing from scratch",
                      plan.round, plan.values_checksum[:12], self.round, self.checksum[:12])
            self.counters["checksum_mismatch"] += 1
            return self._reset_to_initial()
        if self._privacy_refuses(plan, steps):
            return []
        return self._start_job(plan, msg_id, steps)

    def _privacy_refuses(self, plan: RoundPlan, steps: int, say: str = "not training round %d: %s") -> bool:
        """`privacy.dp_refusal` of this plan and step count, logged once per round with `say`."""
        why = dp_refusal(self.privacy, plan, steps)
        if why is not None and self._dp_refused != plan.round:  # once per round
            self._dp_refused = plan.round
            self.counters["dp_refused"] += 1
            log.warning(say, plan.round, why)
        return why is not None

    def _start_job(self, plan: RoundPlan, msg_id: int, steps: int) -> list[Action]:
        saved, self._saved = self._saved, None  # saved steps serve the first job after a restart only
        job = Job(plan, msg_id, steps, data_pointer=self.data_pointer)
        local = self.values
        if saved is not None and (saved.round, saved.msg_id) == (plan.round, msg_id) and len(saved.results) < steps:
            dist = plan.dist
            for t, res in enumerate(saved.results):  # the local path, by the very rule each step applied
                local = local_update(local, plan.seeds[t], res.g, plan.lr, dist)
            job.results, job.data_pointer = list(saved.results), saved.data_pointer
            log.info("round %d: resuming at step %d/%d", plan.round, len(job.results), steps)
        else:
            log.info("round %d: training %d step(s) from round %d", plan.round, steps, plan.base_round)
        self.job = job
        return [LoadValues(local)]

    # -- training --------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        acts: list[Action] = []
        if self.exiting is not None:
            return []  # the pump is stopping
        if self.runs.over_at(self.round):
            return self._run_over_exit()  # idle: the coordinator is gone, nobody would answer a Join or sync
        if self.online:
            if self.joins.rejoin_due(now):  # after a refused Join: 2, 4, 8 ... s later
                acts.append(self._join())
            acts += self._maybe_sync(now)
            self.joins.watch_silence(now)
        job = self.job
        if job is not None:
            p, t = job.plan, len(job.results)
            dp = self.privacy.step(p, job.msg_id, t) if self.privacy is not None else None
            acts.append(TrainStep(p.round, job.msg_id, t, p.seeds[t], p.eps, p.lr, p.dist,
                                  p.batch_size, job.data_pointer, dp))
        return acts

    def step_done(self, result: StepResult, data_pointer: int) -> list[Action]:
        job = self.job
        if job is None or result.seed != job.plan.seeds[len(job.results)]:
            raise RuntimeError("step_done() must answer the TrainStep of the last tick(), before any other event")
        p, t = job.plan, len(job.results)
        job.results.append(result)
        job.data_pointer = data_pointer
        self.counters["steps"] += 1
        log.debug("round %d step %d/%d: g=%.6g loss=%.4f %.2fs", p.round, t + 1, job.steps, result.g, result.loss,
                  result.seconds)
        acts: list[Action] = [SaveStep(p.round, job.msg_id, t, result, data_pointer)]
        if len(job.results) < job.steps:
            return acts
        spend = self.privacy.spend_of(p, job.steps) if self.privacy is not None else None
        # under DP the loss (a function of the data, not noised) stays on the device
        loss = 0.0 if spend is not None else sum(r.loss for r in job.results) / len(job.results)
        upd = Update(round=p.round, msg_id=job.msg_id, grads=tuple(r.g for r in job.results),
                     n_samples=self.me.n_samples, fp_tag=self.fp_tag, loss=loss)
        self.trained_round, self.trained_msg_id, self.data_pointer = p.round, job.msg_id, data_pointer
        self.job = None
        self.counters["rounds_trained"] += 1
        log.info("round %d trained: %d step(s), mean loss %.4f; update queued", p.round, len(upd.grads), loss)
        if spend is not None and self.privacy is not None:
            self.privacy.charge(spend)
        return [*acts, QueueUpdate(upd, data_pointer, spend)]

    # -- results ---------------------------------------------------------------------------------
    def on_result(self, res: RoundResult, now: float) -> list[Action]:
        self.joins.heard()
        self.known_round = max(self.known_round, res.round)
        if res.round <= self.round:
            return []  # duplicate (retained result/latest, or result/{r} next to it)
        if res.round > self.round + 1:
            self._quiet.log("catchup-result", logging.INFO, "result %d arrived, we are at round %d: catching up "
                            "(%d rounds behind)", res.round, self.round, res.round - self.round, now=now)  # fmt: skip
            return []  # tick() asks for the missing ones
        return self._apply(res)[0]

    def _apply(self, res: RoundResult) -> tuple[list[Action], bool]:
        new = apply_round(self.values, res.seeds, res.scalars, res.lr, res.dist)
        checksum = values_checksum(new)
        if checksum != res.values_checksum:
            log.error("round %d result gives checksum %s, coordinator says %s: resyncing from scratch",
                      res.round, checksum[:12], res.values_checksum[:12])
            self.counters["checksum_mismatch"] += 1
            return self._reset_to_initial(), False
        log.info("applied round %d (%d clients, %d scalars): checksum %s", res.round, res.n_clients,
                 len(res.scalars), checksum[:12])
        return self._commit(res.round, new, checksum), True

    def _commit(self, round: int, values: torch.Tensor, checksum: str) -> list[Action]:
        acts: list[Action] = [Commit(round, values, checksum)]
        self.round, self.values, self.checksum = round, values, checksum
        job = self.job
        if job is not None and job.plan.round <= round:
            log.info("round %d closed before we finished (%d/%d steps): dropping it", job.plan.round,
                     len(job.results), job.steps)
            self.counters["rounds_missed"] += 1
            acts.append(DropRound(job.plan.round, len(job.results), job.steps))
            self.job = None
        started = self._consider_plan()
        if not started and self.job is None:
            acts.append(LoadValues(values))
        return acts + started

    def _reset_to_initial(self) -> list[Action]:
        """Our values went wrong somewhere: back to v_0 (round -1), then Replay/checkpoint from there."""
        self.job = None
        v0 = self._initial_values()
        self.round, self.values, self.checksum = -1, v0, values_checksum(v0)
        self.need_full_sync = True
        self._last_sync = -math.inf  # ask at the next tick
        return [Commit(-1, v0, self.checksum), LoadValues(v0)]

    # -- catching up -----------------------------------------------------------------------------
    def on_replay(self, rep: Replay, now: float) -> list[Action]:
        self.joins.heard()
        self.joins.joined()  # SyncRequests are answered for joined clients only
        log.info("replay of %d result(s) (rounds %s)", len(rep.results),
                 f"{rep.results[0].round}..{rep.results[-1].round}" if rep.results else "-")
        acts: list[Action] = []
        for res in sorted(rep.results, key=lambda r: r.round):
            self.known_round = max(self.known_round, res.round)
            if res.round == self.round + 1:
                applied, ok = self._apply(res)
                acts += applied
                if not ok:
                    return acts
                self.counters["rounds_replayed"] += 1
        self.need_full_sync = False
        if self.round < self.known_round:
            self._last_sync = -math.inf  # still behind: ask for the rest at once
        return acts

    def on_chunk(self, ch: CheckpointChunk, now: float) -> list[Action]:
        self.joins.heard()
        self.joins.joined()
        if ch.round <= self.round and not self.need_full_sync:
            return []  # we hold these values or newer ones already (e.g. the answer to a repeated SyncRequest)
        values = self._chunks.add(ch)
        if values is None:
            return []
        log.info("checkpoint of round %d installed (%d values)", ch.round, values.numel())
        self.counters["checkpoints_installed"] += 1
        self.need_full_sync = False
        self.known_round = max(self.known_round, ch.round)
        return self._commit(ch.round, values, ch.sha256)

    def _maybe_sync(self, now: float) -> list[Action]:
        """SyncRequest when behind, once after each (re)connection, and while a result is overdue."""
        if self.joins.quiet(now):
            return []
        behind = self.need_full_sync or self.round < self.known_round
        plan = self.plan
        overdue = (
            plan is not None and self.trained_round == plan.round > self.round
            and now > plan.deadline + self.sync_retry_s
        )  # fmt: skip
        if not (behind or overdue or self._sync_check):
            return []
        if self._last_sync <= now < self._last_sync + self.sync_retry_s:
            return []  # asked recently (a clock that jumped back does not hold the next ask)
        self._sync_check = False
        self._last_sync = now
        self.counters["sync_requests"] += 1
        log.info("asking for rounds after %d (fleet is at %d)", self.round, self.known_round)
        if overdue:
            log.info("result of round %d is overdue: publishing its update again", self.trained_round)
            return [SendSync(self.round), ResendUpdates()]
        return [SendSync(self.round)]


__all__ = ["FINAL_FOR_UPDATE", "ClientRounds", "Identity", "Job", "Progress", "update_msg_id"]
