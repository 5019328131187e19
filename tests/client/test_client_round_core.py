"""ClientRounds, the client's round rules without I/O: one test per rule, no broker, no model.

The "engine" here is a stand-in that computes g from the seed (any deterministic float would do): the
rules under test decide WHICH step runs on WHICH values and what goes out, not how a loss is computed.
Values are a 64-entry buffer; results come from the real `apply_round`, so checksums are real
(tests/client/roundkit.py). Refused Joins and RATE_LIMITED: test_client_refusals.py; checkpoint
reassembly: test_client_chunks.py."""

from __future__ import annotations

import pytest
import torch

from edge_client.engine.spsa import StepResult, local_update
from edge_client.service.actions import (
    Commit,
    DropRound,
    LoadValues,
    QueueUpdate,
    ResendUpdates,
    SaveStep,
    SendJoin,
    SendSync,
    SlowDown,
    TrainStep,
)
from edge_client.service.rounds import ClientRounds, Progress, update_msg_id
from shared.apply import apply_round, values_checksum
from shared.messages import ErrorCode, ErrorMsg, Heartbeat, Replay
from shared.sampling import sample_key

from roundkit import IDENTITY, ME, V0, chunks_of, core, engine_step, of, plan, result, run_steps  # isort: skip


def test_accept_plan_and_train_t_k_steps() -> None:
    c = core()
    p = plan(steps={ME: 2, "other": 3})
    (load,) = c.on_plan(p, 0.0)
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
    assert c.on_plan(p, 0.0) == [ResendUpdates()] and of(TrainStep, c.tick(0.0)) == []


def test_reissued_plan_with_the_same_work_continues_the_round() -> None:
    c = core()
    c.on_plan(plan(), 0.0)
    (req,) = of(TrainStep, c.tick(0.0))
    c.step_done(*engine_step(req))
    extended = plan(steps={ME: 3, "late": 3}, deadline=2000.0)  # same seeds and T_k: same msg_id
    assert c.on_plan(extended, 0.0) == [] and of(TrainStep, c.tick(0.0))[0].step == 1


def test_not_sampled() -> None:
    c = core()
    assert c.on_plan(plan(steps={"other": 3}), 0.0) == [] and c.tick(0.0) == [SendSync(-1)] and c.job is None


@pytest.mark.parametrize("exception", [None, 1])
def test_compact_plan_samples_by_key_and_keeps_the_exceptions(exception: int | None) -> None:
    """1.3 compact plan: not in `steps`, the device runs len(seeds) steps iff its key <= sample_max; an
    entry in `steps` (a MEERKAT-VP limit) wins."""
    key = sample_key(11, ME)  # seeds[0] = 11 in roundkit.plan
    steps = {} if exception is None else {ME: exception}
    c = core()
    c.on_plan(plan(steps=steps, sample_max=key), 0.0)  # the key equal to sample_max: sampled
    assert len(of(TrainStep, run_steps(c))) == (exception or 3)
    below = core()
    assert below.on_plan(plan(steps={}, sample_max=key - 1), 0.0) == [] and below.job is None  # one below: out


def test_wrong_fleet() -> None:
    c = core()
    assert c.on_plan(plan(fleet="f2"), 0.0) == [] and c.plan is None
    assert c.counters["rejected_wrong_fleet"] == 1


def test_fingerprint_or_mask_mismatch_refused_once_per_round() -> None:
    c = core()
    assert c.on_plan(plan(fingerprint="cd" * 32), 0.0) == [] and c.on_plan(plan(mask_id="f" * 16), 0.0) == []
    assert c.counters["plan_mismatch"] == 1 and c.job is None  # once per round, however often it comes
    assert c.on_plan(plan(round=1, base_round=-1, mask_id="f" * 16), 0.0) == [] and c.counters["plan_mismatch"] == 2


def test_plan_whose_base_is_ahead_syncs_first() -> None:
    c = core()
    c.tick(0.0)  # the once-after-connect SyncRequest
    assert c.on_plan(plan(round=5, base_round=4), 0.0) == [] and c.job is None
    assert c.tick(1.0) == []  # asked at t=0, sync_retry_s = 5
    assert c.tick(6.0) == [SendSync(-1)]  # behind (the fleet is at 4): ask again


