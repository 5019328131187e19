"""ClientRounds, the client's round rules without I/O: one test per rule, no broker, no model.

The "engine" here is a stand-in that computes g from the seed (any deterministic float would do): the
rules under test decide WHICH step runs on WHICH values and what goes out, not how a loss is computed.
Values are a 64-entry buffer; results come from the real `apply_round`, so checksums are real."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch

from edge_client.engine.spsa import StepResult, local_update, to_f32
from edge_client.service.rounds import (
    EXIT_MISMATCH,
    Action,
    ClientRounds,
    Commit,
    DropQueued,
    DropRound,
    Exit,
    Identity,
    LoadValues,
    Progress,
    QueueUpdate,
    ResendUpdates,
    SaveStep,
    SendJoin,
    SendSync,
    SlowDown,
    TrainStep,
    update_msg_id,
)
from shared.apply import apply_round, values_checksum
from shared.messages import CheckpointChunk, ErrorCode, ErrorMsg, Replay, RoundPlan, RoundResult

FP, MASK, ME, FLEET = "ab" * 32, "0123456789abcdef", "dev1", "f1"
V0 = torch.linspace(-1.0, 1.0, 64)
IDENTITY = Identity(ME, FLEET, FP, MASK, n_samples=24)


def core(**kw: Any) -> ClientRounds:
    c = ClientRounds(IDENTITY, lambda: V0.clone(), sync_retry_s=5.0, **kw)
    c.connected()
    return c


def plan(round: int = 0, base_values: torch.Tensor = V0, **kw: Any) -> RoundPlan:
    fields: dict[str, Any] = dict(
        fleet=FLEET, round=round, seeds=(11, 22, 33), lr=1e-2, eps=1e-3, dist="rademacher", steps={ME: 3},
        base_round=round - 1, deadline=1000.0, fingerprint=FP, mask_id=MASK, batch_size=4,
        values_checksum=values_checksum(base_values),
    )  # fmt: skip
    fields.update(kw)
    return RoundPlan(**fields)


def result(round: int, before: torch.Tensor, scalars: tuple[float, ...] = (0.5, -0.25)) -> tuple[RoundResult, torch.Tensor]:
    seeds = tuple(100 * round + t for t in range(len(scalars)))
    after = apply_round(before, seeds, scalars, 1e-2, "rademacher")
    return RoundResult(round, seeds, scalars, 1e-2, "rademacher", 2, values_checksum(after)), after


def engine_step(req: TrainStep) -> tuple[StepResult, int]:
    """A deterministic stand-in for Trainer.step: g from the seed, pointer advanced by the batch."""
    g = to_f32(((req.seed * 2654435761) % 1000 - 500) / 250.0)
    return StepResult(g, 2.0 + g, 2.0 - g, 0.01, req.seed), req.data_pointer + req.batch_size


def run_steps(c: ClientRounds, now: float = 0.0, limit: int = 100) -> list[Action]:
    """Tick until no TrainStep comes; every action out (TrainSteps answered with the stand-in engine)."""
    out: list[Action] = []
    for _ in range(limit):
        acts = c.tick(now)
        out += acts
        steps = [a for a in acts if isinstance(a, TrainStep)]
        if not steps:
            return out
        out += c.step_done(*engine_step(steps[0]))
    raise AssertionError("never finished")


def of(kind: type, acts: list[Action]) -> list[Any]:
    return [a for a in acts if isinstance(a, kind)]


def test_accept_plan_and_train_t_k_steps() -> None:
    c = core()
    p = plan(steps={ME: 2, "other": 3})
    (load,) = c.on_plan(p)
    assert isinstance(load, LoadValues) and torch.equal(load.values, V0)
    acts = run_steps(c)
    reqs = of(TrainStep, acts)
    assert [(r.step, r.seed, r.data_pointer, r.batch_size) for r in reqs] == [(0, 11, 0, 4), (1, 22, 4, 4)]  # T_k = 2
    assert [s.step for s in of(SaveStep, acts)] == [0, 1]
    (q,) = of(QueueUpdate, acts)
    msg_id = update_msg_id(ME, p)
    assert (q.update.round, q.update.msg_id, q.update.n_samples, q.data_pointer) == (0, msg_id, 24, 8)
    assert q.update.grads == tuple(engine_step(r)[0].g for r in reqs)
    assert (c.trained_round, c.trained_msg_id, c.data_pointer, c.job) == (0, msg_id, 8, None)
    # the same plan again: not trained twice (the kept update is published again: delivery = the result)
    assert c.on_plan(p) == [ResendUpdates()] and of(TrainStep, c.tick(0.0)) == []


def test_reissued_plan_with_the_same_work_continues_the_round() -> None:
    c = core()
    c.on_plan(plan())
    (req,) = of(TrainStep, c.tick(0.0))
    c.step_done(*engine_step(req))
    extended = plan(steps={ME: 3, "late": 3}, deadline=2000.0)  # same seeds and T_k: same msg_id
    assert c.on_plan(extended) == [] and of(TrainStep, c.tick(0.0))[0].step == 1


def test_not_sampled() -> None:
    c = core()
    assert c.on_plan(plan(steps={"other": 3})) == [] and c.tick(0.0) == [SendSync(-1)] and c.job is None


def test_wrong_fleet() -> None:
    c = core()
    assert c.on_plan(plan(fleet="f2")) == [] and c.plan is None
    assert c.counters["rejected_wrong_fleet"] == 1


def test_fingerprint_or_mask_mismatch_refused_once_per_round() -> None:
    c = core()
    assert c.on_plan(plan(fingerprint="cd" * 32)) == [] and c.on_plan(plan(mask_id="f" * 16)) == []
    assert c.counters["plan_mismatch"] == 1 and c.job is None  # once per round, however often it comes
    assert c.on_plan(plan(round=1, base_round=-1, mask_id="f" * 16)) == [] and c.counters["plan_mismatch"] == 2


def test_plan_whose_base_is_ahead_syncs_first() -> None:
    c = core()
    c.tick(0.0)  # the once-after-connect SyncRequest
    assert c.on_plan(plan(round=5, base_round=4)) == [] and c.job is None
    assert c.tick(1.0) == []  # asked at t=0, sync_retry_s = 5
    assert c.tick(6.0) == [SendSync(-1)]  # behind (the fleet is at 4): ask again


def test_resume_at_step_k_after_restart_gives_the_same_actions() -> None:
    p = plan(steps={ME: 3})
    whole = core()
    whole.on_plan(p)
    full = run_steps(whole)
    # the same client, restarted after 2 saved steps: same TrainStep for step 2, same Update bytes
    saved = of(SaveStep, full)[:2]
    again = core(progress=Progress(0, update_msg_id(ME, p), tuple(s.result for s in saved), saved[-1].data_pointer))
    (load,) = again.on_plan(p)
    assert isinstance(load, LoadValues)
    local = V0
    for s in saved:
        local = local_update(local, s.result.seed, s.result.g, p.lr, "rademacher")
    assert torch.equal(load.values, local)
    rest = run_steps(again)
    assert of(TrainStep, rest) == of(TrainStep, full)[2:] and of(QueueUpdate, rest) == of(QueueUpdate, full)
    # saved steps of another plan are not resumed: the round starts over
    other = core(progress=Progress(0, 12345, tuple(s.result for s in saved), 8))
    other.on_plan(p)
    assert of(TrainStep, other.tick(0.0))[0].step == 0


def test_result_applied_and_verified() -> None:
    c = core()
    res, after = result(0, V0)
    commit, load = c.on_result(res)
    assert isinstance(commit, Commit) and (commit.round, commit.checksum) == (0, res.values_checksum)
    assert torch.equal(commit.values, after) and isinstance(load, LoadValues) and torch.equal(load.values, after)
    assert (c.round, c.checksum) == (0, values_checksum(after))
    assert c.on_result(res) == []  # the retained result/latest next to result/0: a duplicate


def test_result_for_a_round_ahead_syncs() -> None:
    c = core()
    c.tick(0.0)
    res, _ = result(3, V0)
    assert c.on_result(res) == [] and c.round == -1 and c.known_round == 3
    assert c.tick(10.0) == [SendSync(-1)]


def test_checksum_mismatch_resets_to_v0_and_syncs_from_minus_1() -> None:
    c = core()
    res, after = result(0, V0)
    c.on_result(res)
    c.tick(0.0)
    bad, _ = result(1, V0)  # computed from the wrong base: its checksum cannot match ours
    commit, load = c.on_result(bad)
    assert isinstance(commit, Commit) and commit.round == -1 and torch.equal(commit.values, V0)
    assert isinstance(load, LoadValues) and torch.equal(load.values, V0)
    assert c.counters["checksum_mismatch"] == 1 and c.round == -1
    assert c.tick(0.5) == [SendSync(-1)]  # at once, not after sync_retry_s
    # a plan whose base values are not ours (same round): the same reset
    c2 = core()
    c2.on_result(res)
    acts = c2.on_plan(plan(round=1, base_values=V0))
    assert [type(a) for a in acts] == [Commit, LoadValues] and c2.round == -1 and c2.need_full_sync


def test_replay_applies_in_order() -> None:
    c = core()
    r0, v1 = result(0, V0)
    r1, v2 = result(1, v1, (1.0,))
    r2, v3 = result(2, v2, (-2.0, 0.5, 0.125))
    acts = c.on_replay(Replay((r2, r0, r1)))  # out of order on the wire: applied 0, 1, 2
    assert [a.round for a in of(Commit, acts)] == [0, 1, 2]
    assert c.checksum == values_checksum(v3) and c.counters["rounds_replayed"] == 3 and c.tick(0.0) == [SendSync(2)]


def _chunks(values: torch.Tensor, round: int, size: int) -> list[CheckpointChunk]:
    data = values.numpy().astype("<f4").tobytes()
    sha = hashlib.sha256(data).hexdigest()
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [CheckpointChunk(round, i, len(parts), sha, d) for i, d in enumerate(parts)]


def test_checkpoint_chunk_reassembly() -> None:
    c = core()
    target = V0 * 3.0
    chunks = _chunks(target, 7, 100)
    assert all(c.on_chunk(ch) == [] for ch in reversed(chunks[1:]))  # any order
    commit, load = c.on_chunk(chunks[0])
    assert isinstance(commit, Commit) and commit.round == 7 and torch.equal(commit.values, target)
    assert (c.round, c.checksum, c.counters["checkpoints_installed"]) == (7, values_checksum(target), 1)
    assert c.on_chunk(chunks[0]) == []  # we hold round 7 now


def test_checkpoint_with_a_bad_sha_or_too_many_chunks_is_rejected() -> None:
    c = core()
    (one,) = _chunks(V0 * 2.0, 3, 4096)
    assert c.on_chunk(CheckpointChunk(3, 0, 1, "0" * 64, one.data)) == []
    assert c.counters["rejected_checkpoint_bad"] == 1
    assert c.on_chunk(CheckpointChunk(3, 0, 5000, one.sha256, b"x")) == []
    assert c.counters["rejected_checkpoint_too_big"] == 1
    short = CheckpointChunk(3, 0, 1, hashlib.sha256(b"abcd").hexdigest(), b"abcd")  # right sha, wrong size
    assert c.on_chunk(short) == [] and c.counters["rejected_checkpoint_bad"] == 2 and c.round == -1


def test_unknown_client_error_rejoins() -> None:
    c = core()
    c.on_result(result(0, V0)[0])
    assert c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?")) == [SendJoin(0)]
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "slow down")) == [SlowDown(10.0)]
    assert c.counters["coordinator_error_unknown_client"] == 1 and c.counters["coordinator_error_rate_limited"] == 1


def test_result_arriving_before_we_finished_drops_the_round() -> None:
    c = core()
    c.on_plan(plan())
    (req,) = of(TrainStep, c.tick(0.0))
    c.step_done(*engine_step(req))
    res, after = result(0, V0)
    acts = c.on_result(res)
    assert [type(a) for a in acts] == [Commit, DropRound, LoadValues]
    assert acts[1] == DropRound(0, 1, 3) and isinstance(acts[2], LoadValues) and torch.equal(acts[2].values, after)
    assert c.job is None and c.data_pointer == 0 and c.counters["rounds_missed"] == 1  # the pointer did not move
    assert of(TrainStep, c.tick(0.0)) == []


def test_overdue_result_sends_sync_request() -> None:
    c = core()
    c.on_plan(plan(deadline=100.0))
    run_steps(c, now=1.0)  # includes the once-after-connect SyncRequest at t=1
    assert c.tick(104.0) == []  # trained, waiting: not overdue before deadline + sync_retry_s
    # overdue: ask, and publish the queued update again (a broker restart may have lost it after its PUBACK)
    assert c.tick(105.5) == [SendSync(-1), ResendUpdates()]
    assert c.tick(107.0) == [] and c.tick(111.0) == [SendSync(-1), ResendUpdates()]  # then every sync_retry_s


def test_no_sync_request_while_offline_and_one_after_connect() -> None:
    c = ClientRounds(IDENTITY, lambda: V0.clone(), sync_retry_s=5.0)
    c.on_result(result(4, V0)[0])  # far ahead
    assert c.tick(0.0) == []  # offline
    assert c.connected() == [SendJoin(-1)] and c.tick(0.0) == [SendSync(-1)]
    c.disconnected()
    assert c.tick(100.0) == []


def test_step_done_without_a_train_step_is_a_caller_bug() -> None:
    c = core()
    with pytest.raises(RuntimeError, match="step_done"):
        c.step_done(StepResult(0.5, 1.0, 1.0, 0.0, 11), 4)


def test_republished_plan_of_an_answered_round_resends_the_update() -> None:
    # a PUBACK is not delivery: the coordinator re-publishes its open plan after each (re)connect of its
    # link, and a device that answered that round sends its kept Update again (docs/PROTOCOL.md "Delivery")
    c = core()
    p = plan(deadline=100.0)
    c.on_plan(p)
    assert of(QueueUpdate, run_steps(c))
    assert c.on_plan(p) == [ResendUpdates()]  # same plan again (re-subscribe, coordinator reconnect)
    later = plan(deadline=400.0, steps={ME: 3, "other": 3})  # an extension: same work for us
    assert c.on_plan(later) == [ResendUpdates()] and c.counters["resent_on_plan"] == 2
    res, after = result(0, V0)
    c.on_result(res)
    assert c.on_plan(p) == []  # the result is applied: the update is delivered, nothing to send
    assert c.on_plan(plan(deadline=100.0, seeds=(7, 8, 9))) == []  # another plan of round 0: not ours to resend


def test_plan_of_a_round_being_trained_is_not_a_resend() -> None:
    c = core()
    p = plan()
    c.on_plan(p)
    assert c.on_plan(p) == []


# ---- refusals (issues 14 and 16) ------------------------------------------------------------------

OTHER_MASK = "f" * 16
MASK_REFUSED = ErrorMsg(ErrorCode.MASK_MISMATCH, f"mask {MASK} is not the fleet's {OTHER_MASK}")


def test_refused_join_confirmed_by_the_plan_exits_with_what_to_fix() -> None:
    c = core()
    assert c.on_plan(plan(mask_id=OTHER_MASK)) == []  # the retained plan alone: refuse it and wait
    (ex,) = c.on_error(MASK_REFUSED)
    assert isinstance(ex, Exit) and ex.code == EXIT_MISMATCH == 6
    for needle in (f"fleet {FLEET}", "MASK_MISMATCH", f"mask {OTHER_MASK}", f"mask {MASK}", FP[:12], "Fix:", "mask file"):
        assert needle in ex.reason, (needle, ex.reason)
    assert c.tick(100.0) == [] and c.counters["exit_mismatch"] == 1  # nothing more while the pump stops


def test_refusal_first_then_a_mismatching_plan_exits() -> None:
    c = core()
    assert c.on_error(ErrorMsg(ErrorCode.FINGERPRINT_MISMATCH, "base model ...")) == []  # no plan yet: not sure
    (ex,) = c.on_plan(plan(fingerprint="cd" * 32))
    assert isinstance(ex, Exit) and "cdcdcdcdcdcd" in ex.reason and "FINGERPRINT_MISMATCH" in ex.reason


def test_refusal_while_the_plan_matches_is_not_ours_rejoin_with_capped_backoff(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    c.on_plan(plan(steps={"other": 3}))  # the fleet runs exactly our model and mask
    c.tick(0.0)  # the once-after-connect SyncRequest
    joins: list[float] = []
    for _ in range(8):  # a spoofer keeps getting Joins under our id refused: never an Exit
        assert c.on_error(MASK_REFUSED) == []
        t = joins[-1] if joins else 0.0
        while not of(SendJoin, c.tick(t)):
            t += 0.5
        joins.append(t)
    gaps = [b - a for a, b in zip([0.0, *joins[:-1]], joins, strict=True)]
    assert gaps == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0], gaps  # 2 s doubling, capped at 60 s
    assert "not our doing" in caplog.text and any(r.levelname == "ERROR" for r in caplog.records)
    # UNKNOWN_CLIENT while refused: the back-off still decides (no Join storm)
    assert c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?")) == []
    # an answered SyncRequest proves we are joined: back to normal (UNKNOWN_CLIENT -> Join at once)
    c.on_replay(Replay(()))
    assert c.refusals == 0 and c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?")) == [SendJoin(-1)]


def test_quant_refused_three_times_without_a_sign_of_joining_exits() -> None:
    c = core()
    c.on_plan(plan(steps={"other": 3}))  # a plan says nothing about quant
    quant = ErrorMsg(ErrorCode.QUANT_MISMATCH, "quant int8 is not the fleet's nf4")
    assert c.on_error(quant) == [] and c.on_error(quant) == []
    (ex,) = c.on_error(quant)
    assert isinstance(ex, Exit) and "3 times" in ex.reason and "QUANT_MISMATCH" in ex.reason and "quant" in ex.reason
    # a spoofed QUANT_MISMATCH between our accepted Joins: the Replay resets the count
    c2 = core()
    for _ in range(5):
        assert c2.on_error(quant) == []
        c2.on_replay(Replay(()))
    assert c2.exiting is None


def test_no_plan_and_repeated_mask_refusals_exit() -> None:
    c = core()
    assert c.on_error(MASK_REFUSED) == [] and c.on_error(MASK_REFUSED) == []
    (ex,) = c.on_error(MASK_REFUSED)
    assert isinstance(ex, Exit) and "fleet f1 runs" not in ex.reason  # no plan: the fleet's side comes from the reason
    assert OTHER_MASK in ex.reason


def test_reconnect_while_refused_waits_for_the_backoff() -> None:
    c = core()
    c.on_error(MASK_REFUSED)
    c.disconnected()
    assert c.connected() == []  # not at once: the schedule of the refusals
    assert of(SendJoin, c.tick(0.0)) == [] and of(SendJoin, c.tick(2.0)) == [SendJoin(-1)]


def test_rate_limited_slows_sync_and_resends_with_backoff() -> None:
    c = core()
    c.on_result(result(4, V0)[0])  # far behind: wants to sync every 5 s
    assert c.tick(0.0) == [SendSync(-1)]
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync")) == [SlowDown(10.0)]
    assert c.tick(5.0) == [] and c.tick(14.9) == [] and c.tick(15.1) == [SendSync(-1)]  # held 10 s from t=5
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync")) == [SlowDown(20.0)]  # doubling
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync")) == [SlowDown(40.0)]
    for _ in range(5):
        c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"))
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync")) == [SlowDown(120.0)]  # capped


@pytest.mark.parametrize("code", [ErrorCode.UNKNOWN_ROUND, ErrorCode.CONFLICT, ErrorCode.STALE_ROUND,
                                  ErrorCode.NOT_IN_ROUND, ErrorCode.BAD_UPDATE])
def test_final_refusal_of_the_queued_update_drops_it(code: ErrorCode) -> None:
    c = core()
    assert c.on_error(ErrorMsg(code, "x")) == []  # nothing queued: nothing to drop
    c.on_plan(plan())
    run_steps(c)
    assert c.trained_round == 0 and c.on_error(ErrorMsg(code, "x")) == [DropQueued(0)]
    assert c.counters["updates_refused"] == 1
    c.on_result(result(0, V0)[0])
    assert c.on_error(ErrorMsg(code, "x")) == []  # round 0 is committed: its row is gone anyway


def test_silent_fleet_is_reported_loudly(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    for t in (0.0, 10.0, 29.0):
        c.tick(t)
    assert c.counters["coordinator_silent"] == 0
    c.tick(30.5)
    assert c.counters["coordinator_silent"] == 1
    rec = [r for r in caplog.records if "no coordinator on fleet" in r.getMessage()]
    assert rec and rec[0].levelname == "ERROR" and f"'{FLEET}'" in rec[0].getMessage()
    c.tick(45.0)
    assert c.counters["coordinator_silent"] == 1  # not on every tick
    c.tick(61.0)
    assert c.counters["coordinator_silent"] == 2
    c.on_plan(plan(steps={"other": 3}))  # a coordinator spoke: quiet
    c.tick(500.0)
    assert c.counters["coordinator_silent"] == 2