def test_resume_at_step_k_after_restart_gives_the_same_actions() -> None:
    p = plan(steps={ME: 3})
    whole = core()
    whole.on_plan(p, 0.0)
    full = run_steps(whole)
    # the same client, restarted after 2 saved steps: same TrainStep for step 2, same Update bytes
    saved = of(SaveStep, full)[:2]
    again = core(progress=Progress(0, update_msg_id(ME, p), tuple(s.result for s in saved), saved[-1].data_pointer))
    (load,) = again.on_plan(p, 0.0)
    assert isinstance(load, LoadValues)
    local = V0
    for s in saved:
        local = local_update(local, s.result.seed, s.result.g, p.lr, "rademacher")
    assert isinstance(load, LoadValues) and torch.equal(load.values, local)
    rest = run_steps(again)
    assert of(TrainStep, rest) == of(TrainStep, full)[2:] and of(QueueUpdate, rest) == of(QueueUpdate, full)
    # saved steps of another plan are not resumed: the round starts over
    other = core(progress=Progress(0, 12345, tuple(s.result for s in saved), 8))
    other.on_plan(p, 0.0)
    assert of(TrainStep, other.tick(0.0))[0].step == 0


def test_result_applied_and_verified() -> None:
    c = core()
    res, after = result(0, V0)
    commit, load = c.on_result(res, 0.0)
    assert isinstance(commit, Commit) and (commit.round, commit.checksum) == (0, res.values_checksum)
    assert torch.equal(commit.values, after) and isinstance(load, LoadValues) and torch.equal(load.values, after)
    assert (c.round, c.checksum) == (0, values_checksum(after))
    assert c.on_result(res, 0.0) == []  # the retained result/latest next to result/0: a duplicate


def test_result_for_a_round_ahead_syncs() -> None:
    c = core()
    c.tick(0.0)
    res, _ = result(3, V0)
    assert c.on_result(res, 0.0) == [] and c.round == -1 and c.known_round == 3
    assert c.tick(10.0) == [SendSync(-1)]


def test_checksum_mismatch_resets_to_v0_and_syncs_from_minus_1() -> None:
    c = core()
    res, after = result(0, V0)
    c.on_result(res, 0.0)
    c.tick(0.0)
    bad, _ = result(1, V0)  # computed from the wrong base: its checksum cannot match ours
    commit, load = c.on_result(bad, 0.0)
    assert isinstance(commit, Commit) and commit.round == -1 and torch.equal(commit.values, V0)
    assert isinstance(load, LoadValues) and torch.equal(load.values, V0)
    assert c.counters["checksum_mismatch"] == 1 and c.round == -1
    assert c.tick(0.5) == [SendSync(-1)]  # at once, not after sync_retry_s
    # a plan whose base values are not ours (same round): the same reset
    c2 = core()
    c2.on_result(res, 0.0)
    acts = c2.on_plan(plan(round=1, base_values=V0), 0.0)
    assert [type(a) for a in acts] == [Commit, LoadValues] and c2.round == -1 and c2.need_full_sync


def test_replay_applies_in_order() -> None:
    c = core()
    r0, v1 = result(0, V0)
    r1, v2 = result(1, v1, (1.0,))
    r2, v3 = result(2, v2, (-2.0, 0.5, 0.125))
    acts = c.on_replay(Replay((r2, r0, r1)), 0.0)  # out of order on the wire: applied 0, 1, 2
    assert [a.round for a in of(Commit, acts)] == [0, 1, 2]
    assert c.checksum == values_checksum(v3) and c.counters["rounds_replayed"] == 3 and c.tick(0.0) == [SendSync(2)]


def test_checkpoint_chunk_reassembly() -> None:
    c = core()
    target = V0 * 3.0
    chunks = chunks_of(target, 7, 100)
    assert all(c.on_chunk(ch, 0.0) == [] for ch in reversed(chunks[1:]))  # any order
    commit, load = c.on_chunk(chunks[0], 0.0)
    assert isinstance(commit, Commit) and commit.round == 7 and torch.equal(commit.values, target)
    assert (c.round, c.checksum, c.counters["checkpoints_installed"]) == (7, values_checksum(target), 1)
    assert c.on_chunk(chunks[0], 0.0) == []  # we hold round 7 now


def test_unknown_client_error_rejoins() -> None:
    c = core()
    c.on_result(result(0, V0)[0], 0.0)
    assert c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?"), 0.0) == [SendJoin(0)]
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "slow down"), 0.0) == [SlowDown(10.0)]
    assert c.counters["coordinator_error_unknown_client"] == 1 and c.counters["coordinator_error_rate_limited"] == 1


def test_result_arriving_before_we_finished_drops_the_round() -> None:
    c = core()
    c.on_plan(plan(), 0.0)
    (req,) = of(TrainStep, c.tick(0.0))
    c.step_done(*engine_step(req))
    res, after = result(0, V0)
    acts = c.on_result(res, 0.0)
    assert [type(a) for a in acts] == [Commit, DropRound, LoadValues]
    load = acts[2]
    assert acts[1] == DropRound(0, 1, 3) and isinstance(load, LoadValues) and torch.equal(load.values, after)
    assert c.job is None and c.data_pointer == 0 and c.counters["rounds_missed"] == 1  # the pointer did not move
    assert of(TrainStep, c.tick(0.0)) == []


def test_overdue_result_sends_sync_request() -> None:
    c = core()
    c.on_plan(plan(deadline=100.0), 0.0)
    run_steps(c, now=1.0)  # includes the once-after-connect SyncRequest at t=1
    assert c.tick(104.0) == []  # trained, waiting: not overdue before deadline + sync_retry_s
    # overdue: ask, and publish the queued update again (a broker restart may have lost it after its PUBACK)
    assert c.tick(105.5) == [SendSync(-1), ResendUpdates()]
    assert c.tick(107.0) == [] and c.tick(111.0) == [SendSync(-1), ResendUpdates()]  # then every sync_retry_s


def test_no_sync_request_while_offline_and_one_after_connect() -> None:
    c = ClientRounds(IDENTITY, lambda: V0.clone(), sync_retry_s=5.0)
    c.on_result(result(4, V0)[0], 0.0)  # far ahead
    assert c.tick(0.0) == []  # offline
    assert c.connected(0.0) == [SendJoin(-1)] and c.tick(0.0) == [SendSync(-1)]
    c.disconnected(0.0)
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
    c.on_plan(p, 0.0)
    assert of(QueueUpdate, run_steps(c))
    assert c.on_plan(p, 0.0) == [ResendUpdates()]  # same plan again (re-subscribe, coordinator reconnect)
    later = plan(deadline=400.0, steps={ME: 3, "other": 3})  # an extension: same work for us
    assert c.on_plan(later, 0.0) == [ResendUpdates()] and c.counters["resent_on_plan"] == 2
    res, after = result(0, V0)
    c.on_result(res, 0.0)
    assert c.on_plan(p, 0.0) == []  # the result is applied: the update is delivered, nothing to send
    assert c.on_plan(plan(deadline=100.0, seeds=(7, 8, 9)), 0.0) == []  # another plan of round 0: not ours to resend


def test_plan_of_a_round_being_trained_is_not_a_resend() -> None:
    c = core()
    p = plan()
    c.on_plan(p, 0.0)
    assert c.on_plan(p, 0.0) == []


def test_handle_dispatches_like_the_named_events() -> None:
    by_name, by_type = core(), core()
    res, _ = result(0, V0)
    p = plan(round=1, base_values=apply_round(V0, res.seeds, res.scalars, res.lr, res.dist))
    err = ErrorMsg(ErrorCode.RATE_LIMITED, "x")
    want = [by_name.on_result(res, 3.0), by_name.on_plan(p, 3.0), by_name.on_replay(Replay(()), 3.0),
            by_name.on_error(err, 3.0)]  # fmt: skip
    got = [by_type.handle(msg, 3.0) for msg in (res, p, Replay(()), err)]
    assert [[type(a) for a in acts] for acts in got] == [[type(a) for a in acts] for acts in want]
    assert [[type(a) for a in acts] for acts in got] == [[Commit, LoadValues], [LoadValues], [], [SlowDown]]
    assert (by_type.round, by_type.checksum, by_type.job is not None) == (0, by_name.checksum, True)
    with pytest.raises(TypeError, match="Heartbeat is not a coordinator -> client message"):
        by_type.handle(Heartbeat(client="", ts=0.0, cpu_pct=0.0, rss_bytes=0, gpu_mem_bytes=None, temp_c=None,
                                 power_w=None, step_time_s=None, peak_mem_bytes=None, round=-1), 0.0)
